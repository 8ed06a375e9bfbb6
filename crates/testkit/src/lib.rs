//! Test helpers shared by every crate's tests: the private servers that
//! `scripts/test` starts (found through `LIVEMESH_TEST_*` variables), fresh
//! databases, and livemesh servers on loopback ports.
//!
//! A test that needs a server and finds no address fails with a message
//! naming the test command; it never skips.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod mariadb;
pub mod props;
mod proxy;

pub use mariadb::PrivateMariadb;
pub use proxy::{ProxyMode, TcpProxy};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::server::{LocalServer, ServiceSet};
use livemesh_mesh::{ClientStack, MeshChannel};
use sqlx::Connection as _;

/// The command that starts the private servers and runs the tests.
pub const TEST_COMMAND: &str = "scripts/test";

/// The value of a harness variable, or a panic that says how to get it.
pub fn harness_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: this test needs the private Redis/MariaDB servers that \
             `{TEST_COMMAND}` starts. Run `{TEST_COMMAND}` (it passes extra arguments to \
             cargo nextest), or `scripts/with-servers cargo nextest run ...`."
        ),
    }
}

/// `mysql://USER:PASS@127.0.0.1:PORT` of the harness's MariaDB (binlog on).
pub fn mysql_url() -> String {
    harness_var("LIVEMESH_TEST_MYSQL_URL")
        .trim_end_matches('/')
        .to_owned()
}

/// `redis://127.0.0.1:PORT` of the harness's standalone Redis.
pub fn redis_url() -> String {
    harness_var("LIVEMESH_TEST_REDIS_URL")
}

/// The three masters of the harness's Redis Cluster.
pub fn redis_cluster_urls() -> Vec<String> {
    harness_var("LIVEMESH_TEST_REDIS_CLUSTER_URLS")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A name no other test of this run uses.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "lm_{tag}_{}_{}_{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates an empty database on the harness's MariaDB and returns its URL.
pub async fn fresh_mysql_database(tag: &str) -> String {
    let base = mysql_url();
    let name = unique_name(tag);
    let mut conn = sqlx::MySqlConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the harness's MariaDB at {base}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    format!("{base}/{name}")
}

/// Holds the harness-wide binlog lock until dropped (closing the connection
/// frees it). Tests that hold binlog positions across a pause, and the test
/// that purges binlog files, take it: nextest runs tests as separate
/// processes, so only a server-side lock serialises them.
#[derive(Debug)]
pub struct BinlogLock(#[allow(dead_code)] sqlx::MySqlConnection);

/// Takes the binlog lock (waiting up to 10 minutes).
pub async fn binlog_lock() -> BinlogLock {
    const LOCK: &str = "livemesh_binlog_tests";
    let mut conn = sqlx::MySqlConnection::connect(&mysql_url())
        .await
        .expect("connect for the binlog lock");
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 600)")
        .bind(LOCK)
        .fetch_one(&mut conn)
        .await
        .expect("GET_LOCK");
    assert_eq!(got, Some(1), "GET_LOCK({LOCK}) timed out");
    BinlogLock(conn)
}

/// Rotates the harness MariaDB's binlog and purges every older file, as an
/// operator's `PURGE BINARY LOGS` would; the caller holds the binlog lock.
/// Returns the purged files.
pub async fn purge_binlogs() -> Vec<String> {
    use sqlx::Row as _;
    let mut conn = sqlx::MySqlConnection::connect(&mysql_url())
        .await
        .expect("connect to purge binlogs");
    let files = |rows: Vec<sqlx::mysql::MySqlRow>| -> Vec<String> {
        rows.iter()
            .map(|row| row.try_get::<String, _>(0).expect("Log_name"))
            .collect()
    };
    let before = files(
        sqlx::raw_sql("SHOW BINARY LOGS")
            .fetch_all(&mut conn)
            .await
            .expect("SHOW BINARY LOGS"),
    );
    sqlx::raw_sql("FLUSH BINARY LOGS")
        .execute(&mut conn)
        .await
        .expect("FLUSH BINARY LOGS");
    let newest: String = sqlx::raw_sql("SHOW MASTER STATUS")
        .fetch_one(&mut conn)
        .await
        .expect("SHOW MASTER STATUS")
        .try_get(0)
        .expect("File");
    // The server keeps a file until its transactions are durable in InnoDB
    // (about a second with innodb_flush_log_at_trx_commit=2) and while a
    // replica still reads it: retry until the old files are gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PURGE BINARY LOGS TO '{newest}'"
        )))
        .execute(&mut conn)
        .await
        .expect("PURGE BINARY LOGS");
        let left = files(
            sqlx::raw_sql("SHOW BINARY LOGS")
                .fetch_all(&mut conn)
                .await
                .expect("SHOW BINARY LOGS"),
        );
        if before.iter().all(|file| !left.contains(file)) {
            return before;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "binlog files {before:?} were not purged within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis of the test's own, for chaos tests that kill and restart it
/// without disturbing other tests. Every write is fsynced to its append-only
/// file, so a restart keeps what Redis acknowledged.
#[derive(Debug)]
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// Starts `redis-server` (installed by `scripts/test`) on a free port.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data, and waits until
    /// it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); `{TEST_COMMAND}` installs it")
            });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut reply = [0_u8; 7];
                if socket.write_all(b"PING\r\n").await.is_ok()
                    && socket.read_exact(&mut reply).await.is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a backend-generic test keeps its SQL: a SQLite file in a temporary
