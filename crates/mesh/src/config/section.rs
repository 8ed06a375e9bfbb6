//! Sections: each service's own part of the configuration.
//!
//! The shared loader knows the runtime's keys (listen, telemetry, client,
//! server, auth, …) and nothing of the services'. A service defines its
//! section in its own `config.rs` — a serde struct with its defaults, its
//! validation, the peers and databases it names — implements [`Section`]
//! for it, and registers it in the [`Registry`] its binary loads with.
//! Code reads a section with [`Config::section`].

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Config, ConfigError};

/// The names of the mesh's service sections. A process reads only the
/// sections it registers, but one configuration file usually serves the
/// whole mesh (the Helm chart renders one for every deployment), so a
/// process accepts the other services' sections without reading them and
/// still refuses a section whose name is none of these. The all-in-one
/// binary's test keeps this list equal to the sections it registers.
pub const SERVICE_SECTIONS: &[&str] = &[
    "counter",
    "fanout",
    "gifts",
    "publish",
    "rooms",
    "subscribe",
];

/// A peer URL a section configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// Its full key, e.g. `counter.publish_url`.
    pub key: &'static str,
    /// The URL; empty means this process's own address.
    pub url: &'a str,
    /// The service it must name when the section's service runs as its own
    /// process (where an empty URL would call a process serving no such
    /// service); `None` for optional peers.
    pub required: Option<&'static str>,
}

/// One service's section of the configuration.
pub trait Section:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + Debug + Send + Sync + 'static
{
    /// The section's TOML table, and its `LIVEMESH_<NAME>__KEY` variables.
    const NAME: &'static str;
    /// Keys of the section whose environment value is a comma-separated list.
    const LIST_KEYS: &'static [&'static str] = &[];

    /// Checks the section's values; `config` is the whole configuration,
    /// for rules that span sections. The message names the key.
    fn validate(&self, _config: &Config) -> Result<(), String> {
        Ok(())
    }

    /// The peer URLs it configures, in the order they are reported.
    fn peers(&self) -> Vec<Peer<'_>> {
        Vec::new()
    }

    /// The SQL database URLs it names, each with its key.
    fn sql_urls(&self) -> Vec<(String, &str)> {
        Vec::new()
    }

    /// What `--check-config` checks beyond [`Section::validate`] when this
    /// section's service runs as its own process (not the all-in-one):
    /// `report(key, message)` once per problem.
    fn check_own_process(&self, _config: &Config, _report: &mut dyn FnMut(&str, String)) {}
}

/// A section behind a trait object, so [`Config`] can hold any service's.
pub(super) trait DynSection: Debug + Send + Sync {
    fn name(&self) -> &'static str;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn clone_box(&self) -> Box<dyn DynSection>;
    fn eq_dyn(&self, other: &dyn DynSection) -> bool;
    fn is_default(&self) -> bool;
    fn validate(&self, config: &Config) -> Result<(), String>;
    fn peers(&self) -> Vec<Peer<'_>>;
    fn sql_urls(&self) -> Vec<(String, &str)>;
    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String));
}

impl<S: Section> DynSection for S {
    fn name(&self) -> &'static str {
        S::NAME
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn clone_box(&self) -> Box<dyn DynSection> {
        Box::new(self.clone())
    }
    fn eq_dyn(&self, other: &dyn DynSection) -> bool {
        other.as_any().downcast_ref::<S>() == Some(self)
    }
    fn is_default(&self) -> bool {
        *self == S::default()
    }
    fn validate(&self, config: &Config) -> Result<(), String> {
        Section::validate(self, config)
    }
    fn peers(&self) -> Vec<Peer<'_>> {
        Section::peers(self)
    }
    fn sql_urls(&self) -> Vec<(String, &str)> {
        Section::sql_urls(self)
    }
    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String)) {
        Section::check_own_process(self, config, report);
    }
}

/// The sections a [`Config`] holds, in registration order.
#[derive(Debug, Default)]
pub struct Sections(Vec<Box<dyn DynSection>>);

impl Clone for Sections {
    fn clone(&self) -> Self {
        Self(self.0.iter().map(|s| s.clone_box()).collect())
    }
}

