//! A PostgreSQL server of one test's own, for tests that stop and start the database. The shared
//! server on 5432 must never be restarted (every other test runs on it), so such a test gets a
//! throwaway cluster on a free port, stopped and removed when the handle drops, even after a panic.
//!
//! PostgreSQL refuses to run as root and tests run as root, so every server command runs as the
//! `postgres` user (`runuser`), in a temporary directory handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// Where Debian's PostgreSQL 15 server programs live.
const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PrivatePostgres {
    pub port: u16,
    dir: TempDir,
    running: bool,
}

impl PrivatePostgres {
    /// initdb (trust auth, superuser `postgres`) and start on a free loopback port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("crm-sync-pg-")
            .tempdir()
            .unwrap();
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(
            status.success(),
            "chown of the private cluster's directory failed"
        );
        let mut pg = Self {
            port: super::emulators::free_port(),
            dir,
            running: false,
        };
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
            ],
        );
        pg.resume();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server at once (`-m immediate`: no checkpoint, clients cut off, crash recovery on
    /// the next start), as a crashed or failed-over database would.
    pub fn crash(&mut self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
        self.running = false;
    }

    /// Starts the server again (same data, same port) and waits until it accepts connections.
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.log().display().to_string();
        self.pg_ctl(&["-l", &log, "-t", "60", "-o", &options, "start"]);
        self.running = true;
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data().display().to_string();
        let mut all = vec!["-D", &data, "-w"];
        all.extend_from_slice(args);
        self.as_postgres("pg_ctl", &all);
    }

    fn as_postgres(&self, program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(BIN).join(program))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("runuser {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(Path::new(BIN).join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // The TempDir removes the cluster's files.
    }
}
