//! `livemesh-ongoing-query`: the rooms service as its own process.

livemesh_mesh::service_main!(
    /// Serve room starts and ends (RoomAdmin) and the cache of ongoing rooms
    /// (OngoingQuery). Point --database-url at the local region's rooms
    /// database; further regions go in the config file's [[rooms.regions]].
    "ongoing-query",
    livemesh_ongoing_query::config_sections(),
    |config| async move {
        livemesh_ongoing_query::OngoingQuery::from_config(&config).await
    }
);
