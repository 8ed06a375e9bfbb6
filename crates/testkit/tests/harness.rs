//! The harness's private servers are what later work relies on: Redis
//! standalone, a Redis Cluster of 3 masters with one replica each whose state
//! is ok, and MariaDB with
//! the binlog on in ROW format with full row images and metadata.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sqlx::Connection as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends one inline Redis command and returns the raw reply.
async fn redis(url: &str, command: &str) -> String {
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Redis at {addr}: {e}"));
    socket
        .write_all(format!("{command}\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0_u8; 4096];
    // Replies here are one small frame; read until it is complete.
    loop {
        let n = socket.read(&mut buf).await.unwrap();
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let complete = match text.chars().next() {
            Some('$') => text
                .split_once("\r\n")
                .and_then(|(len, rest)| Some(rest.len() >= len[1..].parse::<usize>().ok()? + 2))
                .unwrap_or(false),
            Some(_) => text.ends_with("\r\n"),
            None => false,
        };
        if complete || n == 0 {
            return text.into_owned();
        }
    }
}

#[tokio::test]
async fn redis_standalone_answers() {
    assert_eq!(
        redis(&livemesh_testkit::redis_url(), "PING").await,
        "+PONG\r\n"
    );
}

#[tokio::test]
async fn redis_cluster_has_three_masters_and_is_ok() {
    let urls = livemesh_testkit::redis_cluster_urls();
    assert_eq!(urls.len(), 3, "{urls:?}");
    for url in &urls {
        let info = redis(url, "CLUSTER INFO").await;
        assert!(info.contains("cluster_state:ok"), "{url}: {info}");
        assert!(info.contains("cluster_size:3"), "{url}: {info}");
        assert!(info.contains("cluster_known_nodes:6"), "{url}: {info}");
        let replication = redis(url, "INFO replication").await;
        assert!(replication.contains("role:master"), "{url}: {replication}");
        assert!(
            replication.contains("connected_slaves:1"),
            "{url}: {replication}"
        );
    }
}

#[tokio::test]
async fn mariadb_has_the_binlog_on_in_row_format() {
    let url = livemesh_testkit::mysql_url();
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    for (name, expected) in [
        ("log_bin", "ON"),
        ("binlog_format", "ROW"),
        ("binlog_row_image", "FULL"),
        ("binlog_row_metadata", "FULL"),
    ] {
        let (_, value): (String, String) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SHOW VARIABLES LIKE '{name}'")))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(value, expected, "{name}");
    }
    let (server_id,): (u32,) = sqlx::query_as("SELECT @@server_id")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_ne!(server_id, 0, "a replica client needs a non-zero server id");
}
