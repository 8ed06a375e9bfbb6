-- The SQLite change feed: triggers copy every row change of `rooms` into
-- `room_changes` inside the writing transaction, whoever writes, so the
-- ongoing-query service sees changes made by any connection, in commit order.
CREATE TABLE room_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id INTEGER NOT NULL,
    anchor_id INTEGER NOT NULL,
    status INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER room_changes_after_insert AFTER INSERT ON rooms
BEGIN
    INSERT INTO room_changes (id, anchor_id, status, started_at_ms, ended_at_ms, version)
    VALUES (NEW.id, NEW.anchor_id, NEW.status, NEW.started_at_ms, NEW.ended_at_ms, NEW.version);
END;

CREATE TRIGGER room_changes_after_update AFTER UPDATE ON rooms
BEGIN
    INSERT INTO room_changes (id, anchor_id, status, started_at_ms, ended_at_ms, version)
    VALUES (NEW.id, NEW.anchor_id, NEW.status, NEW.started_at_ms, NEW.ended_at_ms, NEW.version);
END;

CREATE TRIGGER room_changes_after_delete AFTER DELETE ON rooms
BEGIN
    INSERT INTO room_changes (id, anchor_id, status, started_at_ms, ended_at_ms, version, deleted)
    VALUES (OLD.id, OLD.anchor_id, OLD.status, OLD.started_at_ms, OLD.ended_at_ms, OLD.version, 1);
END;

-- Where each ongoing-query replica is in the feed, to resume after a restart.
CREATE TABLE feed_positions (
    consumer TEXT NOT NULL PRIMARY KEY,
    position TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
