//! `livemesh-publish`: one dispatcher as its own process.

livemesh_mesh::service_main!(
    /// Serve the dispatcher that fans room events out to the subscribe nodes
    /// holding viewers of each room. Needs the shared hot store (`--redis-url`),
    /// where the nodes register.
    "publish",
    livemesh_publish::config_sections(),
    |config| async move {
        let store = livemesh_fanout::connect(&config)?;
        if store.is_memory() {
            tracing::warn!(
                "no redis_url: this dispatcher looks for subscribe nodes in its own memory, \
                 where no node of another process registers; set --redis-url"
            );
        }
        livemesh_publish::Dispatcher::from_config(&config, store)
    }
);
