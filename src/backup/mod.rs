//! Raw backups of every extract, kept as the checkpoint that later steps read, so a retry never
//! re-extracts: `local` (a directory, the default) or `gcs` (a bucket; also where BigQuery load jobs
//! read the staged batch from).

mod local;

pub use local::LocalStore;

use std::path::PathBuf;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::gcp::CredentialsConfig;
use crate::gcp::gcs::{GcsError, GcsStore, parse_gs_uri};
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
    /// Objects in a Cloud Storage bucket.
    Gcs {
        bucket: String,
        /// Object name template; see [`object_name`].
        #[serde(default)]
        path: Option<String>,
        /// An emulator's base URL (fake-gcs-server); production leaves it out.
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        project: Option<String>,
        #[serde(default)]
        credentials: CredentialsConfig,
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
            BackupConfig::Local { path, .. } | BackupConfig::Gcs { path, .. } => path.as_deref(),
        }
    }

    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self.path_template() {
            check_template(t)?;
        }
        if let BackupConfig::Gcs { bucket, .. } = self
            && (bucket.len() < 3 || bucket.contains('/'))
        {
            return Err(format!("\"{bucket}\" is not a bucket name"));
        }
        Ok(())
    }

    /// Opens the store this config names.
    pub async fn store(&self) -> Result<BackupStore, StepError> {
        match self {
            BackupConfig::Local { dir, .. } => Ok(BackupStore::Local(LocalStore::new(dir.clone()))),
            BackupConfig::Gcs {
                bucket,
                endpoint,
                project,
                credentials,
                ..
            } => {
                let store = GcsStore::new(endpoint.clone(), project.clone(), credentials.into())
                    .await
                    .map_err(gcs_error)?;
                Ok(BackupStore::Gcs {
                    store: Box::new(store),
                    bucket: bucket.clone(),
                })
            }
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
pub enum BackupStore {
    Local(LocalStore),
    Gcs {
        store: Box<GcsStore>,
        bucket: String,
    },
}

impl BackupStore {
    /// A temporary local path for an object about to be written with [`BackupStore::put_file`]
    /// (beside its final place for a local store, so the final rename is atomic).
    pub fn temp_path(&self, name: &str) -> Result<PathBuf, StepError> {
        match self {
            BackupStore::Local(store) => store.temp_path(name),
            BackupStore::Gcs { .. } => Ok(scratch_path()),
        }
    }

    /// Stores a finished file under `name`: moved into place, or uploaded and then removed.
    pub async fn put_file(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<ObjectInfo, StepError> {
        match self {
            BackupStore::Local(store) => store.put_file(name, path).await,
            BackupStore::Gcs { .. } => {
                let file = tokio::fs::File::open(path).await.map_err(|e| {
                    StepError::retryable(format!("cannot open {}: {e}", path.display()))
                })?;
                let body =
                    tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(|chunk| {
                        chunk.map_err(|e| {
                            StepError::retryable(format!("cannot read the staged file: {e}"))
                        })
                    });
                let info = self.put_stream(name, Box::pin(body)).await;
                let _ = tokio::fs::remove_file(path).await;
                info
            }
        }
    }

    /// Stores a copy of a local file under `name` (the file stays where it is).
    pub async fn copy_file(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<ObjectInfo, StepError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StepError::retryable(format!("cannot open {}: {e}", path.display())))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(|chunk| {
            chunk.map_err(|e| StepError::retryable(format!("cannot read a local file: {e}")))
        });
        self.put_stream(name, Box::pin(body)).await
    }

    /// Stores a stream under `name`, atomically: the object appears whole or not at all.
    pub async fn put_stream<S>(&self, name: &str, body: S) -> Result<ObjectInfo, StepError>
    where
        S: Stream<Item = Result<Bytes, StepError>> + Unpin + Send + 'static,
    {
        match self {
            BackupStore::Local(store) => store.put_stream(name, body).await,
            BackupStore::Gcs { store, bucket } => {
                let info = store
                    .put_stream(bucket, name, body)
                    .await
                    .map_err(gcs_error)?;
                Ok(ObjectInfo {
                    uri: info.uri,
                    bytes: info.size,
                    sha256: info.sha256_hex,
                })
            }
        }
    }
}

/// A local copy of a stored object for the steps that read it: the file itself for `file://`, a
/// streamed download for `gs://` (deleted when dropped).
pub struct LocalCopy {
    pub path: PathBuf,
    temporary: bool,
}

impl Drop for LocalCopy {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Fetches the object at `uri` (from an earlier step's checkpoint) to a local file.
pub async fn local_copy(uri: &str, config: &BackupConfig) -> Result<LocalCopy, StepError> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(LocalCopy {
            path: PathBuf::from(path),
            temporary: false,
        });
    }
    let Some((bucket, object)) = parse_gs_uri(uri) else {
        return Err(StepError::terminal(format!(
            "cannot read {uri}: not a file:// or gs:// URI"
        )));
    };
    let BackupStore::Gcs { store, .. } = config.store().await? else {
        return Err(StepError::terminal(format!(
            "cannot read {uri}: the pipeline's backup is not gcs"
        )));
    };
    let copy = LocalCopy {
        path: scratch_path(),
        temporary: true,
    };
    let write_error = |e: std::io::Error| {
        StepError::retryable(format!("cannot write a local copy of {uri}: {e}"))
    };
    let mut body = store.get_stream(bucket, object).await.map_err(gcs_error)?;
    let mut file = crate::private_fs::create_new_async(&copy.path)
        .await
        .map_err(write_error)?;
    while let Some(chunk) = body.next().await {
        file.write_all(&chunk.map_err(gcs_error)?)
            .await
            .map_err(write_error)?;
    }
    file.flush().await.map_err(write_error)?;
    Ok(copy)
}

/// A fresh path in the temporary directory; the file is created 0600 (`private_fs::create_new`).
fn scratch_path() -> PathBuf {
    std::env::temp_dir().join(format!("crm-sync-{}.tmp", uuid::Uuid::new_v4().simple()))
}

/// GCS errors keep their class; a failed source stream (a cut answer) is worth retrying.
pub fn gcs_error(e: GcsError) -> StepError {
    if e.is_retryable() || matches!(e, GcsError::Source { .. }) {
        StepError::retryable(e.to_string())
    } else {
        StepError::terminal(e.to_string())
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
