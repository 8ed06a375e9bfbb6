//! The chaos of `scripts/topology --check` (issue 16): while the workload
//! runs, one replica of every service is SIGKILLed and restarted with the
//! environment it was started with, the Redis Cluster master holding a
//! room's slot is SIGKILLed (its replica takes over, the old master comes
//! back as a replica), and MariaDB is SIGKILLed and restarted on its data.
//!
//! Restarted services are this process's children: at the end they get
//! SIGTERM and must drain and exit 0, as `scripts/topology` requires of the
//! processes it started; the names of those it replaced go to the file the
//! topology names (`chaos_replaced`), so the script expects their first
//! incarnation to have died of SIGKILL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::ClientStack;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Process;

/// How long a restarted process or server may take to serve again.
const BACK_WITHIN: Duration = Duration::from_secs(60);

/// A restarted process exited before it served.
#[derive(Debug)]
struct Exited(String);

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Exited {}

/// One Redis Cluster node of the topology.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RedisNode {
    pub port: u16,
    /// Holds its `redis.conf` (`redis-server CONF` restarts it, daemonized,
    /// on the same port and identity) and `redis.pid`.
    pub dir: PathBuf,
}

/// What the chaos did, with when (seconds since the workload began).
pub struct Chaos {
    started: Instant,
    health: ClientStack,
    /// Where the names of the replaced processes go, for `scripts/topology`.
    replaced_file: Option<PathBuf>,
    /// Services restarted by the chaos: (name, child).
    children: Vec<(String, tokio::process::Child)>,
    /// What was killed, when, and how it came back.
    pub events: Vec<String>,
}

impl Chaos {
    pub fn new(started: Instant, health: ClientStack, replaced_file: Option<PathBuf>) -> Self {
        Self {
            started,
            health,
            replaced_file,
            children: Vec::new(),
            events: Vec::new(),
        }
    }

    fn at(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&mut self, event: String) {
        println!("chaos: {event}");
        self.events.push(event);
    }

    /// SIGKILLs `process` and starts it again with its own environment;
    /// returns once it serves (its health port says SERVING).
    pub async fn kill_and_restart(&mut self, process: &mut Process) -> anyhow::Result<()> {
        let killed_at = self.at();
        let old_pid = process.pid;
        match self.children.iter_mut().find(|(n, _)| *n == process.name) {
            // A second kill of a process this chaos restarted.
            Some((_, child)) => {
                child.start_kill()?;
                child.wait().await?;
            }
            None => {
                signal(old_pid, "KILL")?;
                until_gone(old_pid).await?;
            }
        }
        let env = read_env(Path::new(&process.env_file))?;
        let restarted_at = self.at();
        // As a kubelet would: a restart that exits at once (a port of the
        // dead process still taken, say) is restarted again.
        let mut starts = 0;
        loop {
            starts += 1;
            let mut child = self.spawn(process, &env)?;
            process.pid = child.id().context("the restarted process has no pid")?;
            let serving = self.serving(process, &mut child).await;
            self.children.retain(|(n, _)| *n != process.name);
            self.children.push((process.name.clone(), child));
            self.record_replaced()?;
            match serving {
                Ok(()) => break,
                Err(exited) if starts < 10 && exited.is::<Exited>() => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => return Err(err),
            }
        }
        let serving_at = self.at();
        self.note(format!(
            "+{killed_at:.1}s SIGKILL {} (pid {old_pid}); restarted at +{restarted_at:.1}s as pid {}{}, SERVING at +{serving_at:.1}s",
            process.name,
            process.pid,
            if starts > 1 { format!(" (start {starts}: the earlier ones exited at once)") } else { String::new() }
        ));
        Ok(())
    }

