//! The `postgres` destination: a full replace in one transaction (DELETE, then COPY of the staging
//! rows), so concurrent readers keep seeing the previous batch until the new one commits whole.
//! Exactly once, whether the table lives in crm-sync's own database or in a warehouse apart from it
//! (`url`): the load claims the table in the destination's [`ledger`] with its fencing token and
//! records its batch there in its own transaction, so a worker that lost its lease (taken over,
//! cancelled) can never commit after the newer attempt, and a batch whose completion was lost is
//! completed from the ledger instead of being loaded again. In crm-sync's own database the step's
//! fenced completion also commits in the same transaction as the load.
//!
//! With `write = "merge"` the batch is copied into a temporary table and merged by key in the same
//! one transaction: new keys inserted, changed rows (by a content hash kept in `row_hash`) updated,
//! unchanged rows left alone, keys missing from the batch soft-deleted (`deleted_at`,
//! `deleted_in_batch`) or deleted. Every row keeps the `batch_id` of the batch that last changed it
//! and the `first_seen_batch` that brought it.

use std::str::FromStr;

use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncBufReadExt;

use super::{DeleteMode, MergeSettings, ledger};
use crate::keys::{self, KeyDisplay};
use crate::pipeline::{StepContext, StepDone, StepError};
use crate::queue::{self, Lease};
use crate::schema::ColumnType;
use crate::secrets::SecretRef;
use crate::transform::is_identifier;

/// Splits `schema.table` (or `table`, meaning `public`) and checks both parts are plain identifiers.
pub fn split_table(table: &str) -> Result<(String, String), String> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    if !is_identifier(schema) || !is_identifier(name) {
        return Err(format!(
            "table \"{table}\" must be schema.table with letters, digits and '_' only"
        ));
    }
    Ok((schema.to_string(), name.to_string()))
}

/// Columns of the destination table, in order.
pub struct Columns<'a> {
    pub data: Vec<(&'a str, ColumnType)>,
    pub batch: &'a str,
    pub timestamp: &'a str,
}

impl Columns<'_> {
    fn names(&self) -> Vec<&str> {
        self.data
            .iter()
            .map(|(n, _)| *n)
            .chain([self.batch, self.timestamp])
            .collect()
    }

    fn data_names(&self) -> Vec<&str> {
        self.data.iter().map(|(n, _)| *n).collect()
    }

    fn ddl(&self, schema: &str, table: &str, merge: Option<&MergeSettings>) -> String {
        let mut cols: Vec<String> = self
            .data
            .iter()
            .map(|(n, t)| format!("{n} {}", t.postgres()))
            .collect();
        cols.push(format!("{} text NOT NULL", self.batch));
        cols.push(format!("{} timestamptz NOT NULL", self.timestamp));
        if merge.is_some() {
            // The key gets a unique index of its own (also on tables made by `create_table`).
            cols.extend(MERGE_COLUMNS.iter().map(|(n, t)| format!("{n} {t}")));
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} ({})",
            cols.join(", ")
        )
    }
}

/// The name of the unique index a merge keeps on its key (dropped again by a replace).
fn merge_index(table: &str) -> String {
    format!("{table}_merge_key")
}

/// The bookkeeping columns of a merged table.
const MERGE_COLUMNS: [(&str, &str); 4] = [
    ("first_seen_batch", "text"),
    ("row_hash", "text"),
    ("deleted_at", "timestamptz"),
    ("deleted_in_batch", "text"),
];

/// What a merge did.
#[derive(Debug, Default)]
struct MergeCounts {
    inserted: i64,
    updated: i64,
    unchanged: i64,
    deleted: i64,
}

/// What one load writes, and where.
pub struct LoadSpec<'a> {
    /// `schema.table`.
    pub table: &'a str,
    /// The warehouse database; `None`: crm-sync's own.
    pub url: Option<&'a SecretRef>,
    pub create_table: Option<&'a str>,
    pub columns: Columns<'a>,
    /// A merge by key; `None`: a full replace.
    pub merge: Option<MergeSettings>,
    /// How errors name keys.
    pub keys: KeyDisplay,
    /// The staging object (the transform's JSON lines) on local disk.
    pub staging: &'a std::path::Path,
    /// Rows the transform staged: a load that copies another number rolls back.
    pub expected_rows: u64,
}

