//! The livemesh shared runtime.
//!
//! Everything a service needs that is not its own domain lives here, once:
//! layered configuration ([`config`]), tracing and OpenTelemetry
//! ([`telemetry`]), the gRPC server bootstrap with health and reflection
//! ([`server`]), graceful shutdown ([`shutdown`]) and the one client stack
//! that every inter-service client goes through ([`client`]).

pub mod auth;
pub mod backoff;
pub mod breaker;
pub mod check;
pub mod client;
pub mod config;
pub mod metrics;
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

/// Locks `mutex`, taking the data even if a holder panicked: every critical
/// section in livemesh leaves its data whole at each step, so a poisoned
/// lock still guards valid data (and one panic must not take the service
/// down with it).
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// How much of a client's input an error message may quote: at most this
/// many characters, and at most [`EXCERPT_BYTES`] bytes once escaped.
pub const EXCERPT_CHARS: usize = 64;
/// See [`EXCERPT_CHARS`].
pub const EXCERPT_BYTES: usize = 256;

/// A short, quoted excerpt of client input for an error message: at most
/// [`EXCERPT_CHARS`] characters (escaped like `{:?}`, cut on a character
/// boundary, at most [`EXCERPT_BYTES`] bytes), followed by the input's size
/// when it was cut. Whatever a client sends, the message stays short: a
/// status travels in a response header, and echoing a 100 KB field there
/// makes clients fail on the header's size instead of reading the error.
pub fn excerpt(input: &str) -> String {
    let mut out = String::from("\"");
    for (taken, c) in input.chars().enumerate() {
        let escaped = c.escape_debug();
        if taken == EXCERPT_CHARS || out.len() + escaped.len() > EXCERPT_BYTES {
            out.push_str(&format!("\"… ({} bytes)", input.len()));
            return out;
        }
        out.extend(escaped);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod excerpt_tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(excerpt("abc"), "\"abc\"");
        assert_eq!(excerpt(""), "\"\"");
    }

    #[test]
    fn long_input_is_cut_on_a_character_boundary_with_its_size() {
        let long = "é".repeat(100_000);
        let shown = excerpt(&long);
        assert!(
            shown.starts_with(&format!("\"{}\"…", "é".repeat(EXCERPT_CHARS))),
            "{shown}"
        );
        assert!(shown.ends_with("(200000 bytes)"), "{shown}");
        assert!(shown.len() < 200, "{}", shown.len());
        // Escapes count once per character: a cut input never grows past
        // a few hundred bytes.
        let controls = "\u{10ffff}".repeat(10_000);
        assert!(
            excerpt(&controls).len() <= EXCERPT_BYTES + 24,
            "{}",
            excerpt(&controls)
        );
    }
}
