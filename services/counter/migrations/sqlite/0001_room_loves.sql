-- The final love count of every ended room, written once when it ends.
CREATE TABLE room_loves (
    room_id INTEGER NOT NULL PRIMARY KEY,
    total INTEGER NOT NULL,
    -- JSON: [{"viewer_id": 1, "loves": 10}, ...], highest first.
    top_lovers TEXT NOT NULL,
    finalized_at_ms INTEGER NOT NULL
);
