//! The connection pool and the embedded migrations of the `crm_sync` schema.
//!
//! Behind a pooler in transaction mode (`pooler = "transaction"`: PgBouncer, Supabase's port 6543)
//! consecutive transactions of one client connection may reach different server sessions. So the pool
//! keeps no named prepared statements there, nothing relies on session state across transactions, and
//! LISTEN and the liveness lock use `listen_url`, a direct connection, or are left out (polling).

use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Either, Execute, Executor, PgPool, Postgres, SqlStr};

use crate::config::{Config, Pooler};

/// crm-sync's database: a connection pool, and how statements must travel to reach it.
///
/// Statements go through `&Db` as through a pool. Behind a transaction-mode pooler each one runs in
/// a transaction of its own as an unnamed statement: sqlx prepares a statement in one round trip and
/// binds it in the next, and outside a transaction the pooler may send the second to another server
/// session, which then runs *another client's* statement with these arguments (wrong results, mostly
/// without an error); named statements collide between clients. Code that opens its own transaction
/// ([`Db::begin`]) marks its statements `.persistent(false)` itself.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    pooled: bool,
}

impl Db {
    pub fn new(pool: PgPool, pooler: Pooler) -> Self {
        Self {
            pool,
            pooled: pooler == Pooler::Transaction,
        }
    }

    /// The pool itself, for what needs a connection of its own (a transaction, COPY).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether statements reach the database through a transaction-mode pooler.
    pub fn pooled(&self) -> bool {
        self.pooled
    }

    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    pub async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, sqlx::Error> {
        self.pool.acquire().await
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// A pool used directly (tests, one-off tools) is taken to reach PostgreSQL itself.
impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Db::new(pool, Pooler::None)
    }
}

/// A statement sent as an unnamed one, whatever it asked for.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(self) -> SqlStr {
        self.0.sql()
    }
    fn statement(&self) -> Option<&PgStatement> {
        self.0.statement()
    }
    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }
    fn persistent(&self) -> bool {
        false
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled {
            return self.pool.fetch_many(query);
        }
        let pool = self.pool.clone();
        let all = async move {
            let mut tx = pool.begin().await?;
            let items: Vec<_> = tx.fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(futures::stream::iter(items.into_iter().map(Ok)))
        };
        futures::stream::once(all).try_flatten().boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let row = tx.fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool.describe(sql)
    }
}

/// The migrations in `migrations/`, compiled into the binary so `crm-sync migrate` needs no files.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool of at most `max_connections` to the crm-sync database.
pub async fn connect(url: &str, max_connections: u32, pooler: Pooler) -> anyhow::Result<Db> {
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("the database URL is not valid: {e}"))?;
    if pooler == Pooler::Transaction {
        // Named statements would outlive the transaction on a server session another client gets next.
        options = options.statement_cache_capacity(0);
    }
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))?;
    Ok(Db::new(pool, pooler))
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
pub async fn migrate(db: &Db, locked: bool) -> anyhow::Result<()> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_locking(locked).set_ignore_missing(true);
    migrator
        .run(db.pool())
        .await
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"))
}

/// Whether every migration this binary knows has been applied. An unreachable database is an error,
/// not an outdated schema.
pub async fn migrations_current(db: &Db) -> anyhow::Result<bool> {
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(db)
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
