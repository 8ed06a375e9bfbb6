//! The configuration as the all-in-one loads it: every service's section
//! registered (`livemesh::config_sections`), layered from defaults, file,
//! environment and flags, validated, and checked by `config check`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use livemesh::config_sections;
use livemesh_counter::CounterConfig;
use livemesh_mesh::check::{Problem, check};
use livemesh_mesh::config::{ClientConfig, Config, Registry, SERVICE_SECTIONS, Section, Sources};
use livemesh_ongoing_query::{RegionConfig, RoomsConfig};
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every section, with `S` the process's own (a service on its own).
fn as_own<S: Section>() -> Registry {
    config_sections().own::<S>()
}

/// The documented example must stay loadable and equal to the defaults,
/// so the reference cannot drift from the code.
#[test]
fn the_example_config_loads_and_documents_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/livemesh.example.toml");
    let config = Config::load(
        &config_sections(),
        &Sources {
            file: Some(path),
            ..Sources::default()
        },
    )
    .unwrap();
    assert_eq!(config, Config::default());
}

/// A process accepts the other services' sections of a shared file by
/// name: the list must name exactly the sections the all-in-one reads.
#[test]
fn the_service_sections_list_names_every_registered_section() {
    let mut registered = config_sections().names();
    registered.sort_unstable();
    assert_eq!(registered, SERVICE_SECTIONS);
}

/// A single service's binary reads its own sections from the shared file
/// and accepts the others' unread.
#[test]
fn each_service_reads_its_sections_from_the_shared_example_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/livemesh.example.toml");
    for registry in [
        livemesh_counter::config_sections(),
        livemesh_gift_settler::config_sections(),
        livemesh_ongoing_query::config_sections(),
        livemesh_publish::config_sections(),
        livemesh_subscribe::config_sections(),
    ] {
        let config = Config::load(
            &registry,
            &Sources {
                file: Some(path.clone()),
                ..Sources::default()
            },
        )
        .unwrap();
        assert!(registry.own_section().is_some());
        assert_eq!(config, Config::default(), "{:?}", registry.names());
    }
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
    let config = Config::load(&config_sections(), &sources).unwrap();
    assert_eq!(config.listen.port(), 7001, "file beats the default");
    assert_eq!(config.database_url.as_deref(), Some("sqlite://env.db"));
    assert_eq!(
        config.section::<RoomsConfig>().scan_interval_ms,
        333,
        "flags beat env"
    );
    assert_eq!(config.section::<RoomsConfig>().ended_retention_ms, 5);
    assert_eq!(
        config.section::<RoomsConfig>().regions,
        vec![RegionConfig {
            id: 3,
            database_url: "mysql://r3".into()
        }]
    );
    assert_eq!(config.client, ClientConfig::default());
}

#[test]
fn unknown_keys_and_bad_values_are_rejected_with_the_key_named() {
    let err = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[("LIVEMESH_ROOMS__SCAN_INTERVL_MS", "1")]),
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("scan_intervl_ms"), "{err}");
    assert!(err.contains("LIVEMESH_ROOMS__SCAN_INTERVL_MS"), "{err}");

    let err = Config::load(
        &config_sections(),
        &Sources {
            overrides: vec![("listen".into(), "not-an-address".into())],
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("listen") || err.contains("address"), "{err}");

    let err = Config::load(
        &config_sections(),
        &Sources {
            file: Some(PathBuf::from("/nonexistent/livemesh.toml")),
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn peers_come_from_a_comma_list_and_leases_outlive_renewals() {
    let config = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[(
                "LIVEMESH_PUBLISH__PEERS",
                "http://dc2:50051,https://dc3:50051",
            )]),
            ..Sources::default()
        },
    )
    .unwrap();
    assert_eq!(
        config.section::<PublishConfig>().peers,
        vec![
            "http://dc2:50051".to_owned(),
            "https://dc3:50051".to_owned()
        ]
    );
    let err = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[("LIVEMESH_PUBLISH__PEERS", "dc2:50051")]),
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("publish.peers"), "{err}");
    let err = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[("LIVEMESH_SUBSCRIBE__LEASE_MS", "3000")]),
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lease_ms"), "{err}");
}

#[test]
fn the_deliver_timeout_must_stay_below_the_slow_call_threshold() {
    let err = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000")]),
            ..Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("publish.deliver_timeout_ms (1000)")
            && err.contains("client.breaker_slow_call_ms (1000)"),
        "{err}"
    );
    let config = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[
                ("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000"),
                ("LIVEMESH_CLIENT__BREAKER_SLOW_CALL_MS", "2000"),
            ]),
            ..Sources::default()
        },
    )
    .unwrap();
    assert_eq!(config.section::<PublishConfig>().deliver_timeout_ms, 1_000);
}

#[test]
fn duplicate_regions_are_rejected() {
    let mut config = Config::load(
        &config_sections(),
        &Sources {
            env: env(&[("LIVEMESH_ROOMS__LOCAL_REGION", "2")]),
            overrides: vec![],
            file: None,
        },
    )
    .unwrap();
    config
        .section_mut::<RoomsConfig>()
        .regions
        .push(RegionConfig {
            id: 2,
            database_url: "x".into(),
        });
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("region 2"), "{err}");
}

