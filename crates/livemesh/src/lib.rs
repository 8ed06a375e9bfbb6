//! The all-in-one livemesh: every service in one process on one port, on
//! the embedded default (SQLite under the data dir, the in-process hot
//! store). The scripted demo and the benchmarks live in `crates/lab`
//! (the default `lab` feature).

pub mod health;
pub mod ledger_csv;

use livemesh_counter::Counter;
use livemesh_gift_settler::GiftSettler;
use livemesh_mesh::Config;
use livemesh_mesh::server::{ServerBuilder, ServiceSet};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_publish::Dispatcher;
use livemesh_subscribe::SubscribeNode;

/// The config sections the all-in-one reads: every service's, none its own
/// (as one process it calls its siblings at its own address).
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new()
        .with::<livemesh_counter::CounterConfig>()
        .with::<livemesh_gift_settler::GiftsConfig>()
        .with::<livemesh_ongoing_query::RoomsConfig>()
        .with::<livemesh_subscribe::SubscribeConfig>()
        .with::<livemesh_publish::PublishConfig>()
        .with::<livemesh_fanout::FanoutConfig>()
}

/// All five services, built from one config.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub ongoing_query: OngoingQuery,
    pub subscribe: SubscribeNode,
    pub publish: Dispatcher,
    pub counter: Counter,
    pub gift_settler: GiftSettler,
}

impl Mesh {
    /// Opens every service's stores as `config` says (SQLite files under
    /// `data_dir` unless database URLs are given). `config.listen` must be
    /// the address the mesh is served on: the services call each other there.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the data dir {}: {e} (choose another with --data-dir)",
                config.data_dir.display()
            )
        })?;
        // One in-process fan-out store (unless Redis is configured) shared
        // by the node and the dispatcher of this process.
        let fanout = livemesh_fanout::connect(config)?;
        Ok(Self {
            ongoing_query: OngoingQuery::from_config(config).await?,
            subscribe: SubscribeNode::from_config(config, fanout.clone())?,
            publish: Dispatcher::from_config(config, fanout)?,
            counter: Counter::from_config(config).await?,
            gift_settler: GiftSettler::from_config(config).await?,
        })
    }
}

impl ServiceSet for Mesh {
    fn register(&self, server: &mut ServerBuilder) {
        self.ongoing_query.register(server);
        self.subscribe.register(server);
        self.publish.register(server);
        self.counter.register(server);
        self.gift_settler.register(server);
    }
}

/// `livemesh demo`: the lab's scripted broadcast against this mesh.
#[cfg(feature = "lab")]
pub mod demo {
    pub use livemesh_lab::demo::{Broadcast, DemoArgs};

    use super::Mesh;

    /// Runs the demo as `args` says.
    pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
        livemesh_lab::demo::run(
            args,
            |config| async move { Mesh::from_config(&config).await },
        )
        .await
    }
}
