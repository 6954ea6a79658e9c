//! The connection pool and the embedded migrations of the `crm_sync` schema.
//!
//! Behind a pooler in transaction mode (`pooler = "transaction"`: PgBouncer, Supabase's port 6543)
//! consecutive transactions of one client connection may reach different server sessions. So the pool
//! keeps no named prepared statements there, nothing relies on session state across transactions, and
//! LISTEN and the liveness lock use `listen_url`, a direct connection, or are left out (polling).

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{Config, Pooler};

/// The migrations in `migrations/`, compiled into the binary so `crm-sync migrate` needs no files.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool of at most `max_connections` to the crm-sync database.
pub async fn connect(url: &str, max_connections: u32, pooler: Pooler) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("the database URL is not valid: {e}"))?;
    if pooler == Pooler::Transaction {
        // Named statements would outlive the transaction on a server session another client gets next.
        options = options.statement_cache_capacity(0);
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))
}

/// The URL of a direct connection to crm-sync's database (for LISTEN and liveness locks): `listen_url`,
/// or `database_url` unless that goes through a transaction-mode pooler.
pub fn direct_url(config: &Config) -> Option<&str> {
    config.listen_url.as_deref().or(match config.pooler {
        Pooler::None => config.database_url.as_deref(),
        Pooler::Transaction => None,
    })
}

/// Creates the database `url` names when it does not exist yet (needs the CREATEDB privilege then);
/// returns whether it did. `crm-sync migrate` and the demo start from an empty server this way.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<bool> {
    use sqlx::migrate::MigrateDatabase;
    if sqlx::Postgres::database_exists(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database server: {e}"))?
    {
        return Ok(false);
    }
    sqlx::Postgres::create_database(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the database: {e}"))?;
    Ok(true)
}

/// Applies every pending migration (idempotent). sqlx serialises concurrent migrators with a session
/// advisory lock, which a transaction-mode pooler cannot hold: with `locked = false` two migrators
/// at once may fail (never half-apply: each migration is one transaction). Migrations applied by a
/// newer release are left alone, so an older binary rolled back to keeps working.
pub async fn migrate(pool: &PgPool, locked: bool) -> anyhow::Result<()> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_locking(locked).set_ignore_missing(true);
    migrator
        .run(pool)
        .await
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"))
}

/// Whether every migration this binary knows has been applied. An unreachable database is an error,
/// not an outdated schema.
pub async fn migrations_current(pool: &PgPool) -> anyhow::Result<bool> {
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await;
    let applied = match applied {
        Ok(applied) => applied,
        // No migrations table: nothing was ever migrated.
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
            Vec::new()
        }
        Err(e) => return Err(anyhow::anyhow!("cannot read the schema version: {e}")),
    };
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}
