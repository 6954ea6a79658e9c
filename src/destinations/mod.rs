//! Where validated batches are loaded, atomically: readers see the previous batch or the new one,
//! never a mix and never an empty table.

pub mod postgres;

use serde::Deserialize;

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
    },
}

impl DestinationConfig {
    pub fn check(&self) -> Result<(), String> {
        match self {
            DestinationConfig::Postgres { table, url } => {
                postgres::split_table(table)?;
                if let Some(u) = url {
                    u.check()?;
                }
                Ok(())
            }
        }
    }
}
