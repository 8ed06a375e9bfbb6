-- Transfer ids carry the client's idempotency key, and two keys are two
-- transfers when their bytes differ. The server's default collation
-- (utf8mb4_general_ci here) compared them case-insensitively and ignoring
-- trailing spaces, so `deposit:1:k`, `deposit:1:K` and `deposit:1:k ` were
-- one primary key: the second deposit was refused as a conflict forever.
-- `utf8mb4_nopad_bin` compares byte for byte, trailing spaces included
-- (MariaDB 10.2 and later).
ALTER TABLE transfers
    MODIFY transfer_id VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL;
ALTER TABLE entries
    MODIFY transfer_id VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL;
