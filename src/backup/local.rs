//! The `local` backup store: files under a directory. Each object is written to a temporary file in
//! the same directory, fsynced, then renamed, so readers never see a partial object.
//!
//! A worker killed mid-write (kill -9, a crash) cannot remove its temporary file. The next write into
//! the same directory removes such leftovers once they have not been touched for [`STALE_PARTIAL`]:
//! a live write touches its file with every chunk, so only abandoned ones get that old.

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::ObjectInfo;
use crate::pipeline::StepError;

/// How long a temporary `.NAME.partial-ID` file must have been untouched before a later write into
/// its directory removes it as abandoned.
pub const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub async fn put_stream<S>(&self, name: &str, mut body: S) -> Result<ObjectInfo, StepError>
    where
        S: Stream<Item = Result<Bytes, StepError>> + Unpin,
    {
        let path = self.object_path(name)?;
        let tmp = self.partial_path(&path)?;
        let result = write_all(&tmp, &mut body).await;
        let (bytes, sha256) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io_error("finish backup object", &path, e));
        }
        let absolute = std::path::absolute(&path).unwrap_or(path);
        Ok(ObjectInfo {
            uri: format!("file://{}", absolute.display()),
            bytes,
            sha256,
        })
    }

    /// Where object `name` lives: under the root, whatever the name. The name must be relative and
    /// made of plain components (no `..`, no `.`, no root), checked on the joined path, so that no
    /// pipeline name, template or batch id can reach outside the backup directory.
    fn object_path(&self, name: &str) -> Result<PathBuf, StepError> {
        let plain_parts = name.split('/').all(|part| !matches!(part, "" | "." | ".."));
        let path = self.root.join(name);
        let inside = plain_parts
            && path.strip_prefix(&self.root).is_ok_and(|rest| {
                rest.components().next().is_some()
                    && rest.components().all(|c| matches!(c, Component::Normal(_)))
            });
        if !inside {
            return Err(StepError::terminal(format!(
                "backup object name \"{}\" is refused: it must stay under the backup directory {} \
                 (a relative path of plain names, no \"..\", \".\" or empty parts)",
                name.escape_debug(),
                self.root.display()
            )));
        }
        Ok(path)
    }

    /// A fresh temporary path beside `path` (an [`LocalStore::object_path`]), in its directory,
    /// created 0700 if missing; abandoned partials there are removed.
    fn partial_path(&self, path: &Path) -> Result<PathBuf, StepError> {
        let dir = path.parent().unwrap_or(&self.root);
        crate::private_fs::create_dir_all(dir)
            .map_err(|e| io_error("create backup directory", dir, e))?;
        remove_stale_partials(dir);
        Ok(dir.join(format!(
            ".{}.partial-{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object"),
            uuid::Uuid::new_v4().simple()
        )))
    }
}

impl LocalStore {
    /// A fresh temporary path beside where `name` will live (its directory created 0700).
    pub fn temp_path(&self, name: &str) -> Result<PathBuf, StepError> {
        self.partial_path(&self.object_path(name)?)
    }

