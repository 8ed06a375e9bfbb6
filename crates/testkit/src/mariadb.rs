//! A MariaDB of the test's own, for chaos tests that kill and restart it
//! without disturbing the tests that share the harness's server.
//!
//! It is configured like the harness's (`scripts/lib/servers.sh`): binlog on
//! in ROW format, `innodb-flush-log-at-trx-commit=2` (a killed mariadbd
//! loses no committed transaction; only an OS crash could). The system
//! tables come from a template data directory that the first test of a
//! harness run creates with `mariadb-install-db` (about 4 s) under
//! `LIVEMESH_TEST_TMPDIR`, behind a file lock; every server copies it
//! (a fraction of a second). The harness's `stop_servers` sweeps any
//! mariadbd left running under that directory.

use livemesh_mesh::lock;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::Connection as _;

use crate::{TEST_COMMAND, harness_var};

const USER: &str = "livemesh";
const PASSWORD: &str = "livemesh";
/// Small redo log: the template copies fast (the default is 96 MB).
const LOG_FILE_SIZE: &str = "--innodb-log-file-size=8M";
/// Crash recovery on this 2-core machine under a parallel test run can be slow.
const READY_WITHIN: Duration = Duration::from_secs(60);

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// The template data directory, created once per harness run.
fn template() -> PathBuf {
    let base = PathBuf::from(harness_var("LIVEMESH_TEST_TMPDIR")).join("private-mariadb-template");
    std::fs::create_dir_all(&base).expect("template dir");
    let lock = std::fs::File::create(base.join("lock")).expect("template lock file");
    // Tests run as separate processes (nextest): a file lock makes one of
    // them install while the others wait.
    lock.lock().expect("lock the template");
    let data = base.join("data");
    if !base.join("ready").exists() {
        let _ = std::fs::remove_dir_all(&data);
        let mut install = Command::new("mariadb-install-db");
        install.arg("--no-defaults");
        if running_as_root() {
            install.arg("--user=root");
        }
        let out = install
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                "--skip-name-resolve",
                LOG_FILE_SIZE,
            ])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mariadb-install-db ({e}); `{TEST_COMMAND}` installs it")
            });
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(base.join("ready"), b"").expect("mark the template ready");
    }
    data
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create data dir");
    for entry in std::fs::read_dir(from).expect("read template") {
        let entry = entry.expect("template entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy template file");
        }
    }
}

/// A private mariadbd on a free loopback port, killed when dropped. Its
/// methods take `&self`, so a test can share it (`Arc`) with a hook that
/// kills it at a precise point.
#[derive(Debug)]
pub struct PrivateMariadb {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl PrivateMariadb {
    /// Copies the template, starts mariadbd and waits until the test user
    /// can log in over TCP.
    pub async fn start() -> Self {
        let dir = tokio::task::spawn_blocking(|| {
            let template = template();
            let dir = tempfile::Builder::new()
                .prefix("private-mariadb.")
                .tempdir_in(harness_var("LIVEMESH_TEST_TMPDIR"))
                .expect("temp dir");
            copy_dir(&template, &dir.path().join("data"));
            dir
        })
        .await
        .expect("prepare the data dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let init = dir.path().join("init.sql");
        // Run at every start (idempotent): the user the tests log in as.
        std::fs::write(
            &init,
            format!(
                "CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%' WITH GRANT OPTION;\n"
            ),
        )
        .expect("write init.sql");
        let user_line = if running_as_root() { "user=root" } else { "" };
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("my.cnf"),
            format!(
                "[mariadbd]\n\
                 datadir={d}/data\n\
                 socket={d}/mysqld.sock\n\
                 port={port}\n\
                 bind-address=127.0.0.1\n\
                 pid-file={d}/mariadbd.pid\n\
                 log-error={d}/mariadbd.err\n\
                 init-file={d}/init.sql\n\
                 {user_line}\n\
                 server-id=1\n\
                 log-bin=mysql-bin\n\
                 binlog-format=ROW\n\
                 binlog-row-image=FULL\n\
                 binlog-row-metadata=FULL\n\
                 innodb-buffer-pool-size=32M\n\
                 innodb-log-file-size=8M\n\
                 skip-name-resolve\n\
                 max-connections=200\n\
                 character-set-server=utf8mb4\n\
                 collation-server=utf8mb4_general_ci\n\
                 innodb-flush-log-at-trx-commit=2\n"
            ),
        )
        .expect("write my.cnf");
        let server = Self {
            port,
            dir,
            child: Mutex::new(None),
        };
        server.restart().await;
        server
    }

    /// `mysql://USER:PASS@127.0.0.1:PORT` (no database).
    pub fn url(&self) -> String {
        format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// The URL of database `name` on this server (services create it).
    pub fn database_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url())
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process is running (it was started and not killed).
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Starts the server again on the same port and data (crash recovery
    /// runs if it was killed), and waits until the test user can log in.
    pub async fn restart(&self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.path().join("mysqld.sock"));
        let child = Command::new("mariadbd")
            .arg(format!(
                "--defaults-file={}",
                self.dir.path().join("my.cnf").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start mariadbd ({e}); `{TEST_COMMAND}` installs it")
            });
        *lock(&self.child) = Some(child);
        let url = self.url();
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if let Ok(mut conn) = sqlx::MySqlConnection::connect(&url).await
                && sqlx::query("SELECT 1").execute(&mut conn).await.is_ok()
            {
                let _ = conn.close().await;
                return;
            }
            if !self.is_running() {
                panic!(
                    "mariadbd on port {} exited at start; its log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mariadbd on port {} did not accept logins within {READY_WITHIN:?}; its log:\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the server's error log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("mariadbd.err")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.kill();
    }
}
