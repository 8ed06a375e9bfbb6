-- The rooms of one region: the system of record for room starts and ends.
-- `id` is local to the region; the room id clients see is (region << 48) | id.
-- Times are epoch milliseconds, so the binlog carries them as plain integers.
CREATE TABLE rooms (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    anchor_id BIGINT NOT NULL,
    status INT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms BIGINT NULL,
    version BIGINT NOT NULL,
    KEY rooms_status_id (status, id),
    CONSTRAINT rooms_status_known CHECK (status IN (1, 2)),
    CONSTRAINT rooms_ended_iff_ended_at CHECK ((status = 1) = (ended_at_ms IS NULL))
) ENGINE = InnoDB;
