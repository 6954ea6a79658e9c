//! Where validated batches are loaded, atomically: readers see the previous batch or the new one,
//! never a mix and never an empty table.

pub mod bigquery;
pub mod ledger;
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
        /// `replace` (the whole table, atomically) or `merge` (by `key`: insert new rows, update
        /// changed ones, leave unchanged ones alone, soft-delete the missing ones).
        #[serde(default)]
        write: WriteMode,
        /// The merge key: one or more of the transform's columns.
        #[serde(default)]
        key: Vec<String>,
        /// What a merge does with rows missing from the batch.
        #[serde(default)]
        deletes: DeleteMode,
        /// A merge that would delete more than this share of the live rows fails (terminal): a
        /// truncated extract must not delete the table.
        #[serde(default = "default_max_delete_share")]
        max_delete_share: f64,
        /// How many rows a merge may leave out because their key is empty (every key column null
        /// or "") or repeats an earlier row's key (the first row of a key wins). 0, the default:
        /// any such row fails the validation, naming the keys.
        #[serde(default)]
        skip_dirty_keys: u64,
    },
    /// A BigQuery table, replaced by one load job (WRITE_TRUNCATE) from the batch staged in GCS.
    Bigquery {
        project: String,
        dataset: String,
        table: String,
        /// An emulator's base URL (ending before `/bigquery/v2`); production leaves it out.
        #[serde(default)]
        endpoint: Option<String>,
        /// Where a new dataset is created and jobs run (e.g. `northamerica-northeast1`, `EU`);
        /// without it BigQuery's default, `US`.
        #[serde(default)]
        location: Option<String>,
        #[serde(default)]
        credentials: CredentialsConfig,
        /// As for `postgres`: `replace` (a WRITE_TRUNCATE load job) or `merge` (a load job into a
        /// staging table, then one MERGE statement).
        #[serde(default)]
        write: WriteMode,
        #[serde(default)]
        key: Vec<String>,
        #[serde(default)]
        deletes: DeleteMode,
        #[serde(default = "default_max_delete_share")]
        max_delete_share: f64,
        #[serde(default)]
        skip_dirty_keys: u64,
    },
}

/// How a load writes its batch.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// The table becomes exactly the batch, atomically.
    #[default]
    Replace,
    /// Rows are inserted, updated or deleted by key; unchanged rows are not touched.
    Merge,
}

/// What a merge does with rows that are no longer in the extract.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Keep them, with `deleted_at` and `deleted_in_batch` set.
    #[default]
    Soft,
    /// Remove them.
    Hard,
}

fn default_max_delete_share() -> f64 {
    0.5
}

/// The write settings both destinations share.
fn check_write(
    write: WriteMode,
    key: &[String],
    max_delete_share: f64,
    skip_dirty_keys: u64,
) -> Result<(), String> {
    match write {
        WriteMode::Merge if key.is_empty() => {
            return Err("write = \"merge\" needs a key: key = [\"column\", ...]".into());
        }
        WriteMode::Replace if !key.is_empty() => {
            return Err("key only applies to write = \"merge\"".into());
        }
        WriteMode::Replace if skip_dirty_keys > 0 => {
            return Err("skip_dirty_keys only applies to write = \"merge\"".into());
        }
        _ => {}
    }
    if let Some(bad) = key.iter().find(|k| !crate::transform::is_identifier(k)) {
        return Err(format!(
            "merge key column \"{bad}\" is not a plain identifier"
        ));
    }
    if !(max_delete_share > 0.0 && max_delete_share <= 1.0) {
        return Err(format!(
            "max_delete_share must be above 0 and at most 1, not {max_delete_share}"
        ));
    }
    Ok(())
}

/// The settings of a merge load.
#[derive(Debug, Clone)]
pub struct MergeSettings {
    pub key: Vec<String>,
    pub deletes: DeleteMode,
    pub max_delete_share: f64,
    /// Rows with an empty or repeated key the transform may leave out (0: none, dirty keys fail).
    pub skip_dirty_keys: u64,
}

impl DestinationConfig {
    /// The merge settings when the destination merges, `None` for a full replace.
    pub fn merge(&self) -> Option<MergeSettings> {
        match self {
            DestinationConfig::Postgres {
                write: WriteMode::Merge,
                key,
                deletes,
                max_delete_share,
                skip_dirty_keys,
                ..
            }
            | DestinationConfig::Bigquery {
                write: WriteMode::Merge,
                key,
                deletes,
                max_delete_share,
                skip_dirty_keys,
                ..
            } => Some(MergeSettings {
                key: key.clone(),
                deletes: *deletes,
                max_delete_share: *max_delete_share,
                skip_dirty_keys: *skip_dirty_keys,
            }),
            _ => None,
        }
    }

    /// Checks the settings that depend on the transform's columns.
    pub fn check_columns(&self, columns: &[String]) -> Result<(), String> {
        if let Some(m) = self.merge() {
            for k in &m.key {
                if !columns.contains(k) {
                    return Err(format!(
                        "merge key column \"{k}\" is not one of the transform's columns"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            DestinationConfig::Postgres {
                table,
                url,
                create_table,
                write,
                key,
                max_delete_share,
                skip_dirty_keys,
                ..
            } => {
                postgres::split_table(table)?;
                check_write(*write, key, *max_delete_share, *skip_dirty_keys)?;
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
                location,
                write,
                key,
                max_delete_share,
                skip_dirty_keys,
                ..
            } => {
                check_write(*write, key, *max_delete_share, *skip_dirty_keys)?;
                for (what, name) in [("project", project), ("dataset", dataset), ("table", table)] {
                    let ok = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !ok {
                        return Err(format!("BigQuery {what} \"{name}\" is not a valid name"));
                    }
                }
                if let Some(l) = location {
                    let ok = !l.is_empty()
                        && l.len() <= 64
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
                    if !ok {
                        return Err(format!(
                            "BigQuery location \"{l}\" is not a location such as \"northamerica-northeast1\" or \"EU\""
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bigquery(location: &str) -> DestinationConfig {
        toml::from_str(&format!(
            "kind = \"bigquery\"\nproject = \"p\"\ndataset = \"d\"\ntable = \"t\"\nlocation = \"{location}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_bigquery_location_is_checked() {
        assert!(bigquery("northamerica-northeast1").check().is_ok());
        assert!(bigquery("EU").check().is_ok());
        let e = bigquery("us central/1").check().unwrap_err();
        assert!(e.contains("\"us central/1\" is not a location"), "{e}");
    }
}
