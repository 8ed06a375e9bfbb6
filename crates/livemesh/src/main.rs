//! `livemesh`: the whole mesh in one process (`up`) and the tools to run it
//! (`config check`, `health`, `ledger-export`, `token`, `top`); with the default
//! `lab` feature also the lab's commands (`demo`, `bench`, `topology-check`,
//! from `crates/lab`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use livemesh::{Mesh, health, ledger_csv};
use livemesh_mesh::CommonArgs;

/// livemesh: the interaction backend of a live-streaming platform (loves,
/// comments, gifts and viewer counts for live rooms) as a mesh of gRPC
/// services. This binary runs all of them in one process on the embedded
/// default: SQLite files under the data dir and an in-process hot store.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every livemesh service on one port until SIGTERM or Ctrl-C.
    ///
    /// Health (grpc.health.v1) reports SERVING for each fully-qualified
    /// service name, and server reflection lists them all, so
    /// `grpcurl -plaintext 127.0.0.1:50051 list` works without .proto files.
    Up {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask servers whether they serve (grpc.health.v1), through the mesh's
    /// client stack (TLS and client certificates as configured). Exits 0
    /// when every --addr reports SERVING within --wait-secs.
    #[command(after_help = "Examples:\n  \
        livemesh health --addr http://127.0.0.1:50051\n  \
        livemesh health --config /etc/livemesh/config/livemesh.toml \\\n      \
        --addr https://livemesh-counter:50051 --addr https://livemesh-publish:50051")]
    Health {
        #[command(flatten)]
        common: CommonArgs,
        /// A server to check, `http(s)://HOST:PORT` (`http://` is assumed
        /// without a scheme); repeat for several.
        #[arg(long = "addr", value_name = "URL")]
        addrs: Vec<String>,
        /// The service to ask about (e.g. livemesh.v1.CounterService); the
        /// default, "", asks about the server as a whole.
        #[arg(long, value_name = "NAME", default_value = "")]
        service: String,
        /// How long to keep asking a server that is not serving yet.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        wait_secs: u64,
    },
    /// A live view of a running mesh, read from its services' Prometheus
    /// endpoints: viewers, loves/s and the total, comments, gifts and
    /// deliveries per second, the per-hop latencies (p50/p99 over each
    /// refresh), queue drops, load shed and circuit breakers. Redrawn in
    /// place on a terminal, one plain line per refresh otherwise.
    #[command(after_help = "Examples:\n  \
        livemesh up --metrics-listen 127.0.0.1:9464 &\n  \
        livemesh top --metrics http://127.0.0.1:9464/metrics\n  \
        livemesh top --metrics http://10.0.0.5:9464,http://10.0.0.6:9464 --plain | tee top.log")]
    Top {
        /// Metrics endpoints, comma-separated or repeated: every pod of a
        /// deployment, summed (`http://HOST:PORT[/PATH]`; the path
        /// defaults to /metrics).
        #[arg(long, value_name = "URL[,URL...]", required = true)]
        metrics: Vec<String>,
        /// Time between refreshes.
        #[arg(long, value_name = "MS", default_value_t = 500)]
        interval_ms: u64,
        /// Stop after N refreshes [default: until Ctrl-C].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Plain lines even on a terminal.
        #[arg(long)]
        plain: bool,
    },
    /// The lab: `topology-check`, `demo` and `bench` (crates/lab).
    #[cfg(feature = "lab")]
    #[command(flatten)]
    Lab(livemesh_lab::LabCommand),
    /// Write the gift ledger as CSV (SettlementService.ExportLedger).
    ///
    /// One row per ledger entry of every balance shard of the server at
    /// --addr, shard by shard, in the order they were written. Each transfer
    /// has two entries with its transfer_id: the debit (negative amount) and
    /// the credit (positive), so the amounts of a complete export sum to 0.
    ///
    /// Columns: transfer_id,shard,account,amount,kind,created_at. amount is
    /// in the smallest currency unit; kind says what moved the money
    /// (deposit, gift; settle-out, cut and settle-in when a room is settled);
    /// created_at is RFC 3339 in UTC with milliseconds
    /// (2026-11-22T10:00:00.250Z). RFC 4180: the first line is the header,
    /// lines end in CRLF, and a field holding a comma, a double quote or a
    /// line break is quoted with its quotes doubled.
    ///
    /// TIME is RFC 3339 with a time zone (2026-11-22T10:00:00Z,
    /// 2026-11-22T11:00:00.250+01:00) or milliseconds since the Unix epoch
    /// (1795341600000; not seconds).
    #[command(after_help = "Examples:\n  \
        livemesh ledger-export > ledger.csv\n  \
        livemesh ledger-export --addr http://10.0.0.5:50055 \\\n      \
        --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z --out november.csv")]
    LedgerExport {
        /// The server with the SettlementService: `livemesh up` or
        /// livemesh-gift-settler (`http://` is assumed without a scheme).
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Only entries created at or after TIME [default: from the first]
        #[arg(long, value_name = "TIME", value_parser = ledger_csv::parse_time)]
        from: Option<i64>,
        /// Only entries created before TIME [default: up to now]
        #[arg(long, value_name = "TIME", value_parser = ledger_csv::parse_time)]
        to: Option<i64>,
        /// Write the CSV to FILE instead of stdout; FILE is replaced only
        /// once the whole export is written.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// A file holding a token with the `finance` role, for a mesh with
        /// auth.mode = "enforce" (sent as `authorization: Bearer <token>`).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Print a signed token for a caller outside the mesh (an operator, a
    /// BFF, a payment callback), for a mesh with auth.mode = "enforce".
    ///
    /// The token is signed with the configured secret (auth.token_secret_file
    /// or LIVEMESH_AUTH__TOKEN_SECRET) and printed on stdout alone; send it as
    /// `authorization: Bearer <token>`. Roles: bff, finance, admin, payments
    /// (and the services' own names). A viewer token (--viewer) goes in
    /// `x-livemesh-viewer`.
    #[command(after_help = "Examples:\n  \
        livemesh token --sub alice --role finance > finance.jwt\n  \
        livemesh ledger-export --token-file finance.jwt > ledger.csv")]
    Token {
        #[command(flatten)]
        common: CommonArgs,
        /// The principal's name (the token's `sub`).
        #[arg(long, value_name = "NAME")]
        sub: Option<String>,
        /// A role of the principal; repeat for several.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Make a viewer token for this user id instead.
        #[arg(long, value_name = "USER_ID", conflicts_with_all = ["sub", "roles"])]
        viewer: Option<u64>,
        /// Lifetime in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load the configuration exactly as `livemesh up` would (defaults <
    /// file < LIVEMESH_* environment < flags), validate it, read the secret
    /// and certificate files it names, and bind nothing. Exit 0 when it is
    /// usable, 2 with one line per wrong key. Every service binary does the
    /// same for its own role with `--check-config`.
    #[command(after_help = "Examples:\n  \
        livemesh config check --config /etc/livemesh/livemesh.toml\n  \
        LIVEMESH_AUTH__MODE=enforce livemesh config check\n  \
        livemesh-subscribe --check-config   # the same, as a subscribe node")]
    Check {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Up { common } => {
            livemesh_mesh::run_service_main(
                "livemesh",
                &livemesh::config_sections(),
                &common,
                |config| async move { Mesh::from_config(&config).await },
            )
            .await
        }
        Command::Config {
            command: ConfigCommand::Check { common },
        } => livemesh_mesh::check::run("livemesh", &livemesh::config_sections(), &common),
        Command::Health {
            common,
            addrs,
            service,
            wait_secs,
        } => report(
            health::run(
                &common,
                &addrs,
                &service,
                std::time::Duration::from_secs(wait_secs),
            )
            .await,
        ),
        Command::Top {
            metrics,
            interval_ms,
            count,
            plain,
        } => report(
            livemesh_live::top::run(livemesh_live::top::TopArgs {
                metrics,
                interval: std::time::Duration::from_millis(interval_ms.max(50)),
                count,
                plain,
            })
            .await,
        ),
        #[cfg(feature = "lab")]
        Command::Lab(command) => report(
            command
                .run(|config| async move { Mesh::from_config(&config).await })
                .await,
        ),
        Command::LedgerExport {
            addr,
            from,
            to,
            out,
            token_file,
        } => report(ledger_csv::run(&addr, from, to, out.as_deref(), token_file.as_deref()).await),
        Command::Token {
            common,
            sub,
            roles,
            viewer,
            ttl_secs,
        } => report(print_token(&common, sub, &roles, viewer, ttl_secs)),
    }
}

fn print_token(
    common: &CommonArgs,
    sub: Option<String>,
    roles: &[String],
    viewer: Option<u64>,
    ttl_secs: u64,
) -> anyhow::Result<()> {
    use livemesh_mesh::auth::{Claims, Security};
    // A token needs only the runtime's `auth` keys.
    let config = common.load(&livemesh_mesh::config::Registry::new())?;
    let security = Security::from_config(&config.auth)?;
    let keys = security.keys().ok_or_else(|| {
        anyhow::anyhow!(
            "no token secret is configured: set auth.token_secret_file or \
             LIVEMESH_AUTH__TOKEN_SECRET"
        )
    })?;
    let ttl = std::time::Duration::from_secs(ttl_secs);
    let claims = match (viewer, sub) {
        (Some(viewer), _) => Claims::viewer(viewer, ttl),
        (None, Some(sub)) if !roles.is_empty() => {
            let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
            Claims::new(sub, &roles, ttl)
        }
        _ => anyhow::bail!("give --sub NAME and at least one --role ROLE, or --viewer USER_ID"),
    };
    println!("{}", keys.mint(&claims)?);
    Ok(())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("livemesh: {err:#}");
            ExitCode::FAILURE
        }
    }
}