/// directory, or a fresh database on the harness's MariaDB.
#[derive(Debug)]
pub enum SqlBackend {
    Sqlite(tempfile::TempDir),
    MariaDb,
}

impl SqlBackend {
    pub fn sqlite() -> Self {
        SqlBackend::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    pub fn mariadb() -> Self {
        // Fail now, with the message naming the test command, not later.
        mysql_url();
        SqlBackend::MariaDb
    }

    /// The binlog lock, for backends that have a binlog.
    pub async fn binlog_lock(&self) -> Option<BinlogLock> {
        match self {
            SqlBackend::Sqlite(_) => None,
            SqlBackend::MariaDb => Some(binlog_lock().await),
        }
    }

    /// A new, empty database of this backend.
    pub async fn database_url(&self, tag: &str) -> String {
        match self {
            SqlBackend::Sqlite(dir) => livemesh_mesh::config::sqlite_url(
                &dir.path().join(format!("{}.db", unique_name(tag))),
            ),
            SqlBackend::MariaDb => fresh_mysql_database(tag).await,
        }
    }
}

/// One test suite over every SQL backend: for each `case(backend)` given,
/// generates `sqlite::case` and `mariadb::case` tests that call it with
/// [`SqlBackend::sqlite`] and [`SqlBackend::mariadb`].
#[macro_export]
macro_rules! sql_backend_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $case() { super::$case($crate::SqlBackend::sqlite()).await })*
        }
        mod mariadb {
            $(#[tokio::test] async fn $case() { super::$case($crate::SqlBackend::mariadb()).await })*
        }
    };
}

/// Which hot store a backend-generic case runs against: the in-process
/// store, the harness's standalone Redis, or its Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotBackend {
    Memory,
    Redis,
    Cluster,
}

impl HotBackend {
    /// The `redis_url` setting that selects this backend: none for the
    /// in-process store, else the harness's Redis (a Cluster's masters
    /// joined by commas).
    pub fn redis_url(self) -> Option<String> {
        match self {
            HotBackend::Memory => None,
            HotBackend::Redis => Some(redis_url()),
            HotBackend::Cluster => Some(redis_cluster_urls().join(",")),
        }
    }
}

