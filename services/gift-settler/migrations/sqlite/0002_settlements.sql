-- Settlement of ended rooms, kept by the coordinating shard (shard 0).
CREATE TABLE settlements (
    room_id INTEGER NOT NULL PRIMARY KEY,
    streamer_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    gross INTEGER NOT NULL DEFAULT 0,
    platform_cut INTEGER NOT NULL DEFAULT 0,
    streamer_credit INTEGER NOT NULL DEFAULT 0,
    started_at_ms INTEGER NOT NULL,
    settled_at_ms INTEGER NULL
);
CREATE INDEX settlements_state ON settlements (state);
