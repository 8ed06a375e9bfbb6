-- One balance shard: accounts, the double-entry ledger, and the rooms whose
-- virtual accounts live here.

-- A user's wallet (`user:<id>`), a room's virtual sub-accounts
-- (`room:<room>:<k>`), the external funding account that payment top-ups
-- come from (`external:funding`, the only one that may go negative), and
-- the platform's account.
CREATE TABLE accounts (
    account VARCHAR(64) NOT NULL PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0,
    may_go_negative TINYINT NOT NULL DEFAULT 0,
    CONSTRAINT balance_not_negative CHECK (balance >= 0 OR may_go_negative = 1)
) ENGINE = InnoDB;

-- Every movement: one debit, one credit, one amount, one id.
CREATE TABLE transfers (
    transfer_id VARCHAR(200) NOT NULL PRIMARY KEY,
    kind VARCHAR(16) NOT NULL,
    debit_account VARCHAR(64) NOT NULL,
    credit_account VARCHAR(64) NOT NULL,
    amount BIGINT NOT NULL,
    -- The request's content, so that a reused idempotency key with other
    -- content is refused instead of answered with this transfer.
    request VARCHAR(255) NOT NULL,
    -- The debited (or, for deposits, credited) user's balance after it.
    balance_after BIGINT NOT NULL,
    room_id BIGINT NULL,
    created_at_ms BIGINT NOT NULL,
    CONSTRAINT amount_positive CHECK (amount > 0),
    INDEX transfers_room (room_id)
) ENGINE = InnoDB;

-- The ledger: two entries per transfer (negative = debit), appended in the
-- transaction that changes the balances.
CREATE TABLE entries (
    entry_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    transfer_id VARCHAR(200) NOT NULL,
    account VARCHAR(64) NOT NULL,
    amount BIGINT NOT NULL,
    kind VARCHAR(16) NOT NULL,
    created_at_ms BIGINT NOT NULL,
    INDEX entries_time (created_at_ms),
    INDEX entries_transfer (transfer_id)
) ENGINE = InnoDB;

-- Rooms whose virtual sub-accounts are open in this shard; gifts are taken
-- only while `open`.
CREATE TABLE room_accounts (
    room_id BIGINT NOT NULL PRIMARY KEY,
    status VARCHAR(16) NOT NULL,
    opened_at_ms BIGINT NOT NULL,
    ended_at_ms BIGINT NULL
) ENGINE = InnoDB;
