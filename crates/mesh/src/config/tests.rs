use serde::{Deserialize, Serialize};

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply_without_sources() {
    let config = Config::load(&Registry::new(), &Sources::default()).unwrap();
    assert_eq!(config, Config::default());
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
        let err = Config::load(
            &Registry::new(),
            &Sources {
                env: env(&[(var, value)]),
                ..Sources::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
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

/// A service section, as a service's `config.rs` writes one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Counter {
    burst: u32,
    peers: Vec<String>,
    publish_url: String,
}

impl Default for Counter {
    fn default() -> Self {
        Self {
            burst: 200,
            peers: Vec::new(),
            publish_url: String::new(),
        }
    }
}

impl Section for Counter {
    const NAME: &'static str = "counter";
    const LIST_KEYS: &'static [&'static str] = &["peers"];

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.burst == 0 {
            return Err("counter.burst must be at least 1".into());
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Peer<'_>> {
        vec![Peer {
            key: "counter.publish_url",
            url: &self.publish_url,
            required: Some("publish"),
        }]
    }
}

fn file(text: &str) -> (tempfile::TempDir, Sources) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("livemesh.toml");
    std::fs::write(&path, text).unwrap();
    let sources = Sources {
        file: Some(path),
        ..Sources::default()
    };
    (dir, sources)
}

#[test]
fn a_registered_section_is_layered_read_and_validated() {
    let registry = Registry::new().own::<Counter>();
    let (_dir, mut sources) = file("[counter]\nburst = 7\npublish_url = \"http://p:1\"\n");
    sources.env = env(&[("LIVEMESH_COUNTER__PEERS", "http://a:1,http://b:2")]);
    let config = Config::load(&registry, &sources).unwrap();
    let counter = config.section::<Counter>();
    assert_eq!(counter.burst, 7);
    assert_eq!(counter.peers, ["http://a:1", "http://b:2"]);
    assert_eq!(config.peers()[0].url, "http://p:1");

    sources.overrides = vec![("counter.burst".into(), "0".into())];
    let err = Config::load(&registry, &sources).unwrap_err().to_string();
    assert!(err.contains("counter.burst must be at least 1"), "{err}");

    let (_dir, sources) = file("[counter]\nburts = 7\n");
    let err = Config::load(&registry, &sources).unwrap_err().to_string();
    assert!(err.contains("burts"), "{err}");
}

#[test]
fn other_services_sections_are_accepted_unread_and_a_misspelt_one_is_refused() {
    let (_dir, sources) =
        file("[counter]\nburst = 7\n[gifts]\nshards = 2\n[rooms]\nanything = 1\n");
    let config = Config::load(&Registry::new().own::<Counter>(), &sources).unwrap();
    assert_eq!(config.section::<Counter>().burst, 7);
    let config = Config::load(&Registry::new(), &sources).unwrap();
    assert_eq!(config, Config::default(), "no section read");

    let (_dir, sources) = file("[counter]\nburst = 7\n[gfits]\nshards = 2\n");
    let err = Config::load(&Registry::new().own::<Counter>(), &sources)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gfits"), "{err}");
}

#[test]
fn a_section_not_held_reads_as_its_defaults_and_can_be_set() {
    let mut config = Config::default();
    assert_eq!(*config.section::<Counter>(), Counter::default());
    assert_eq!(config, Config::default().with(Counter::default()));
    config.section_mut::<Counter>().burst = 3;
    assert_eq!(config.section::<Counter>().burst, 3);
    assert_ne!(config, Config::default());
    let copy = config.clone();
    assert_eq!(copy.section::<Counter>().burst, 3);
}
