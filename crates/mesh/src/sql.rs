//! SQL databases for both ways of running: SQLite (the embedded default) and
//! MySQL/MariaDB (production), chosen by the URL's scheme. Migrations are
//! embedded in the binary, one set per dialect, and recorded in a table of
//! the service's own so several services may share one database.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migration, MigrationType, Migrator};
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// A connection pool to one database of either dialect.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    MySql(MySqlPool),
}

/// Runs the same expression against whichever pool `db` holds. Both arms
/// must produce the same type; SQL text that both dialects accept (`?`
/// placeholders, plain types) is written once this way.
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::sql::Db::Sqlite($pool) => $body,
            $crate::sql::Db::MySql($pool) => $body,
        }
    };
}

/// A service's embedded migrations: `(version, description, sql)` per dialect.
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    /// The table that records which migrations ran, e.g. `_livemesh_rooms_migrations`.
    pub table: &'static str,
    pub sqlite: &'static [(i64, &'static str, &'static str)],
    pub mysql: &'static [(i64, &'static str, &'static str)],
}

impl Migrations {
    fn migrator(&self, mysql: bool) -> Migrator {
        let set = if mysql { self.mysql } else { self.sqlite };
        let migrations = set
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sqlx::SqlStr::from_static(sql),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator.dangerous_set_table_name(self.table);
        migrator
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "unsupported database URL {0:?}: use sqlite://PATH or mysql://USER:PASS@HOST:PORT/DATABASE"
    )]
    Unsupported(String),
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("migrating database {url} failed: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error(transparent)]
    Breaker(#[from] crate::breaker::InvalidBreaker),
}

/// `url` with any password replaced, for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl Db {
    /// Opens `url`, creating the SQLite file or the MySQL database when it
    /// does not exist yet, and applies `migrations`.
    pub async fn open(url: &str, migrations: &Migrations) -> Result<Self, SqlError> {
        let open_err = |source| SqlError::Open {
            url: redact(url),
            source,
        };
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(open_err)?
                .create_if_missing(true)
                // WAL lets readers run beside the one writer; FULL sync keeps
                // every committed transaction across a power cut.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5));
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| open_err(sqlx::Error::Io(e)))?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(open_err)?;
            Db::Sqlite(pool)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let options = MySqlConnectOptions::from_str(&url).map_err(open_err)?;
            if options.get_database().is_some()
                && !MySql::database_exists(&url).await.map_err(open_err)?
            {
                match MySql::create_database(&url).await {
                    Ok(()) => tracing::info!(url = %redact(&url), "created database"),
                    // Another replica starting at the same time made it first.
                    Err(_) if MySql::database_exists(&url).await.map_err(open_err)? => {}
                    Err(err) => return Err(open_err(err)),
                }
            }
            // Nagle must stay off on these sockets (sqlx sets TCP_NODELAY
            // since 0.9.1; 0.9.0 did not, so keep sqlx >= 0.9.1): a
            // transaction is a run of small back-to-back writes, and with
            // Nagle each waits for the server's delayed ACK, tens of ms.
            let pool = MySqlPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(open_err)?;
            Db::MySql(pool)
        } else {
            return Err(SqlError::Unsupported(redact(url)));
        };
        let migrator = migrations.migrator(db.is_mysql());
        let migrated = match &db {
            Db::Sqlite(pool) => migrator.run(pool).await,
            Db::MySql(pool) => migrate_mysql(pool, migrator, migrations.table).await,
        };
        migrated.map_err(|source| SqlError::Migrate {
            url: redact(url),
            source,
        })?;
        Ok(db)
    }

    pub fn is_mysql(&self) -> bool {
        matches!(self, Db::MySql(_))
    }

    /// Closes every connection of the pool.
    pub async fn close(&self) {
        on_db!(self, pool => pool.close().await);
    }
}

/// How long a replica waits for another one's migration of the same
/// database to finish.
const MIGRATION_LOCK_SECS: i64 = 120;

