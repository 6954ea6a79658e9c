//! Raw backups of every extract, kept as the checkpoint that later steps read, so a retry never
//! re-extracts. `local` (a directory, the default) today; `gcs` joins with the EZ Focus pipeline.

mod local;

pub use local::LocalStore;

use std::path::PathBuf;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::pipeline::StepError;

/// `[pipelines.backup]`: where raw extracts are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackupConfig {
    /// Files under `dir`.
    Local {
        dir: PathBuf,
        /// Object name template; see [`object_name`].
        #[serde(default)]
        path: Option<String>,
    },
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig::Local {
            dir: PathBuf::from("./crm-sync-backups"),
            path: None,
        }
    }
}

impl BackupConfig {
    pub fn path_template(&self) -> Option<&str> {
        match self {
            BackupConfig::Local { path, .. } => path.as_deref(),
        }
    }

    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self.path_template() {
            check_template(t)?;
        }
        Ok(())
    }

    /// Opens the store this config names.
    pub fn store(&self) -> BackupStore {
        match self {
            BackupConfig::Local { dir, .. } => BackupStore::Local(LocalStore::new(dir.clone())),
        }
    }
}

/// What a stored object is: where, how big, and its checksum (recorded in the step output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub uri: String,
    pub bytes: u64,
    pub sha256: String,
}

/// An opened backup store.
#[derive(Debug, Clone)]
pub enum BackupStore {
    Local(LocalStore),
}

impl BackupStore {
    /// A temporary path on the store's file system for an object about to be written with
    /// [`BackupStore::put_file`] (same directory, so the final rename is atomic).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        match self {
            BackupStore::Local(store) => store.temp_path(name),
        }
    }

    /// Stores a finished file under `name` (moved into place atomically).
    pub async fn put_file(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<ObjectInfo, StepError> {
        match self {
            BackupStore::Local(store) => store.put_file(name, path).await,
        }
    }

    /// Stores a stream under `name`, atomically: the object appears whole or not at all.
    pub async fn put_stream<S>(&self, name: &str, body: S) -> Result<ObjectInfo, StepError>
    where
        S: Stream<Item = Result<Bytes, StepError>> + Unpin,
    {
        match self {
            BackupStore::Local(store) => store.put_stream(name, body).await,
        }
    }
}

/// Fills an object name template: `{pipeline}`, `{batch_id}`, `{date}` (YYYYMMDD) and `{time}`
/// (HHMMSS) in the pipeline's time zone, `{ext}` the source's file extension.
/// The default is `{pipeline}/raw/{pipeline}_{date}_{time}.{ext}`.
pub fn object_name(
    template: Option<&str>,
    pipeline: &str,
    batch_id: &str,
    at: DateTime<Utc>,
    tz: Tz,
    ext: &str,
) -> String {
    let local = at.with_timezone(&tz);
    template
        .unwrap_or("{pipeline}/raw/{pipeline}_{date}_{time}.{ext}")
        .replace("{pipeline}", pipeline)
        .replace("{batch_id}", batch_id)
        .replace("{date}", &local.format("%Y%m%d").to_string())
        .replace("{time}", &local.format("%H%M%S").to_string())
        .replace("{ext}", ext)
}

fn check_template(t: &str) -> Result<(), String> {
    if t.is_empty() || t.starts_with('/') || t.split('/').any(|part| part == "..") {
        return Err(format!(
            "backup path \"{t}\" must be relative and must not contain \"..\""
        ));
    }
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("backup path \"{t}\": unclosed '{{'"))?;
        let name = &rest[open + 1..open + close];
        if !matches!(name, "pipeline" | "batch_id" | "date" | "time" | "ext") {
            return Err(format!(
                "backup path \"{t}\": unknown placeholder {{{name}}} (use {{pipeline}}, {{batch_id}}, {{date}}, {{time}}, {{ext}})"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn object_names_use_the_pipeline_time_zone() {
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 3, 4, 5).unwrap();
        let name = object_name(
            Some("accounts/raw/accounts_{date}_{time}.json"),
            "ezfocus_accounts",
            "b1",
            at,
            chrono_tz::America::Toronto,
            "json",
        );
        assert_eq!(name, "accounts/raw/accounts_20261123_220405.json");
        let name = object_name(None, "p", "b1", at, chrono_tz::UTC, "csv");
        assert_eq!(name, "p/raw/p_20261124_030405.csv");
        assert!(check_template("../x").is_err());
        assert!(check_template("/abs").is_err());
        assert!(
            check_template("a/{nope}.json")
                .unwrap_err()
                .contains("unknown placeholder {nope}")
        );
        assert!(check_template("a/{date}_{time}.json").is_ok());
    }
}
