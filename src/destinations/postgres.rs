//! The `postgres` destination: a full replace in one transaction (DELETE, then COPY of the staging
//! rows), so concurrent readers keep seeing the previous batch until the new one commits whole.
//! When the table lives in crm-sync's own database, the step's fenced completion commits in the same
//! transaction: a worker that lost its lease rolls its load back, and a load is never recorded twice.
//! (Two workers loading at once after a takeover serialise on the table's row locks; the stale one's
//! completion is refused and its transaction rolled back.)

use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncBufReadExt;

use crate::pipeline::{StepContext, StepDone, StepError};
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

    fn ddl(&self, schema: &str, table: &str) -> String {
        let mut cols: Vec<String> = self
            .data
            .iter()
            .map(|(n, t)| format!("{n} {}", t.postgres()))
            .collect();
        cols.push(format!("{} text NOT NULL", self.batch));
        cols.push(format!("{} timestamptz NOT NULL", self.timestamp));
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} ({})",
            cols.join(", ")
        )
    }
}

/// Replaces the table's rows with the staging object's, atomically; see the module docs.
pub async fn load(
    table: &str,
    url: Option<&SecretRef>,
    create_table: Option<&str>,
    columns: &Columns<'_>,
    staging: &std::path::Path,
    expected_rows: u64,
    ctx: &StepContext,
) -> Result<StepDone, StepError> {
    let (schema, name) = split_table(table).map_err(StepError::terminal)?;
    let same_database = url.is_none();
    let mut pooled;
    let mut own;
    let conn: &mut PgConnection = match url {
        None => {
            pooled = ctx.pool.acquire().await.map_err(StepError::from_db)?;
            &mut pooled
        }
        Some(u) => {
            let u = u
                .resolve()
                .map_err(|e| StepError::terminal(format!("destination database: {e}")))?;
            own = PgConnection::connect(u.expose()).await.map_err(|e| {
                StepError::retryable(format!("cannot connect to the destination database: {e}"))
            })?;
            &mut own
        }
    };
    let mut tx = conn.begin().await.map_err(StepError::from_db)?;
    if same_database {
        // A lease already lost stops the load here. The step row is not locked now (heartbeats must
        // keep renewing it during a long COPY); the fenced completion at the end decides.
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM crm_sync.steps WHERE id = $1 AND fence = $2 AND status = 'running'",
        )
        .bind(ctx.step_id)
        .bind(ctx.fence)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StepError::from_db)?;
        if held.is_none() {
            return Err(StepError::retryable(
                "lease lost before the load; nothing was written",
            ));
        }
    }
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{schema}.{name}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(load_error)?;
    let mut statements = vec![format!("CREATE SCHEMA IF NOT EXISTS {schema}")];
    if !exists {
        statements.push(create_table.map_or_else(|| columns.ddl(&schema, &name), str::to_string));
    }
    statements.push(format!("DELETE FROM {schema}.{name}"));
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(load_error)?;
    }
    let copy = format!(
        "COPY {schema}.{name} ({}) FROM STDIN WITH (FORMAT csv)",
        columns.names().join(", ")
    );
    let mut sink = tx.copy_in_raw(&copy).await.map_err(load_error)?;
    let file = tokio::fs::File::open(staging)
        .await
        .map_err(|e| StepError::retryable(format!("cannot open the staging object: {e}")))?;
    let mut lines = tokio::io::BufReader::with_capacity(256 * 1024, file).lines();
    let names = columns.names();
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
    if copied != expected_rows || sent != expected_rows {
        return Err(StepError::terminal(format!(
            "loaded {copied} rows but the batch has {expected_rows}; rolled back"
        )));
    }
    let output =
        json!({ "table": format!("{schema}.{name}"), "rows": copied, "batch_id": ctx.batch_id });
    if same_database {
        let accepted: Vec<i64> =
            sqlx::query_scalar("SELECT * FROM crm_sync.complete_steps($1, $2, $3, $4)")
                .bind(&ctx.worker_id)
                .bind(vec![ctx.step_id])
                .bind(vec![ctx.fence])
                .bind(vec![output.clone()])
                .fetch_all(&mut *tx)
                .await
                .map_err(StepError::from_db)?;
        if accepted.is_empty() {
            return Err(StepError::retryable(
                "lease lost during the load; rolled back",
            ));
        }
    }
    tx.commit().await.map_err(load_error)?;
    Ok(if same_database {
        StepDone::Committed(output)
    } else {
        StepDone::Output(output)
    })
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

/// Schema mismatches and bad values will not fix themselves; connection trouble might.
fn load_error(e: sqlx::Error) -> StepError {
    let terminal = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("42"));
    let message = format!("load into PostgreSQL failed: {e}");
    if terminal {
        StepError::terminal(message)
    } else {
        StepError::retryable(message)
    }
}