/// One test suite over every hot store: for each `case(backend)` given,
/// generates `memory::case`, `redis::case` and `cluster::case` tests that
/// call it with the [`HotBackend`] of that name.
///
/// A test attribute may come first (`#[tokio::test]` when none is given),
/// and the modules may be named, each with its backend, in brackets before
/// it: `hot_backend_suite!([redis_replicas: Redis] #[tokio::test] case)`.
#[macro_export]
macro_rules! hot_backend_suite {
    (@each [] #[$test:meta] $cases:tt) => {};
    (@each [$module:ident: $backend:ident $(, $rest:ident: $rest_backend:ident)*] #[$test:meta] [$($case:ident),*]) => {
        mod $module {
            $(#[$test] async fn $case() { super::$case($crate::HotBackend::$backend).await })*
        }
        $crate::hot_backend_suite!(@each [$($rest: $rest_backend),*] #[$test] [$($case),*]);
    };
    ([$($module:ident: $backend:ident),+ $(,)?] #[$test:meta] $($case:ident),* $(,)?) => {
        $crate::hot_backend_suite!(@each [$($module: $backend),+] #[$test] [$($case),*]);
    };
    ([$($module:ident: $backend:ident),+ $(,)?] $($case:ident),* $(,)?) => {
        $crate::hot_backend_suite!([$($module: $backend),+] #[tokio::test] $($case),*);
    };
    (#[$test:meta] $($case:ident),* $(,)?) => {
        $crate::hot_backend_suite!([memory: Memory, redis: Redis, cluster: Cluster] #[$test] $($case),*);
    };
    ($($case:ident),* $(,)?) => {
        $crate::hot_backend_suite!(#[tokio::test] $($case),*);
    };
}

/// Waits until `ready()` holds, polling every 10 ms; panics naming `what`
/// once `within` has passed.
pub async fn until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {} s",
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A livemesh server on a free loopback port, stopped when dropped.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    server: LocalServer,
}

impl TestServer {
    /// Serves `set` on `127.0.0.1:0`.
    pub async fn start(set: impl ServiceSet + Send + 'static) -> Self {
        Self::start_with(|_| async { Ok(set) }).await
    }

    /// Binds `127.0.0.1:0`, builds the set knowing the bound address (for
    /// services of one process that call each other), then serves it.
    pub async fn start_with<S, F>(build: impl FnOnce(SocketAddr) -> F) -> Self
    where
        S: ServiceSet + Send + 'static,
        F: Future<Output = anyhow::Result<S>>,
    {
        let server = LocalServer::bind_then(SocketAddr::from(([127, 0, 0, 1], 0)), build)
            .await
            .expect("start a server on a loopback port");
        Self {
            addr: server.addr(),
            server,
        }
    }

    /// `http://ADDR`: the URL other services' settings name this server by.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to this server through the mesh's client stack.
    pub fn channel(&self) -> MeshChannel {
        ClientStack::new(&ClientConfig::default())
            .channel(&self.server.uri())
            .expect("loopback uri")
    }

    /// A channel whose calls come from the mesh service `service` (dev
    /// mode: the unsigned `Dev <service>` credential), for calls only a
    /// service may make (a gift's event, as the gift-settler).
    pub fn channel_as(&self, service: &str) -> MeshChannel {
        ClientStack::new(&ClientConfig::default())
            .secured(&livemesh_mesh::auth::Security::dev(), service)
            .expect("dev mode needs no secret")
            .channel(&self.server.uri())
            .expect("loopback uri")
    }

    /// Stops the server and waits until it has drained.
    pub async fn stop(self) {
        self.server
            .stop()
            .await
            .expect("test server stopped cleanly");
    }
}

/// A CA and one certificate it signed (for `127.0.0.1` and `localhost`,
/// usable by servers and clients), written as PEM files into `dir`: the
/// `[auth]` TLS settings of a mesh whose services speak mutual TLS.
pub fn mesh_certificates(dir: &std::path::Path) -> livemesh_mesh::auth::AuthConfig {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "livemesh test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, "livemesh service");
    let cert = params.signed_by(&key, &issuer).unwrap();

    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    livemesh_mesh::auth::AuthConfig {
        tls_ca: write("ca.pem", ca_cert.pem()),
        tls_cert: write("service.pem", cert.pem()),
        tls_key: write("service.key", key.serialize_pem()),
        ..livemesh_mesh::auth::AuthConfig::default()
    }
}

/// Starts a room for `anchor_id` through `RoomAdmin` on `channel` (an
/// ongoing-query server, or any server carrying it) and returns its id.
pub async fn start_room(channel: MeshChannel, anchor_id: u64) -> u64 {
    use livemesh_proto::v1::StartRoomRequest;
    use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
    RoomAdminServiceClient::new(channel)
        .start_room(StartRoomRequest { anchor_id })
        .await
        .expect("StartRoom")
        .into_inner()
        .room
        .expect("StartRoom answered without a room")
        .room_id
}

/// Ends room `room_id` through `RoomAdmin` on `channel`.
pub async fn end_room(channel: MeshChannel, room_id: u64) {
    use livemesh_proto::v1::EndRoomRequest;
    use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
    RoomAdminServiceClient::new(channel)
        .end_room(EndRoomRequest { room_id })
        .await
        .expect("EndRoom");
}

/// Where most service tests start: a temporary data directory, the default
/// configuration keeping its data there, and an ongoing-query server on it
/// (see [`ongoing_query`]).
pub async fn config_with_rooms() -> (tempfile::TempDir, livemesh_mesh::Config, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rooms = ongoing_query(dir.path()).await;
    let config = config_in(dir.path());
    (dir, config, rooms)
}

/// The default configuration, keeping its data in `dir`.
pub fn config_in(dir: &std::path::Path) -> livemesh_mesh::Config {
    livemesh_mesh::Config {
        data_dir: dir.to_owned(),
        ..livemesh_mesh::Config::default()
    }
}

/// An ongoing-query server on a loopback port whose rooms live in `dir` (the
/// default configuration's SQLite database there): the rooms a service's
/// tests start and end.
pub async fn ongoing_query(dir: &std::path::Path) -> TestServer {
    TestServer::start(
        livemesh_ongoing_query::OngoingQuery::from_config(&config_in(dir))
            .await
            .expect("start ongoing-query"),
    )
    .await
}
