//! Files that hold customer data or secrets (backups, staging objects, downloaded copies, the demo's
//! token and secret files) are private to the user crm-sync runs as: directories 0700, files 0600.
//! The mode is given when the file or directory is created, so a permissive umask (022, 002, 0)
//! cannot widen it and there is no moment when the file is readable by others before a chmod. Files are created with
//! `O_EXCL | O_NOFOLLOW`: an existing file or a symbolic link planted at the path is an error, never
//! written through.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of every directory crm-sync creates for data.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every data or secret file crm-sync creates.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode 0700 (directories that exist are left alone).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Options that create a new file with mode 0600 for writing: it must not exist yet, and a symbolic
/// link at the path is not followed.
pub fn new_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW);
    options
}

/// Creates a new file with mode 0600 (see [`new_file_options`]).
pub fn create_new(path: &Path) -> io::Result<File> {
    new_file_options().open(path)
}

/// [`create_new`] for async code.
pub async fn create_new_async(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::from(new_file_options())
        .open(path)
        .await
}

/// Writes `contents` to a new file with mode 0600 (see [`new_file_options`]), flushed to disk.
pub fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = create_new(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Replaces `path` with a new 0600 file holding `contents`: written beside it under a fresh name,
/// then renamed over it. A symbolic link at `path` is replaced, never written through.
pub fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.new-{}", uuid::Uuid::new_v4().simple()));
    write_new(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The permission bits of `path` itself (a symbolic link is not followed), e.g. `0o600`.
pub fn mode(path: &Path) -> io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        super::mode(path).unwrap()
    }

    #[test]
    fn creates_private_directories_and_files_whatever_the_umask() {
        // SAFETY: umask is process-wide; the most permissive one shows the modes do not rely on it.
        let old = unsafe { libc::umask(0) };
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).unwrap();
        write_new(&nested.join("f"), b"x").unwrap();
        unsafe { libc::umask(old) };
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&nested.join("f")), 0o600);
    }

    #[test]
    fn never_writes_through_a_link_or_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_new(&link, b"x").is_err());
        assert!(write_new(&target, b"x").is_err());
        replace(&link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
        assert_eq!(mode(&link), 0o600, "the link itself was replaced");
    }
}
