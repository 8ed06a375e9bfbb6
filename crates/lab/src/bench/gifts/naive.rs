//! The naive side: every gift one transaction on one database, debiting the
//! viewer's and crediting the streamer's balance row.

use anyhow::ensure;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use std::time::Duration;

use super::{DEPOSIT, NAIVE_POOL, STREAMER};

/// Creates the naive side's database: every viewer's balance and the
/// streamer's in one table, and a ledger of gifts; tops the viewers up.
pub(super) async fn naive_setup(
    admin: &MySqlPool,
    base: &str,
    name: &str,
    viewers: u64,
) -> anyhow::Result<MySqlPool> {
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(admin)
        .await?;
    // As the service's shard pools are configured (sqlx >= 0.9.1, which
    // keeps Nagle off: with it every statement after the first of a
    // transaction would wait for the server's delayed ACK).
    let pool = MySqlPoolOptions::new()
        .max_connections(NAIVE_POOL)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{base}/{name}"))
        .await?;
    sqlx::query(
        "CREATE TABLE balances (user_id BIGINT NOT NULL PRIMARY KEY, \
         balance BIGINT NOT NULL, CONSTRAINT balance_not_negative CHECK (balance >= 0)) \
         ENGINE = InnoDB",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "CREATE TABLE gifts (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         idempotency_key VARCHAR(128) NOT NULL UNIQUE, viewer_id BIGINT NOT NULL, \
         streamer_id BIGINT NOT NULL, amount BIGINT NOT NULL, created_at_ms BIGINT NOT NULL) \
         ENGINE = InnoDB",
    )
    .execute(&pool)
    .await?;
    let users: Vec<(u64, i64)> = (1..=viewers)
        .map(|v| (v, DEPOSIT))
        .chain([(STREAMER, 0)])
        .collect();
    for chunk in users.chunks(1_000) {
        let values: Vec<String> = chunk.iter().map(|(u, b)| format!("({u}, {b})")).collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO balances (user_id, balance) VALUES {}",
            values.join(", ")
        )))
        .execute(&pool)
        .await?;
    }
    Ok(pool)
}

/// The naive gift: one transaction that debits the viewer (never below
/// zero), credits the streamer's balance row and records the gift.
pub(super) async fn naive_gift(
    pool: &MySqlPool,
    key: u64,
    viewer: u64,
    amount: i64,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let debited =
        sqlx::query("UPDATE balances SET balance = balance - ? WHERE user_id = ? AND balance >= ?")
            .bind(amount)
            .bind(viewer)
            .bind(amount)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    ensure!(debited == 1, "viewer {viewer} cannot pay {amount}");
    sqlx::query("UPDATE balances SET balance = balance + ? WHERE user_id = ?")
        .bind(amount)
        .bind(STREAMER)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO gifts (idempotency_key, viewer_id, streamer_id, amount, created_at_ms) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(format!("bench-gift-{key}"))
    .bind(viewer)
    .bind(STREAMER)
    .bind(amount)
    .bind(livemesh_mesh::now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The naive side conserved money and credited the streamer every gift.
pub(super) async fn naive_check(pool: &MySqlPool, viewers: u64, gifted: i64) -> anyhow::Result<()> {
    let (total, streamer, ledger): (i64, i64, i64) = sqlx::query_as(
        "SELECT CAST(SUM(balance) AS SIGNED), \
         CAST(SUM(IF(user_id = ?, balance, 0)) AS SIGNED), \
         (SELECT CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM gifts) FROM balances",
    )
    .bind(STREAMER)
    .fetch_one(pool)
    .await?;
    let expected = i64::try_from(viewers)? * DEPOSIT;
    ensure!(
        total == expected && streamer == gifted && ledger == gifted,
        "the naive side lost money: total {total} (expected {expected}), streamer {streamer} \
         and ledger {ledger} (expected {gifted})"
    );
    Ok(())
}