fn sources(pairs: &[(&str, &str)]) -> Sources {
    Sources {
        env: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Sources::default()
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

const SUBSCRIBE_OK: &[(&str, &str)] = &[
    ("LIVEMESH_LISTEN", "0.0.0.0:50051"),
    ("LIVEMESH_REDIS_URL", "redis://r1:6379,redis://r2:6379"),
    ("LIVEMESH_SUBSCRIBE__NODE_URL", "http://10.1.2.3:50051"),
    (
        "LIVEMESH_SUBSCRIBE__ONGOING_QUERY_URL",
        "http://ongoing-query:50051",
    ),
    ("LIVEMESH_SUBSCRIBE__PUBLISH_URL", "http://publish:50051"),
    ("LIVEMESH_TELEMETRY__METRICS_LISTEN", "0.0.0.0:9464"),
];

#[test]
fn a_complete_service_configuration_passes() {
    check(&as_own::<SubscribeConfig>(), &sources(SUBSCRIBE_OK)).unwrap();
    check(&config_sections(), &Sources::default()).unwrap();
}

#[test]
fn a_service_on_its_own_needs_its_peers_its_store_and_a_callable_node_url() {
    let problems = check(
        &as_own::<SubscribeConfig>(),
        &sources(&[("LIVEMESH_LISTEN", "0.0.0.0:50051")]),
    )
    .unwrap_err();
    assert_eq!(
        keys(&problems),
        [
            "subscribe.ongoing_query_url",
            "subscribe.publish_url",
            "subscribe.node_url",
            "redis_url"
        ],
        "{problems:?}"
    );
    assert!(problems[2].message.contains("0.0.0.0"), "{problems:?}");
    let problems = check(&as_own::<CounterConfig>(), &Sources::default()).unwrap_err();
    assert_eq!(
        keys(&problems),
        [
            "counter.ongoing_query_url",
            "counter.publish_url",
            "redis_url"
        ]
    );
}

#[test]
fn malformed_urls_and_addresses_are_named_by_key() {
    let mut env = SUBSCRIBE_OK.to_vec();
    env.extend([
        ("LIVEMESH_DATABASE_URL", "postgres://x/y"),
        ("LIVEMESH_GIFTS__SHARD_URLS", "mysql://u:p@db:3306/s0,db1"),
        ("LIVEMESH_TELEMETRY__METRICS_LISTEN", "localhost"),
        ("LIVEMESH_TELEMETRY__OTLP_ENDPOINT", "collector:4317"),
    ]);
    env.retain(|(k, v)| !(k == &"LIVEMESH_TELEMETRY__METRICS_LISTEN" && v == &"0.0.0.0:9464"));
    env.retain(|(k, _)| k != &"LIVEMESH_REDIS_URL");
    env.push(("LIVEMESH_REDIS_URL", "http://r1:6379"));
    let problems = check(&as_own::<SubscribeConfig>(), &sources(&env)).unwrap_err();
    assert_eq!(
        keys(&problems),
        [
            "telemetry.metrics_listen",
            "telemetry.otlp_endpoint",
            "database_url",
            "gifts.shard_urls[1]",
            "redis_url"
        ],
        "{problems:?}"
    );
}

#[test]
fn an_unknown_key_and_a_plaintext_peer_under_tls_fail_with_the_key_named() {
    let mut env = SUBSCRIBE_OK.to_vec();
    env.push(("LIVEMESH_SUBSCRIBE__QUEUE_LENGTH", "5"));
    let problems = check(&as_own::<SubscribeConfig>(), &sources(&env)).unwrap_err();
    assert!(
        problems[0].message.contains("queue_length")
            && problems[0]
                .message
                .contains("LIVEMESH_SUBSCRIBE__QUEUE_LENGTH"),
        "{problems:?}"
    );
    let mut env = SUBSCRIBE_OK.to_vec();
    env.extend([
        ("LIVEMESH_AUTH__TLS_CERT", "/tls/tls.crt"),
        ("LIVEMESH_AUTH__TLS_KEY", "/tls/tls.key"),
        ("LIVEMESH_AUTH__TLS_CA", "/tls/ca.crt"),
    ]);
    let problems = check(&as_own::<SubscribeConfig>(), &sources(&env)).unwrap_err();
    assert!(
        problems[0].message.contains("subscribe.node_url")
            && problems[0].message.contains("https://"),
        "{problems:?}"
    );
}

#[test]
fn missing_secret_and_certificate_files_are_reported() {
    let mut env = SUBSCRIBE_OK.to_vec();
    env.extend([
        ("LIVEMESH_AUTH__MODE", "enforce"),
        ("LIVEMESH_AUTH__TOKEN_SECRET_FILE", "/nonexistent/secret"),
    ]);
    let problems = check(&as_own::<SubscribeConfig>(), &sources(&env)).unwrap_err();
    assert_eq!(keys(&problems), ["auth"], "{problems:?}");
    assert!(
        problems[0].message.contains("auth.token_secret_file"),
        "{problems:?}"
    );
}