/// A connection to the warehouse: one of crm-sync's pool, or one of its own for a separate `url`
/// (without named statements, so that a transaction-mode pooler in front of it works too).
enum Warehouse {
    Same(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Separate(PgConnection),
}

impl Warehouse {
    async fn open(url: Option<&SecretRef>, ctx: &StepContext) -> Result<Self, StepError> {
        let Some(url) = url else {
            return Ok(Warehouse::Same(
                ctx.pool.acquire().await.map_err(StepError::from_db)?,
            ));
        };
        let url = url
            .resolve()
            .map_err(|e| StepError::terminal(format!("destination database: {e}")))?;
        let options = sqlx::postgres::PgConnectOptions::from_str(url.expose())
            .map_err(|_| StepError::terminal("destination database: the URL is not valid"))?
            .statement_cache_capacity(0);
        let conn = PgConnection::connect_with(&options).await.map_err(|e| {
            StepError::retryable(format!("cannot connect to the destination database: {e}"))
        })?;
        Ok(Warehouse::Separate(conn))
    }

    fn conn(&mut self) -> &mut PgConnection {
        match self {
            Warehouse::Same(c) => c,
            Warehouse::Separate(c) => c,
        }
    }
}

/// Writes the staging object's rows into the table, atomically and exactly once: a full replace, or
/// a merge by key; see the module docs and [`ledger`].
pub async fn load(spec: &LoadSpec<'_>, ctx: &StepContext) -> Result<StepDone, StepError> {
    let (schema, name) = split_table(spec.table).map_err(StepError::terminal)?;
    let target = format!("{schema}.{name}");
    let same_database = spec.url.is_none();
    let lease = Lease {
        step_id: ctx.step_id,
        fence: ctx.fence,
    };
    let mut warehouse = Warehouse::open(spec.url, ctx).await?;
    let conn = warehouse.conn();
    ledger::ensure(conn).await?;
    if !queue::lease_held(&ctx.pool, lease)
        .await
        .map_err(StepError::from_db)?
    {
        return Err(StepError::retryable(
            "lease lost before the load; nothing was written",
        ));
    }
    if let Some(output) = ledger::committed(conn, &target, &ctx.batch_id).await? {
        // An earlier attempt committed this batch and died before its completion was recorded.
        tracing::info!(table = %target, "the batch was already committed by an earlier attempt; completing without loading again");
        return Ok(StepDone::Output(output));
    }
    ledger::claim(conn, &target, ctx).await?;
    let mut tx = conn.begin().await.map_err(StepError::from_db)?;
    ledger::mark_loader(&mut tx, ctx.fence).await?;
    let output = write_batch(&mut tx, spec, &schema, &name, ctx).await?;
    ledger::seal(&mut tx, &target, ctx, &output).await?;
    if same_database {
        let accepted = queue::complete_in(&mut tx, &ctx.worker_id, lease, &output)
            .await
            .map_err(StepError::from_db)?;
        if !accepted {
            return Err(StepError::retryable(
                "lease lost during the load; rolled back",
            ));
        }
    } else if !queue::lease_held(&ctx.pool, lease)
        .await
        .map_err(StepError::from_db)?
    {
        return Err(StepError::retryable(
            "lease lost during the load (cancelled or taken over); rolled back",
        ));
    }
    tx.commit().await.map_err(load_error)?;
    Ok(if same_database {
        StepDone::Committed(output)
    } else {
        StepDone::Output(output)
    })
}

/// The load itself, inside its transaction: the table made ready, the rows copied, replaced or
/// merged. Returns the step's output.
async fn write_batch(
    tx: &mut PgConnection,
    spec: &LoadSpec<'_>,
    schema: &str,
    name: &str,
    ctx: &StepContext,
) -> Result<Value, StepError> {
    let merge = spec.merge.as_ref();
    let columns = &spec.columns;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .persistent(false)
        .bind(format!("{schema}.{name}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(load_error)?;
    if merge.is_some() {
        require_nulls_not_distinct(tx).await?;
    }
    let mut statements = vec![format!("CREATE SCHEMA IF NOT EXISTS {schema}")];
    // A merge into a table an earlier replace wrote (no key index yet) first removes the rows that
    // cannot be keyed, so the index can be built; the batch brings their keys back.
    let mut unkeyable_removed = 0;
    if let Some(m) = merge
        && exists
    {
        let indexed: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .persistent(false)
            .bind(format!("{schema}.{}", merge_index(name)))
            .fetch_one(&mut *tx)
            .await
            .map_err(load_error)?;
        if !indexed {
            unkeyable_removed = remove_unkeyable(tx, &format!("{schema}.{name}"), &m.key).await?;
        }
    }
    if !exists {
        statements.push(
            spec.create_table
                .map_or_else(|| columns.ddl(schema, name, merge), str::to_string),
        );
    }
    let target = format!("{schema}.{name}");
    let copy_into = match merge {
        None => {
            // A table that merged before: its key index would refuse a replace batch's repeats.
            statements.push(format!(
                "DROP INDEX IF EXISTS {schema}.{}",
                merge_index(name)
            ));
            statements.push(format!("DELETE FROM {target}"));
            target.clone()
        }
        Some(m) => {
            // A table made by `create_table` or by an earlier replace gets what a merge needs.
            for (col, ty) in MERGE_COLUMNS {
                statements.push(format!(
                    "ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {col} {ty}"
                ));
            }
            // NULLS NOT DISTINCT: a key part may be null, and null equals null (PostgreSQL 15+).
            statements.push(format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {target} ({}) NULLS NOT DISTINCT",
                merge_index(name),
                m.key.join(", ")
            ));
            statements.push(format!(
                "CREATE TEMP TABLE crm_sync_merge_stage ON COMMIT DROP AS SELECT {} FROM {target} WITH NO DATA",
                columns.names().join(", ")
            ));
            "crm_sync_merge_stage".to_string()
        }
    };
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .execute(&mut *tx)
            .await
            .map_err(load_error)?;
    }
    let copied = copy_rows(tx, &copy_into, columns, spec.staging).await?;
    if copied != spec.expected_rows {
        return Err(StepError::terminal(format!(
            "loaded {copied} rows but the batch has {}; rolled back",
            spec.expected_rows
        )));
    }
    Ok(match merge {
        None => {
            json!({ "table": target, "rows": copied, "batch_id": ctx.batch_id, "write": "replace" })
        }
        Some(m) => {
            let c = merge_stage(tx, &target, columns, m, &spec.keys, &ctx.batch_id).await?;
            json!({
                "table": target, "rows": copied, "batch_id": ctx.batch_id, "write": "merge",
                "inserted": c.inserted, "updated": c.updated, "unchanged": c.unchanged,
                "deleted": c.deleted, "unkeyable_removed": unkeyable_removed,
            })
        }
    })
}

/// The merge key index treats null parts as equal (NULLS NOT DISTINCT), which PostgreSQL 15 brought.
async fn require_nulls_not_distinct(tx: &mut PgConnection) -> Result<(), StepError> {
    let (number, version): (i32, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
    )
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .map_err(load_error)?;
    if number < 150_000 {
        return Err(StepError::terminal(format!(
            "write = \"merge\" needs PostgreSQL 15 or later (its key index is NULLS NOT DISTINCT); the destination runs {version}"
        )));
    }
    Ok(())
}

/// Streams the staging object's rows into `into` with COPY; returns the rows the server took (the
/// rows sent, or an error).
async fn copy_rows(
    tx: &mut PgConnection,
    into: &str,
    columns: &Columns<'_>,
    staging: &std::path::Path,
) -> Result<u64, StepError> {
    let names = columns.names();
    let copy = format!(
        "COPY {into} ({}) FROM STDIN WITH (FORMAT csv)",
        names.join(", ")
    );
    let mut sink = tx.copy_in_raw(&copy).await.map_err(load_error)?;
    let file = tokio::fs::File::open(staging)
        .await
        .map_err(|e| StepError::retryable(format!("cannot open the staging object: {e}")))?;
    let mut lines = tokio::io::BufReader::with_capacity(256 * 1024, file).lines();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut sent = 0u64;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| StepError::retryable(format!("cannot read the staging object: {e}")))?;
        if let Some(line) = &line {
            let row: Map<String, Value> = serde_json::from_str(line).map_err(|e| {
                StepError::terminal(format!("staging object row {}: {e}", sent + 1))
            })?;
            csv_row(&row, &names, &mut buf);
            sent += 1;
        }
        if buf.len() >= (1 << 20) || (line.is_none() && !buf.is_empty()) {
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(1 << 20));
            sink.send(chunk).await.map_err(load_error)?;
        }
        if line.is_none() {
            break;
        }
    }
    let copied = sink.finish().await.map_err(load_error)?;
    if copied != sent {
        return Err(StepError::terminal(format!(
            "sent {sent} rows but PostgreSQL copied {copied}; rolled back"
        )));
    }
    Ok(copied)
}

