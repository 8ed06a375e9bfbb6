-- One balance shard: accounts, the double-entry ledger, and the rooms whose
-- virtual accounts live here (see the MySQL migration for the meaning).
CREATE TABLE accounts (
    account TEXT NOT NULL PRIMARY KEY,
    balance INTEGER NOT NULL DEFAULT 0,
    may_go_negative INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT balance_not_negative CHECK (balance >= 0 OR may_go_negative = 1)
);

CREATE TABLE transfers (
    transfer_id TEXT NOT NULL PRIMARY KEY,
    kind TEXT NOT NULL,
    debit_account TEXT NOT NULL,
    credit_account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    request TEXT NOT NULL,
    balance_after INTEGER NOT NULL,
    room_id INTEGER NULL,
    created_at_ms INTEGER NOT NULL,
    CONSTRAINT amount_positive CHECK (amount > 0)
);
CREATE INDEX transfers_room ON transfers (room_id);

CREATE TABLE entries (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    transfer_id TEXT NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX entries_time ON entries (created_at_ms);
CREATE INDEX entries_transfer ON entries (transfer_id);

CREATE TABLE room_accounts (
    room_id INTEGER NOT NULL PRIMARY KEY,
    status TEXT NOT NULL,
    opened_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER NULL
);