/// Two configurations are equal when every section either holds equals:
/// a section one of them lacks counts as its defaults.
impl PartialEq for Sections {
    fn eq(&self, other: &Self) -> bool {
        let holds = |sections: &Self, other: &Self| {
            sections.0.iter().all(|s| match other.get(s.name()) {
                Some(o) => s.eq_dyn(o),
                None => s.is_default(),
            })
        };
        holds(self, other) && holds(other, self)
    }
}

impl Sections {
    pub(super) fn get(&self, name: &str) -> Option<&dyn DynSection> {
        self.0.iter().find(|s| s.name() == name).map(|s| &**s)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &dyn DynSection> {
        self.0.iter().map(|s| &**s)
    }

    pub(super) fn section<S: Section>(&self) -> Cow<'_, S> {
        self.get(S::NAME)
            .and_then(|s| s.as_any().downcast_ref::<S>())
            .map_or_else(|| Cow::Owned(S::default()), Cow::Borrowed)
    }

    pub(super) fn section_mut<S: Section>(&mut self) -> &mut S {
        let at = match self.0.iter().position(|s| s.name() == S::NAME) {
            Some(at) => at,
            None => {
                self.0.push(Box::new(S::default()));
                self.0.len() - 1
            }
        };
        self.0[at]
            .as_any_mut()
            .downcast_mut::<S>()
            .unwrap_or_else(|| panic!("two section types are named {:?}", S::NAME))
    }

    pub(super) fn put(&mut self, section: Box<dyn DynSection>) {
        match self.0.iter().position(|s| s.name() == section.name()) {
            Some(at) => self.0[at] = section,
            None => self.0.push(section),
        }
    }
}

/// How the loader handles one registered section.
#[derive(Clone, Copy)]
struct Entry {
    name: &'static str,
    list_keys: &'static [&'static str],
    defaults: fn() -> Result<config::Config, config::ConfigError>,
    parse: fn(&config::Config) -> Result<Box<dyn DynSection>, config::ConfigError>,
}

impl Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The sections a process reads, and which one (if any) is its own
/// service's: [`Config::load`] reads and validates these, accepts the
/// other [`SERVICE_SECTIONS`] unread, and refuses any other key.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
    own: Option<&'static str>,
}

impl Registry {
    /// No section: the runtime's keys only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also reads section `S`.
    pub fn with<S: Section>(mut self) -> Self {
        if !self.entries.iter().any(|e| e.name == S::NAME) {
            self.entries.push(Entry {
                name: S::NAME,
                list_keys: S::LIST_KEYS,
                defaults: || config::Config::try_from(&BTreeMap::from([(S::NAME, S::default())])),
                parse: |built| {
                    let section: S = built.get(S::NAME)?;
                    Ok(Box::new(section))
                },
            });
        }
        self
    }

    /// Reads section `S` as the section of the service this process runs
    /// on its own: `--check-config` also makes `S`'s own-process checks.
    pub fn own<S: Section>(mut self) -> Self {
        self = self.with::<S>();
        self.own = Some(S::NAME);
        self
    }

    /// The registered sections' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    /// The section of the service this process runs on its own, if any.
    pub fn own_section(&self) -> Option<&'static str> {
        self.own
    }

    pub(super) fn is_registered(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// The sections' defaults, each as a source under its name.
    pub(super) fn defaults(&self) -> Result<Vec<config::Config>, ConfigError> {
        self.entries
            .iter()
            .map(|e| (e.defaults)().map_err(|err| ConfigError::Invalid(err.to_string())))
            .collect()
    }

    /// `section.key` of every list-valued key.
    pub(super) fn list_keys(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|e| e.list_keys.iter().map(move |k| format!("{}.{k}", e.name)))
            .collect()
    }

    /// Reads each registered section from the layered sources.
    pub(super) fn parse(&self, built: &config::Config) -> Result<Sections, config::ConfigError> {
        let mut sections = Sections::default();
        for entry in &self.entries {
            sections.put((entry.parse)(built)?);
        }
        Ok(sections)
    }
}
