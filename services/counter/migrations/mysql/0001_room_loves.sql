-- The final love count of every ended room, written once when it ends.
CREATE TABLE room_loves (
    room_id BIGINT NOT NULL PRIMARY KEY,
    total BIGINT NOT NULL,
    -- JSON: [{"viewer_id": 1, "loves": 10}, ...], highest first.
    top_lovers MEDIUMTEXT NOT NULL,
    finalized_at_ms BIGINT NOT NULL
) ENGINE = InnoDB;
