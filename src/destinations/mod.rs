//! Where validated batches are loaded, atomically: readers see the previous batch or the new one,
//! never a mix and never an empty table.

pub mod bigquery;
pub mod postgres;

use serde::Deserialize;

use crate::gcp::CredentialsConfig;
use crate::secrets::SecretRef;

/// `[pipelines.destination]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DestinationConfig {
    /// A PostgreSQL table, replaced in one transaction.
    Postgres {
        /// `schema.table` (created if missing).
        table: String,
        /// The warehouse database; default: crm-sync's own, where the load and the step's completion
        /// commit in one transaction.
        #[serde(default)]
        url: Option<SecretRef>,
        /// The table's DDL when it must match an existing schema (types, defaults, an identity key);
        /// run when the table is missing. Default: generated from the transform's columns.
        #[serde(default)]
        create_table: Option<String>,
    },
    /// A BigQuery table, replaced by one load job (WRITE_TRUNCATE) from the batch staged in GCS.
    Bigquery {
        project: String,
        dataset: String,
        table: String,
        /// An emulator's base URL (ending before `/bigquery/v2`); production leaves it out.
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        credentials: CredentialsConfig,
    },
}

impl DestinationConfig {
    pub fn check(&self) -> Result<(), String> {
        match self {
            DestinationConfig::Postgres {
                table,
                url,
                create_table,
            } => {
                postgres::split_table(table)?;
                if let Some(ddl) = create_table
                    && !ddl
                        .trim_start()
                        .to_ascii_uppercase()
                        .starts_with("CREATE TABLE")
                {
                    return Err("create_table must be a CREATE TABLE statement".into());
                }
                if let Some(u) = url {
                    u.check()?;
                }
                Ok(())
            }
            DestinationConfig::Bigquery {
                project,
                dataset,
                table,
                ..
            } => {
                for (what, name) in [("project", project), ("dataset", dataset), ("table", table)] {
                    let ok = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !ok {
                        return Err(format!("BigQuery {what} \"{name}\" is not a valid name"));
                    }
                }
                Ok(())
            }
        }
    }
}
