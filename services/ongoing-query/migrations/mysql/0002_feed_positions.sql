-- Where each ongoing-query replica is in the binlog (a GTID or file:pos
-- token), to resume after a restart.
CREATE TABLE feed_positions (
    consumer VARCHAR(191) NOT NULL PRIMARY KEY,
    position VARCHAR(1024) NOT NULL,
    updated_at_ms BIGINT NOT NULL
) ENGINE = InnoDB;