/// Runs `migrator` on MySQL/MariaDB under a named lock, so replicas that
/// start together (a Deployment rolling out, `scripts/topology`) apply a
/// database's migrations one at a time. sqlx's own lock asks for
/// `GET_LOCK(name, -1)`, which MariaDB answers with NULL at once instead of
/// waiting, and sqlx ignores the answer: the second replica then finds the
/// first one's migration half-done and fails with "partially applied".
async fn migrate_mysql(
    pool: &MySqlPool,
    mut migrator: Migrator,
    table: &str,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    let (database,): (Option<String>,) = sqlx::query_as("SELECT DATABASE()")
        .fetch_one(&mut *conn)
        .await?;
    let lock = format!(
        "livemesh-migrate-{:016x}",
        crate::fnv1a(format!("{}/{table}", database.unwrap_or_default()).as_bytes())
    );
    let (got,): (Option<i64>,) = sqlx::query_as("SELECT GET_LOCK(?, ?)")
        .bind(&lock)
        .bind(MIGRATION_LOCK_SECS)
        .fetch_one(&mut *conn)
        .await?;
    if got != Some(1) {
        return Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Protocol(
            format!(
                "another replica held the migration lock for {MIGRATION_LOCK_SECS}s; \
                 is one stuck migrating?"
            ),
        )));
    }
    // The lock above is the one that works; sqlx's would be a no-op.
    migrator.set_locking(false);
    let result = migrator.run(&mut *conn).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&lock)
        .execute(&mut *conn)
        .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("mysql://root:s3cret@127.0.0.1:3306/rooms"),
            "mysql://root:***@127.0.0.1:3306/rooms"
        );
        assert_eq!(redact("sqlite://data/rooms.db"), "sqlite://data/rooms.db");
        let err = SqlError::Unsupported(redact("postgres://u:pw@h/db")).to_string();
        assert!(!err.contains("pw@"), "{err}");
    }

    /// Replicas starting together against a fresh MariaDB database: every
    /// one opens it, the migration runs once.
    #[tokio::test]
    async fn concurrent_opens_of_a_fresh_mysql_database_migrate_it_once() {
        const SET: Migrations = Migrations {
            table: "_test_migrations",
            sqlite: &[],
            mysql: &[(
                1,
                "t",
                "CREATE TABLE t (id BIGINT PRIMARY KEY); CREATE TABLE u (id BIGINT PRIMARY KEY); \
                 INSERT INTO t VALUES (1)",
            )],
        };
        let server = std::env::var("LIVEMESH_TEST_MYSQL_URL")
            .expect("LIVEMESH_TEST_MYSQL_URL is unset: run the tests through scripts/test");
        let url = format!("{server}/mesh_migrate_race_{}", std::process::id());
        let opens = (0..6).map(|_| Db::open(&url, &SET));
        let dbs: Vec<Db> = futures::future::try_join_all(opens).await.unwrap();
        let Db::MySql(pool) = &dbs[0] else {
            panic!("expected mysql")
        };
        let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(rows, 1, "the migration ran more than once");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE mesh_migrate_race_{}",
            std::process::id()
        )))
        .execute(pool)
        .await
        .unwrap();
        for db in dbs {
            db.close().await;
        }
    }

    #[tokio::test]
    async fn sqlite_files_and_their_directories_are_created_and_migrated_once() {
        const SET: Migrations = Migrations {
            table: "_test_migrations",
            sqlite: &[(1, "t", "CREATE TABLE t (id INTEGER PRIMARY KEY)")],
            mysql: &[],
        };
        let dir = tempfile::tempdir().unwrap();
        let url = crate::config::sqlite_url(&dir.path().join("nested/dir/x.db"));
        let db = Db::open(&url, &SET).await.unwrap();
        db.close().await;
        // Opening again must not re-run the migration (it would fail: table exists).
        let db = Db::open(&url, &SET).await.unwrap();
        let Db::Sqlite(pool) = &db else {
            panic!("expected sqlite")
        };
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _test_migrations")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
