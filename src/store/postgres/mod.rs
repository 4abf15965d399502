//! PostgreSQL behind the same operations as the redb file, so that several edgechat replicas
//! share users, keys, conversations and the job queue. Each operation is one statement or one
//! transaction on a pooled connection and returns after its commit, so "acknowledged" still
//! means "durable". Row locks stand in for redb's single writer: `FOR UPDATE` where a rule
//! reads then writes, `SKIP LOCKED` where replicas compete for work, and one advisory lock
//! for the rules that span rows (the last admin, the migration).

mod accounts;
mod conversations;
mod copy;
mod counters;
mod jobs;
mod signals;

pub use copy::CopyReport;
pub use signals::JobSignals;

use super::group::Queue;
use super::{PostgresOptions, StoreError, UniqueField};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use rustls_pki_types::pem::PemObject;
use std::sync::Arc;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// The schema this build writes on PostgreSQL (its own numbering: redb's file has another).
pub const SCHEMA_VERSION: i64 = 3;

/// One script per version: `MIGRATIONS[n]` turns version `n` into version `n + 1`; all the
/// steps a start needs run in one transaction.
const MIGRATIONS: [&str; 3] =
    [include_str!("schema_1.sql"), include_str!("schema_2.sql"), include_str!("schema_3.sql")];

/// Advisory lock keys (`pg_advisory_xact_lock`): arbitrary, but fixed forever.
const MIGRATION_LOCK: i64 = 0x6564_6765_6368_6174; // "edgechat"
const ADMIN_LOCK: i64 = MIGRATION_LOCK + 1;

/// Parameters of one statement.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A pool of connections to one database.
#[derive(Clone)]
pub(super) struct Pg {
    pool: Pool,
    /// The database as messages show it: no password.
    shown: Arc<str>,
    /// How to open a connection outside the pool (`JobSignals`).
    connect_with: Arc<(tokio_postgres::Config, tokio_postgres_rustls::MakeRustlsConnect)>,
    /// Enqueues waiting for the next batch (group commit: one transaction, one WAL flush).
    enqueues: Arc<jobs::Enqueues>,
}

