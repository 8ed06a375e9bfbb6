-- Settlement of ended rooms, kept by the coordinating shard (shard 0): a
-- restarted settler finishes every room left `in_progress`.
CREATE TABLE settlements (
    room_id BIGINT NOT NULL PRIMARY KEY,
    streamer_id BIGINT NOT NULL,
    state VARCHAR(16) NOT NULL,
    gross BIGINT NOT NULL DEFAULT 0,
    platform_cut BIGINT NOT NULL DEFAULT 0,
    streamer_credit BIGINT NOT NULL DEFAULT 0,
    started_at_ms BIGINT NOT NULL,
    settled_at_ms BIGINT NULL,
    INDEX settlements_state (state)
) ENGINE = InnoDB;