    fn spawn(
        &self,
        process: &Process,
        env: &[(String, String)],
    ) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&process.log)
            .with_context(|| format!("opening {}", process.log))?;
        tokio::process::Command::new(&process.bin)
            .env_clear()
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("restarting {} ({})", process.name, process.bin))
    }

    /// Waits until the restarted `process` says SERVING on its health port;
    /// fails with [`Exited`] if it exits first.
    async fn serving(
        &self,
        process: &Process,
        child: &mut tokio::process::Child,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + BACK_WITHIN;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(anyhow::Error::new(Exited(format!(
                    "{} exited with {status} right after its restart; see {}",
                    process.name, process.log
                ))));
            }
            // A fresh channel each time: no breaker remembers the refusals
            // of the process's start-up.
            let mut client = HealthClient::new(self.health.channel(&process.health)?);
            let answer = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if matches!(
                answer.as_ref().map(|r| r.get_ref().status()),
                Ok(ServingStatus::Serving)
            ) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not serve again within {BACK_WITHIN:?} of its restart ({answer:?}); see {}",
                    process.name,
                    process.log
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the Redis Cluster master that holds `key`'s slot, waits
    /// until one of its replicas serves the slot, then restarts the old
    /// master and waits until it is that replica's replica.
    pub async fn fail_over_master(&mut self, nodes: &[RedisNode], key: &str) -> anyhow::Result<()> {
        let any = nodes.first().context("the topology lists no Redis node")?;
        let slot: u16 =
            redis_query(any.port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await?;
        let owner = slot_owner(any.port, slot)
            .await?
            .with_context(|| format!("no master serves slot {slot}"))?;
        let victim = nodes.iter().find(|n| n.port == owner).with_context(|| {
            format!("the master of slot {slot} (port {owner}) is not in the topology")
        })?;
        let witness = nodes
            .iter()
            .find(|n| n.port != owner)
            .context("a cluster of one node")?;
        let pid = read_pid(&victim.dir.join("redis.pid"))?;
        let killed_at = self.at();
        signal(pid, "KILL")?;
        until_gone(pid).await?;
        let deadline = Instant::now() + BACK_WITHIN;
        let promoted = loop {
            if let Ok(Some(port)) = slot_owner(witness.port, slot).await
                && port != owner
                && cluster_ok(witness.port).await
            {
                break port;
            }
            ensure!(
                Instant::now() < deadline,
                "no replica took over slot {slot} within {BACK_WITHIN:?} of killing its master (port {owner})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let promoted_at = self.at();
        // The config daemonizes; its pid file names the new process, which
        // the harness's stop_servers reads.
        let status = tokio::process::Command::new("redis-server")
            .arg(victim.dir.join("redis.conf"))
            .args(["--repl-diskless-sync-delay", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("restarting redis-server")?;
        ensure!(
            status.success(),
            "redis-server {}: {status}",
            victim.dir.display()
        );
        let deadline = Instant::now() + BACK_WITHIN;
        loop {
            let info: anyhow::Result<String> =
                redis_query(owner, redis::cmd("INFO").arg("replication")).await;
            if let Ok(info) = info
                && info.contains("role:slave")
                && info.contains("master_link_status:up")
                && info.contains(&format!("master_port:{promoted}"))
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the old master (port {owner}) did not come back as a replica of port {promoted} within {BACK_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let back_at = self.at();
        self.note(format!(
            "+{killed_at:.1}s SIGKILL Redis master 127.0.0.1:{owner} (pid {pid}, slot {slot} of {key}); its replica 127.0.0.1:{promoted} took over at +{promoted_at:.1}s; the old master back as its replica at +{back_at:.1}s"
        ));
        Ok(())
    }

    /// SIGKILLs MariaDB and starts it again on its data; returns once
    /// `url` accepts connections.
    pub async fn kill_and_restart_mariadb(
        &mut self,
        pidfile: &Path,
        cnf: &Path,
        url: &str,
    ) -> anyhow::Result<()> {
        let pid = read_pid(pidfile)?;
        let killed_at = self.at();
        signal(pid, "KILL")?;
        until_gone(pid).await?;
        // Not kept as a child: the harness stops it by its pid file.
        let _detached = tokio::process::Command::new("mariadbd")
            .arg(format!("--defaults-file={}", cnf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("restarting mariadbd")?;
        let deadline = Instant::now() + BACK_WITHIN;
        loop {
            let answer = async {
                let db = sqlx::mysql::MySqlPool::connect(url).await?;
                let one: (i64,) = sqlx::query_as("SELECT 1").fetch_one(&db).await?;
                db.close().await;
                anyhow::Ok(one.0)
            }
            .await;
            if answer.is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "MariaDB did not accept connections within {BACK_WITHIN:?} of its restart: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let back_at = self.at();
        self.note(format!(
            "+{killed_at:.1}s SIGKILL MariaDB (pid {pid}); restarted on its data, accepting connections at +{back_at:.1}s"
        ));
        Ok(())
    }

    /// SIGTERM to every process the chaos restarted; each must drain and
    /// exit 0 within 15 s. Records their names for `scripts/topology`.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.children.iter().map(|(n, _)| n.clone()).collect();
        let mut failed = Vec::new();
        for (name, child) in &mut self.children {
            if let Some(pid) = child.id() {
                signal(pid, "TERM")?;
            }
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => failed.push(format!("{name} exited with {status} after SIGTERM")),
                Ok(Err(err)) => failed.push(format!("{name}: {err}")),
                Err(_) => {
                    let _ = child.start_kill();
                    failed.push(format!("{name} did not stop within 15 s of SIGTERM"));
                }
            }
        }
        ensure!(
            failed.is_empty(),
            "restarted processes: {}",
            failed.join("; ")
        );
        if !names.is_empty() {
            println!(
                "the restarted processes ({}) drained and exited 0 on SIGTERM",
                names.join(", ")
            );
        }
        Ok(())
    }
}

impl Chaos {
    /// Writes the names of the processes replaced so far (at once: the
    /// script must know even if the check fails later).
    fn record_replaced(&self) -> anyhow::Result<()> {
        if let Some(file) = &self.replaced_file {
            let names: String = self
                .children
                .iter()
                .map(|(n, _)| format!("{n}\n"))
                .collect();
            std::fs::write(file, names).with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(())
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

/// Waits until `pid` is gone or a zombie (its sockets are closed either way).
async fn until_gone(pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(stat) => {
                // The state follows the parenthesised command name.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|rest| rest.split_whitespace().next());
                if matches!(state, Some("Z" | "X")) {
                    return Ok(());
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "pid {pid} still runs 10 s after SIGKILL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_pid(file: &Path) -> anyhow::Result<u32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a pid: {text:?}", file.display()))
}

/// A process's environment as `scripts/topology` wrote it: NUL-separated
/// `KEY=VALUE` pairs.
fn read_env(file: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    bytes
        .split(|&b| b == 0)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let pair = String::from_utf8(pair.to_vec())?;
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("{}: {pair:?} is not KEY=VALUE", file.display()))?;
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

async fn redis_query<T: redis::FromRedisValue>(
    port: u16,
    cmd: &mut redis::Cmd,
) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("connecting to Redis timed out")??;
    Ok(
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
            .await
            .context("a Redis command timed out")??,
    )
}

/// The port of the live master serving `slot`, as the node at `port` sees it.
async fn slot_owner(port: u16, slot: u16) -> anyhow::Result<Option<u16>> {
    let nodes: String = redis_query(port, redis::cmd("CLUSTER").arg("NODES")).await?;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, addr, flags, .., link] = fields[..fields.len().min(8)] else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master")
            || flags.iter().any(|f| f.starts_with("fail"))
            || link != "connected"
        {
            continue;
        }
        let serves = fields.iter().skip(8).any(|range| {
            let mut ends = range.splitn(2, '-').map(str::parse::<u16>);
            match (ends.next(), ends.next()) {
                (Some(Ok(first)), Some(Ok(last))) => (first..=last).contains(&slot),
                (Some(Ok(only)), None) => only == slot,
                _ => false,
            }
        });
        if serves {
            let port = addr
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("CLUSTER NODES: bad address {addr}"))?;
            return Ok(Some(port));
        }
    }
    Ok(None)
}

async fn cluster_ok(port: u16) -> bool {
    let info: anyhow::Result<String> = redis_query(port, redis::cmd("CLUSTER").arg("INFO")).await;
    info.is_ok_and(|info| info.contains("cluster_state:ok"))
}
