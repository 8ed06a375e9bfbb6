//! `livemesh-gift-settler`: gifts and settlement as their own process.

livemesh_mesh::service_main!(
    /// Serve gifts, balances and settlement.
    "gift-settler",
    livemesh_gift_settler::config_sections(),
    |config| async move {
        livemesh_gift_settler::GiftSettler::from_config(&config).await
    }
);
