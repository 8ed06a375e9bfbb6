-- The rooms of one region: the system of record for room starts and ends.
-- `id` is local to the region; the room id clients see is (region << 48) | id.
CREATE TABLE rooms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    anchor_id INTEGER NOT NULL,
    status INTEGER NOT NULL CHECK (status IN (1, 2)),
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER NULL,
    version INTEGER NOT NULL,
    CHECK ((status = 1) = (ended_at_ms IS NULL))
);

-- The full scan reads the ongoing rooms in id order.
CREATE INDEX rooms_status_id ON rooms (status, id);
