//! The livemesh shared runtime.
//!
//! Everything a service needs that is not its own domain lives here, once:
//! layered configuration ([`config`]), tracing and OpenTelemetry
//! ([`telemetry`]), the gRPC server bootstrap with health and reflection
//! ([`server`]), graceful shutdown ([`shutdown`]) and the one client stack
//! that every inter-service client goes through ([`client`]).

pub mod auth;
pub mod breaker;
pub mod check;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod metrics;
pub mod resilience;
pub mod rooms;
pub mod rpc_telemetry;
pub mod server;
pub mod shutdown;
pub mod sql;
pub mod telemetry;

pub use client::{ClientStack, MeshChannel};
pub use config::{CommonArgs, Config};
pub use server::{ServerBuilder, ServiceSet};
pub use shutdown::{Shutdown, ShutdownSignal};

/// mimalloc for every livemesh process (each links this crate). A subscribe
/// node holds 100,000 long-lived streams whose small allocations interleave
/// with transient per-frame buffers; glibc's malloc fragmented that into
/// about 9.7 KB of RSS per idle stream, mimalloc keeps it near 2.7 KB and
/// makes every allocation-heavy path cheaper (bench fanout: 2-3x the
/// deliveries per second on the same machine).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The error type carried through tower stacks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// FNV-1a of `bytes`: a stable (across processes and builds) hash for
/// spreading keys over shards, lanes and sub-accounts.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

pub mod main_shape;
pub use main_shape::run_service_main;

/// The status of an RPC whose implementation is owned by a later piece of
/// work: names the RPC and what will implement it, so a caller knows it is
/// not a fault of theirs.
pub fn not_yet_implemented(rpc: &str, owner: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{rpc} is not implemented in this build yet; it arrives with {owner}"
    ))
}
