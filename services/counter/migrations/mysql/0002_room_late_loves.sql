-- Loves of SendLoves batches that reached the hot store after their room was
-- closed for its final total: part of the final total, once per batch.
CREATE TABLE room_late_loves (
    room_id BIGINT NOT NULL,
    viewer_id BIGINT NOT NULL,
    batch_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    loves BIGINT NOT NULL,
    PRIMARY KEY (room_id, viewer_id, batch_id)
) ENGINE = InnoDB;
