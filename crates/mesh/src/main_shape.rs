//! The one shape of a service's `main`: config, telemetry, build, bind,
//! serve until SIGTERM/Ctrl-C, drain under a timeout.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{CommonArgs, Config, Registry};
use crate::server::{ServerBuilder, ServiceSet, bind};
use crate::shutdown::{os_signal, run_with_drain};

/// Runs one service as its own process. `build` turns the loaded config into
/// the service (connecting to its databases); any failure is printed with
/// its cause and the process exits non-zero. With `--check-config` it only
/// checks the configuration ([`crate::check`]) and exits. `sections` are
/// the config sections the service reads, its own marked (see
/// [`Registry::own`]).
pub async fn run_service_main<S, F>(
    name: &'static str,
    sections: &Registry,
    args: &CommonArgs,
    build: impl FnOnce(Config) -> F,
) -> ExitCode
where
    S: ServiceSet + Send + 'static,
    F: Future<Output = anyhow::Result<S>>,
{
    if args.check_config {
        return crate::check::run(name, sections, args);
    }
    let config = match args.load(sections) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match crate::telemetry::init(&config.telemetry, name) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{name}: {err:#}");
            return ExitCode::from(2);
        }
    };
    match serve(config, build).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("{name}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<S, F>(config: Config, build: impl FnOnce(Config) -> F) -> anyhow::Result<()>
where
    S: ServiceSet + Send + 'static,
    F: Future<Output = anyhow::Result<S>>,
{
    let drain = Duration::from_millis(config.shutdown.drain_timeout_ms);
    // Bound first, so the service knows its own address (port 0 resolved):
    // the all-in-one binary's services call each other through it.
    let listener = bind(config.listen).await?;
    let config = Config {
        listen: listener.local_addr()?,
        ..config
    };
    let limits = config.server.clone();
    let health = match limits.health_listen.as_str() {
        "" => None,
        addr => {
            let addr = addr.parse().map_err(|e| {
                anyhow::anyhow!(
                    "server.health_listen {addr:?} is not an address like 0.0.0.0:50052: {e}"
                )
            })?;
            Some(bind(addr).await?)
        }
    };
    let service = build(config).await?;
    run_with_drain(
        |signal| async move {
            let mut server = ServerBuilder::new();
            server.limits(&limits);
            if let Some(health) = health {
                server.health_listener(health);
            }
            service.register(&mut server);
            server.serve(listener, signal).await
        },
        os_signal(),
        drain,
    )
    .await
}

/// A service binary's whole `main.rs`: the `Args` of the common flags (the
/// doc comment given first is the binary's `--help` text) and a `main` that
/// runs `build` through [`run_service_main`] with the config sections
/// `sections` names. The invoking crate depends on
/// `clap` and `tokio` (the derive and `#[tokio::main]` expand there).
///
/// ```ignore
/// livemesh_mesh::service_main!(
///     /// Serve the love counter.
///     "counter",
///     livemesh_counter::config_sections(),
///     |config| async move { livemesh_counter::Counter::from_config(&config).await }
/// );
/// ```
#[macro_export]
macro_rules! service_main {
    ($(#[$meta:meta])* $name:literal, $sections:expr, $build:expr $(,)?) => {
        $(#[$meta])*
        #[derive(Debug, clap::Parser)]
        #[command(version)]
        struct Args {
            #[command(flatten)]
            common: $crate::CommonArgs,
        }

        #[tokio::main]
        async fn main() -> std::process::ExitCode {
            let args = <Args as clap::Parser>::parse();
            $crate::run_service_main($name, &$sections, &args.common, $build).await
        }
    };
}
