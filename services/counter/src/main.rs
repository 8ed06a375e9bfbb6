//! `livemesh-counter`: the love counter as its own process.

livemesh_mesh::service_main!(
    /// Serve the love counter. Point --redis-url at Redis (several
    /// comma-separated URLs for a Cluster) and --database-url at the SQL
    /// database for final totals; set counter.ongoing_query_url and
    /// counter.publish_url in the config file.
    "counter",
    livemesh_counter::config_sections(),
    |config| async move {
        livemesh_counter::Counter::from_config(&config).await
    }
);