impl Pg {
    /// Connects, proves the database answers and the role may use it, and brings the schema
    /// to ours (one replica at a time; the others wait on the lock, then find it done).
    pub(super) async fn connect(options: &PostgresOptions) -> Result<Pg, StoreError> {
        let mut config: tokio_postgres::Config = options.url.expose().parse().map_err(|e| {
            StoreError::Db(format!("storage.url is not a PostgreSQL URL ({e}); write postgres://USER:PASSWORD@HOST:PORT/DATABASE"))
        })?;
        let shown: Arc<str> = describe(&config).into();
        config.connect_timeout(options.connect_timeout);
        config.application_name("edgechat");
        // Every statement and every lock wait is bounded: a stuck database answers 503, it
        // does not hold a request (or a job worker) forever.
        let ms = options.statement_timeout.as_millis();
        config.options(format!("-c statement_timeout={ms} -c lock_timeout={ms}"));
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(options)?);
        let connect_with = Arc::new((config.clone(), tls.clone()));
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout + options.statement_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Db(format!("{shown}: {e}")))?;
        let pg = Pg { pool, shown, connect_with, enqueues: Arc::new(Queue::new()) };
        pg.migrate().await.map_err(|e| pg.at_start(e))?;
        Ok(pg)
    }

    /// The database as messages show it (`postgres://user@host:port/db`).
    pub(super) fn shown(&self) -> &str {
        &self.shown
    }

    /// A start-up failure, named with the database and what to do.
    fn at_start(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Unreachable { reason } => StoreError::Db(format!(
                "cannot reach the database {}: {reason}; check storage.url and that PostgreSQL is running and accepts this host",
                self.shown
            )),
            StoreError::Db(message) => StoreError::Db(format!("{}: {message}", self.shown)),
            other => other,
        }
    }

    /// A connection from the pool; `Unreachable` when none comes within the deadlines.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Unreachable { reason: other.to_string() },
        })
    }

    /// Brings the schema to `SCHEMA_VERSION` under an advisory lock; refuses a newer one.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS edgechat_meta (key text PRIMARY KEY, value bigint NOT NULL)",
        )
        .await?;
        let found: Option<i64> = tx
            .query_opt("SELECT value FROM edgechat_meta WHERE key = 'schema_version'", &[])
            .await?
            .map(|row| row.get(0));
        let from = match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::NewerSchema {
                    place: self.shown.to_string(),
                    found: v as u64,
                    supported: SCHEMA_VERSION as u64,
                })
            }
            Some(v) => v.max(0),
            None => 0,
        };
        for (step, script) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            tx.batch_execute(script).await?;
            tracing::info!(database = %self.shown, from = step, to = step + 1, "migrated the schema");
        }
        tx.execute(
            "INSERT INTO edgechat_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&SCHEMA_VERSION],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The schema version the database holds (always ours once connected).
    pub(super) async fn schema_version(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = one(&client, "SELECT value FROM edgechat_meta WHERE key = 'schema_version'", &[])
            .await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    /// Proves the database answers a query; `/ready` calls it.
    pub(super) async fn check(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

#[cfg(test)]
impl Pg {
    /// Rows in every table, by name.
    pub(super) async fn table_sizes(&self) -> Vec<(String, u64)> {
        let client = self.client().await.unwrap();
        let mut out = Vec::new();
        for table in copy::TABLES {
            let row = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await;
            out.push((table.to_string(), row.unwrap().get::<_, i64>(0) as u64));
        }
        out
    }
}

/// `postgres://user@host:port/database`, without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// rustls for the database connection: the web's roots, plus `storage.ca_file` (a private CA,
/// or a managed database's own). `sslmode` in the URL says whether TLS is required.
fn tls_config(options: &PostgresOptions) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &options.ca_file {
        let bad = |e: &dyn std::fmt::Display| {
            StoreError::Db(format!("storage.ca_file {}: {e}", path.display()))
        };
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Db(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No answer from the server: the connection broke, or never came.
            return StoreError::Unreachable { reason: e.to_string() };
        };
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION {
            return match db.constraint() {
                Some("users_email_unique") => StoreError::Conflict(UniqueField::Email),
                Some("users_username_unique") => StoreError::Conflict(UniqueField::Username),
                _ => StoreError::Db(db.message().to_string()),
            };
        }
        // A row for a user (or conversation) deleted meanwhile.
        if *code == SqlState::FOREIGN_KEY_VIOLATION {
            return StoreError::NotFound;
        }
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            return StoreError::Db(format!(
                "the database role lacks a right: {}; grant it (edgechat needs to create its tables on first start, then read and write them)",
                db.message()
            ));
        }
        let class = &code.code()[..2];
        // Connection exceptions, an operator shutting the server down, too many connections,
        // a statement or lock past its deadline, a deadlock: all pass, none is our data's fault.
        let passing =
            matches!(class, "08" | "53" | "57" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE;
        match passing {
            true => StoreError::Unreachable { reason: db.message().to_string() },
            false => StoreError::Db(db.message().to_string()),
        }
    }
}

/// A read-only transaction over one snapshot, for reads that must agree with each other (a
/// conversation and its messages, the queue's figures), as redb's read transactions do.
async fn snapshot(client: &mut Object) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

/// Runs `sql` (prepared once per connection) and returns its rows.
async fn rows<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query(&statement, params).await?)
}

/// Runs `sql` and returns its one row, if any.
async fn one<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&statement, params).await?)
}

/// Runs `sql` and returns how many rows it changed.
async fn exec<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, params).await?)
}

/// A column of a row we wrote; a mismatch is a corrupt row, not a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    table: &'static str,
    name: &str,
) -> Result<T, StoreError> {
    row.try_get(name).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

/// A JSON column read into its type.
fn json<T: serde::de::DeserializeOwned>(
    row: &Row,
    table: &'static str,
    name: &str,
) -> Result<Option<T>, StoreError> {
    let value: Option<serde_json::Value> = col(row, table, name)?;
    value
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}