/// Deletes the rows of `target` whose key is empty (every part null or "") or shared with another
/// row: what an earlier replace may have left, and what a unique key index cannot hold.
async fn remove_unkeyable(
    tx: &mut PgConnection,
    target: &str,
    key: &[String],
) -> Result<u64, StepError> {
    let cols = key.join(", ");
    let empty = key
        .iter()
        .map(|k| format!("(t.{k} IS NULL OR t.{k}::text = '')"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let removed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {target} t WHERE ({empty}) OR {} IN (
             SELECT {} FROM {target} GROUP BY {cols} HAVING count(*) > 1)",
        key_array(key, "t."),
        key_array(key, ""),
    )))
    .persistent(false)
    .execute(&mut *tx)
    .await
    .map_err(load_error)?;
    Ok(removed.rows_affected())
}

/// A row's key as a jsonb array of its `key` columns (each prefixed with `alias`, e.g. "t."): keys
/// compare as such arrays, so null parts equal each other and joins on them can still hash.
fn key_array(key: &[String], alias: &str) -> String {
    format!(
        "jsonb_build_array({})",
        key.iter()
            .map(|k| format!("{alias}{k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Merges `crm_sync_merge_stage` into `target` by key, inside the load's transaction.
async fn merge_stage(
    tx: &mut PgConnection,
    target: &str,
    columns: &Columns<'_>,
    m: &MergeSettings,
    keys: &KeyDisplay,
    batch_id: &str,
) -> Result<MergeCounts, StepError> {
    let key_match = format!("{} = {}", key_array(&m.key, "s."), key_array(&m.key, "t."));
    let missing = format!(
        "t.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM crm_sync_merge_stage s WHERE {key_match})"
    );
    // The validate step refuses duplicate keys; checked again here, where a duplicate would corrupt.
    duplicate_keys(tx, m, keys).await?;
    // Planner statistics for the stage, so the joins below hash instead of looping.
    sqlx::query("ANALYZE crm_sync_merge_stage")
        .persistent(false)
        .execute(&mut *tx)
        .await
        .map_err(load_error)?;
    // The deletion guard: a truncated extract must not delete (or soft-delete) the table. (Two
    // queries: NOT EXISTS in a WHERE clause becomes a hash anti-join; inside a FILTER it would not.)
    let live: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {target} t WHERE t.deleted_at IS NULL"
    )))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .map_err(load_error)?;
    let to_delete: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {target} t WHERE {missing}"
    )))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .map_err(load_error)?;
    if live > 0 && to_delete as f64 > m.max_delete_share * live as f64 {
        return Err(StepError::terminal(format!(
            "the merge would delete {to_delete} of {live} live rows ({:.0} %), more than max_delete_share ({:.0} %); nothing was changed (is the extract truncated?)",
            to_delete as f64 * 100.0 / live as f64,
            m.max_delete_share * 100.0
        )));
    }
    let data = columns.data_names();
    let hash = format!(
        "md5(row({})::text)",
        data.iter()
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let all = columns.names();
    let updates = data
        .iter()
        .chain([&columns.batch, &columns.timestamp])
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (inserted, updated): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH up AS (
             INSERT INTO {target} AS t ({cols}, first_seen_batch, row_hash, deleted_at, deleted_in_batch)
             SELECT {scols}, s.{batch}, {hash}, NULL, NULL FROM crm_sync_merge_stage s
             ON CONFLICT ({key}) DO UPDATE
                SET {updates}, row_hash = EXCLUDED.row_hash, deleted_at = NULL, deleted_in_batch = NULL,
                    first_seen_batch = coalesce(t.first_seen_batch, EXCLUDED.first_seen_batch)
              WHERE t.row_hash IS DISTINCT FROM EXCLUDED.row_hash OR t.deleted_at IS NOT NULL
             RETURNING (xmax = 0) AS inserted)
         SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up",
        cols = all.join(", "),
        scols = all.iter().map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", "),
        batch = columns.batch,
        key = m.key.join(", "),
    ))).persistent(false)
    .fetch_one(&mut *tx)
    .await
    .map_err(load_error)?;
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_sync_merge_stage")
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .map_err(load_error)?;
    let deleted = match m.deletes {
        DeleteMode::Soft => sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {target} t SET deleted_at = now(), deleted_in_batch = $1 WHERE {missing}"
        )))
        .persistent(false)
        .bind(batch_id),
        DeleteMode::Hard => sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {target} t WHERE {missing}"
        )))
        .persistent(false),
    }
    .execute(&mut *tx)
    .await
    .map_err(load_error)?
    .rows_affected() as i64;
    Ok(MergeCounts {
        inserted,
        updated,
        unchanged: staged - inserted - updated,
        deleted,
    })
}

