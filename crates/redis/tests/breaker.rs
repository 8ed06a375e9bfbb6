//! A killed Redis: once the breaker is open, calls fail at once with a
//! message that says so; after a restart they succeed again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use livemesh_mesh::breaker::{BreakerSettings, BreakerState};
use livemesh_mesh::config::ClientConfig;
use livemesh_redis::{RedisConn, RedisError, RedisOptions};
use livemesh_testkit::PrivateRedis;

#[tokio::test]
async fn a_dead_redis_fails_fast_once_the_breaker_opens_and_recovers_after_a_restart() {
    let mut redis = PrivateRedis::start().await;
    let options = RedisOptions {
        command_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        breaker: BreakerSettings::from(&ClientConfig {
            breaker_window_ms: 5_000,
            breaker_min_calls: 3,
            breaker_open_ms: 300,
            breaker_half_open_calls: 1,
            ..ClientConfig::default()
        }),
        ..RedisOptions::default()
    };
    let conn = RedisConn::connect(&redis.url(), options).unwrap();
    conn.ping().await.unwrap();
    assert_eq!(conn.breaker_state(), BreakerState::Closed);

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.breaker_state() != BreakerState::Open {
        assert!(Instant::now() < deadline, "the breaker never opened");
        assert!(conn.ping().await.is_err(), "a killed Redis answered");
    }
    let started = Instant::now();
    let RedisError::Unavailable(message) = conn.ping().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "an open breaker took {:?} to refuse",
        started.elapsed()
    );
    assert!(message.contains("circuit breaker is open"), "{message}");
    assert!(message.contains(&redis.url()), "{message}");

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while conn.ping().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "calls still fail 15 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(conn.breaker_state(), BreakerState::Closed);
}
