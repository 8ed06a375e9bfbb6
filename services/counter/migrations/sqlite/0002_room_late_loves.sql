-- Loves of SendLoves batches that reached the hot store after their room was
-- closed for its final total: part of the final total, once per batch.
CREATE TABLE room_late_loves (
    room_id INTEGER NOT NULL,
    viewer_id INTEGER NOT NULL,
    batch_id TEXT NOT NULL,
    loves INTEGER NOT NULL,
    PRIMARY KEY (room_id, viewer_id, batch_id)
);
