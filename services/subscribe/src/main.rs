//! `livemesh-subscribe`: one subscribe node as its own process.

livemesh_mesh::service_main!(
    /// Serve viewers' room subscriptions (one subscribe node). Needs the shared
    /// hot store (`--redis-url`), where dispatchers find the node.
    "subscribe",
    livemesh_subscribe::config_sections(),
    |config| async move {
        let store = livemesh_fanout::connect(&config)?;
        if store.is_memory() {
            tracing::warn!(
                "no redis_url: this node registers rooms in its own memory, where no \
                 dispatcher of another process can find it; set --redis-url"
            );
        }
        livemesh_subscribe::SubscribeNode::from_config(&config, store)
    }
);