/// Fails when a key is on several rows of the stage, naming up to five keys as `keys` shows them
/// (each part read back as text, so a key gets the hash the validate step gave it).
async fn duplicate_keys(
    tx: &mut PgConnection,
    m: &MergeSettings,
    keys: &KeyDisplay,
) -> Result<(), StepError> {
    let cols = m.key.join(", ");
    let as_text = m
        .key
        .iter()
        .map(|k| format!("{k}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let duplicates: Vec<(Value, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT jsonb_build_array({as_text}), count(*) FROM crm_sync_merge_stage
          GROUP BY {cols} HAVING count(*) > 1 ORDER BY 2 DESC LIMIT 5"
    )))
    .persistent(false)
    .fetch_all(&mut *tx)
    .await
    .map_err(load_error)?;
    if duplicates.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = duplicates
        .iter()
        .map(|(parts, n)| {
            let parts: Vec<&Value> = parts.as_array().into_iter().flatten().collect();
            format!("{} ({n} rows)", keys.parts(&parts))
        })
        .collect();
    Err(StepError::terminal(format!(
        "duplicate merge keys in the batch ({cols}): {}; nothing was changed",
        named.join(", ")
    )))
}

/// One CSV line for COPY: NULL as an empty unquoted field, text always quoted (so "" stays "").
fn csv_row(row: &Map<String, Value>, names: &[&str], out: &mut Vec<u8>) {
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match row.get(*name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                out.push(b'"');
                for b in s.bytes() {
                    if b == b'"' {
                        out.push(b'"');
                    }
                    out.push(b);
                }
                out.push(b'"');
            }
            Some(v) => out.extend_from_slice(v.to_string().as_bytes()),
        }
    }
    out.push(b'\n');
}

/// Schema mismatches and bad values will not fix themselves; connection trouble might. A data error
/// (SQLSTATE class 22) quotes the row's value: it is left out, the row and column kept.
fn load_error(e: sqlx::Error) -> StepError {
    let db = e.as_database_error();
    let code = db.and_then(|d| d.code()).unwrap_or_default();
    let terminal = ["22", "23", "42"].iter().any(|c| code.starts_with(c));
    let message = match db {
        Some(d) if code.starts_with("22") => {
            let context = d
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|p| p.r#where())
                .map(|w| format!("; {}", keys::without_quoted_values(w)))
                .unwrap_or_default();
            format!(
                "load into PostgreSQL failed: {} (SQLSTATE {code}{context}; the value is not shown)",
                keys::without_quoted_values(d.message())
            )
        }
        _ => format!("load into PostgreSQL failed: {e}"),
    };
    if terminal {
        StepError::terminal(message)
    } else {
        StepError::retryable(message)
    }
}
