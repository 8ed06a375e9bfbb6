use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply_without_sources() {
    let config = Config::load(&Sources::default()).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn file_beats_defaults_env_beats_file_flags_beat_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("livemesh.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7001\"\ndatabase_url = \"sqlite://file.db\"\n\
         [rooms]\nscan_interval_ms = 111\nended_retention_ms = 5\n\
         [[rooms.regions]]\nid = 3\ndatabase_url = \"mysql://r3\"\n",
    )
    .unwrap();
    let sources = Sources {
        file: Some(file),
        env: env(&[
            ("LIVEMESH_DATABASE_URL", "sqlite://env.db"),
            ("LIVEMESH_ROOMS__SCAN_INTERVAL_MS", "222"),
            ("LIVEMESH_TEST_MYSQL_URL", "mysql://not-config"),
            ("LIVEMESH_CONFIG", "ignored.toml"),
            ("UNRELATED", "x"),
        ]),
        overrides: vec![("rooms.scan_interval_ms".into(), "333".into())],
    };
    let config = Config::load(&sources).unwrap();
    assert_eq!(config.listen.port(), 7001, "file beats the default");
    assert_eq!(config.database_url.as_deref(), Some("sqlite://env.db"));
    assert_eq!(config.rooms.scan_interval_ms, 333, "flags beat env");
    assert_eq!(config.rooms.ended_retention_ms, 5);
    assert_eq!(
        config.rooms.regions,
        vec![RegionConfig {
            id: 3,
            database_url: "mysql://r3".into()
        }]
    );
    assert_eq!(config.client, ClientConfig::default());
}

#[test]
fn unknown_keys_and_bad_values_are_rejected_with_the_key_named() {
    let err = Config::load(&Sources {
        env: env(&[("LIVEMESH_ROOMS__SCAN_INTERVL_MS", "1")]),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("scan_intervl_ms"), "{err}");
    assert!(err.contains("LIVEMESH_ROOMS__SCAN_INTERVL_MS"), "{err}");

    let err = Config::load(&Sources {
        overrides: vec![("listen".into(), "not-an-address".into())],
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("listen") || err.contains("address"), "{err}");

    let err = Config::load(&Sources {
        file: Some(PathBuf::from("/nonexistent/livemesh.toml")),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn peers_come_from_a_comma_list_and_leases_outlive_renewals() {
    let config = Config::load(&Sources {
        env: env(&[(
            "LIVEMESH_PUBLISH__PEERS",
            "http://dc2:50051,https://dc3:50051",
        )]),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(
        config.publish.peers,
        vec![
            "http://dc2:50051".to_owned(),
            "https://dc3:50051".to_owned()
        ]
    );
    let err = Config::load(&Sources {
        env: env(&[("LIVEMESH_PUBLISH__PEERS", "dc2:50051")]),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("publish.peers"), "{err}");
    let err = Config::load(&Sources {
        env: env(&[("LIVEMESH_SUBSCRIBE__LEASE_MS", "3000")]),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("lease_ms"), "{err}");
}

#[test]
fn bad_breaker_retry_and_server_settings_are_rejected_with_the_key_named() {
    for (var, value, key) in [
        (
            "LIVEMESH_CLIENT__BREAKER_FAILURE_RATE",
            "1.5",
            "breaker_failure_rate",
        ),
        (
            "LIVEMESH_CLIENT__BREAKER_SLOW_CALL_RATE",
            "0",
            "breaker_slow_call_rate",
        ),
        (
            "LIVEMESH_CLIENT__BREAKER_WINDOW_MS",
            "10",
            "breaker_window_ms",
        ),
        ("LIVEMESH_CLIENT__BREAKER_OPEN_MS", "0", "breaker_open_ms"),
        (
            "LIVEMESH_CLIENT__RETRY_BUDGET_PERCENT",
            "5000",
            "retry_budget_percent",
        ),
        (
            "LIVEMESH_SERVER__MAX_CONCURRENT_REQUESTS",
            "0",
            "max_concurrent_requests",
        ),
    ] {
        let err = Config::load(&Sources {
            env: env(&[(var, value)]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

#[test]
fn the_deliver_timeout_must_stay_below_the_slow_call_threshold() {
    let err = Config::load(&Sources {
        env: env(&[("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000")]),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("publish.deliver_timeout_ms (1000)")
            && err.contains("client.breaker_slow_call_ms (1000)"),
        "{err}"
    );
    let config = Config::load(&Sources {
        env: env(&[
            ("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000"),
            ("LIVEMESH_CLIENT__BREAKER_SLOW_CALL_MS", "2000"),
        ]),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(config.publish.deliver_timeout_ms, 1_000);
}

#[test]
fn duplicate_regions_are_rejected() {
    let err = Config::load(&Sources {
        env: env(&[("LIVEMESH_ROOMS__LOCAL_REGION", "2")]),
        overrides: vec![],
        file: None,
    })
    .map(|mut c| {
        c.rooms.regions.push(RegionConfig {
            id: 2,
            database_url: "x".into(),
        });
        c.validate()
    })
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("region 2"), "{err}");
}

#[test]
fn unset_empty_and_blank_redis_urls_all_mean_the_in_process_store() {
    let with = |url: Option<&str>| Config {
        redis_url: url.map(str::to_owned),
        ..Config::default()
    };
    assert_eq!(with(None).redis_urls(), None);
    assert_eq!(with(Some("")).redis_urls(), None);
    assert_eq!(with(Some("  ")).redis_urls(), None);
    assert_eq!(
        with(Some(" redis://127.0.0.1:6379,redis://127.0.0.1:6380 ")).redis_urls(),
        Some("redis://127.0.0.1:6379,redis://127.0.0.1:6380")
    );
}