    /// Moves a finished temporary file (from [`LocalStore::temp_path`]) into place, with its checksum.
    pub async fn put_file(&self, name: &str, tmp: &Path) -> Result<ObjectInfo, StepError> {
        let path = self.object_path(name)?;
        let file = tokio::fs::File::open(tmp)
            .await
            .map_err(|e| io_error("open staging file", tmp, e))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(|chunk| {
            chunk.map_err(|e| StepError::retryable(format!("cannot read {}: {e}", tmp.display())))
        });
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut stream = Box::pin(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
        }
        if let Err(e) = tokio::fs::rename(tmp, &path).await {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(io_error("finish object", &path, e));
        }
        let absolute = std::path::absolute(&path).unwrap_or(path);
        Ok(ObjectInfo {
            uri: format!("file://{}", absolute.display()),
            bytes,
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

async fn write_all<S>(tmp: &Path, body: &mut S) -> Result<(u64, String), StepError>
where
    S: Stream<Item = Result<Bytes, StepError>> + Unpin,
{
    let mut file = crate::private_fs::create_new_async(tmp)
        .await
        .map_err(|e| io_error("create backup object", tmp, e))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error("write backup object", tmp, e))?;
    }
    file.flush()
        .await
        .map_err(|e| io_error("write backup object", tmp, e))?;
    file.sync_all()
        .await
        .map_err(|e| io_error("sync backup object", tmp, e))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Removes the temporary files of abandoned writes in `dir` (see the module docs). Best effort: a
/// file it cannot read or remove is left for the next write.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_partial = name
            .to_str()
            .is_some_and(|n| n.starts_with('.') && n.contains(".partial-"));
        if !is_partial {
            continue; // the backups themselves: not even a stat
        }
        let untouched = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if untouched.is_some_and(|age| age >= STALE_PARTIAL) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed an abandoned partial backup object")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an abandoned partial backup object")
                }
            }
        }
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StepError {
    StepError::retryable(format!("cannot {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_whole_objects_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let chunks = vec![
            Ok(Bytes::from_static(b"[1,")),
            Ok(Bytes::from_static(b"2]")),
        ];
        let info = store
            .put_stream("a/b/c.json", futures::stream::iter(chunks))
            .await
            .unwrap();
        assert_eq!(info.bytes, 5);
        assert_eq!(info.sha256, hex::encode(Sha256::digest(b"[1,2]")));
        assert_eq!(
            std::fs::read(dir.path().join("a/b/c.json")).unwrap(),
            b"[1,2]"
        );
        assert!(info.uri.starts_with("file:///") && info.uri.ends_with("a/b/c.json"));

        let cut = vec![
            Ok(Bytes::from_static(b"[1,")),
            Err(StepError::retryable("connection reset")),
        ];
        let err = store
            .put_stream("a/b/d.json", futures::stream::iter(cut))
            .await
            .unwrap_err();
        assert_eq!(err.message, "connection reset");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("c.json")],
            "a partial object was left behind"
        );
    }

    #[tokio::test]
    async fn a_later_write_removes_partials_abandoned_for_a_day_and_keeps_fresh_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        std::fs::create_dir_all(dir.path().join("raw")).unwrap();
        let stale = dir.path().join("raw/.a.json.partial-0123");
        let fresh = dir.path().join("raw/.b.json.partial-4567");
        let other = dir.path().join("raw/.keep-me");
        for f in [&stale, &fresh, &other] {
            std::fs::write(f, b"[1,").unwrap();
        }
        let old = std::time::SystemTime::now() - STALE_PARTIAL - std::time::Duration::from_secs(60);
        for f in [&stale, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        store
            .put_stream(
                "raw/c.json",
                futures::stream::iter(vec![Ok(Bytes::from_static(b"[]"))]),
            )
            .await
            .unwrap();
        assert!(!stale.exists(), "the abandoned partial is gone");
        assert!(
            fresh.exists(),
            "a partial touched recently may be a live write"
        );
        assert!(other.exists(), "only partial objects are removed");
    }

    #[tokio::test]
    async fn object_names_that_would_leave_the_backup_directory_are_refused() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("backups");
        let store = LocalStore::new(root.clone());
        for name in [
            "../escaped.json",
            "../../etc/x",
            "a/../../b",
            "/tmp/x",
            "..",
            ".",
            "",
        ] {
            let body = futures::stream::iter(vec![Ok(Bytes::from_static(b"[]"))]);
            let err = store.put_stream(name, body).await.unwrap_err();
            assert!(!err.is_retryable(), "{name}");
            assert_eq!(
                err.message,
                format!(
                    "backup object name \"{name}\" is refused: it must stay under the backup \
                     directory {} (a relative path of plain names, no \"..\", \".\" or empty parts)",
                    root.display()
                )
            );
            assert!(store.temp_path(name).is_err(), "{name}");
        }
        let names: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "something was written: {names:?}");
        assert!(store.temp_path("p/staging/b.ndjson").is_ok());
    }
}
