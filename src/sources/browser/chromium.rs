//! The Chromium process of one export: launched in its own process group with a fresh profile
//! and download staging dir (both 0700, inside the work dir), connected over
//! `--remote-debugging-pipe` (no TCP port), with its sandbox on unless the platform or the config
//! rules it out (the reason is logged). Killed, reaped and cleaned up by `shutdown` or on drop.

use std::collections::VecDeque;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::browser::GetVersionParams;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::BrowserError;
use super::cdp::{self, Cdp};

/// Bound on Chromium answering its first command over the pipe.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `shutdown` waits for the killed browser to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of Chromium's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

/// Flags for an unattended, hermetic headless run (the launcher script /usr/bin/chromium adds
/// Debian's own flags from /etc/chromium.d on top). `--no-sandbox` is added only when
/// [`Sandbox::decide`] says so.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--remote-debugging-pipe",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-breakpad",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
    "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,Translate,MediaRouter",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1280,900",
];

/// What Chromium prints when it cannot start its sandbox.
const SANDBOX_REFUSALS: &[&str] = &["No usable sandbox", "without --no-sandbox"];

/// Set once a launch in this process found no usable sandbox (automatic mode then starts
/// without it at once).
static NO_USABLE_SANDBOX: AtomicBool = AtomicBool::new(false);

/// Whether Chromium runs sandboxed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sandbox {
    pub on: bool,
    pub reason: String,
}

impl Sandbox {
    /// `setting` is the source's `sandbox` (None: automatic).
    pub fn decide(setting: Option<bool>) -> Sandbox {
        let (on, reason) = match setting {
            Some(true) => (true, "`sandbox = true` in the source config"),
            Some(false) => (false, "`sandbox = false` in the source config"),
            // SAFETY: geteuid has no preconditions.
            None if unsafe { libc::geteuid() } == 0 => (
                false,
                "crm-sync runs as root (euid 0) and Chromium refuses its sandbox for root: \
                 run crm-sync as an ordinary user to have it",
            ),
            None if NO_USABLE_SANDBOX.load(Ordering::Relaxed) => (
                false,
                "an earlier launch found no usable sandbox (user namespaces are unavailable)",
            ),
            None => (true, "automatic: not root"),
        };
        Sandbox {
            on,
            reason: reason.to_string(),
        }
    }

    /// One line: info when the sandbox is on or was turned off in the config, warn otherwise.
    fn log(&self) {
        if self.on {
            tracing::info!(reason = %self.reason, "browser_export: chromium sandbox on");
        } else if self.reason.starts_with("`sandbox = false`") {
            tracing::info!(reason = %self.reason, "browser_export: chromium sandbox off");
        } else {
            tracing::warn!(reason = %self.reason, "browser_export: chromium sandbox off");
        }
    }
}

/// One Chromium process (in its own process group) plus its CDP connection.
pub(super) struct Chromium {
    pub cdp: Option<Cdp>,
    child: Option<Child>,
    pub pid: i32,
    stderr_task: Option<JoinHandle<()>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    // Declared last: removed after the process is dead (fields drop after `Drop::drop`).
    pub downloads: ScratchDir,
    pub profile: ScratchDir,
}

/// A failed start, and whether Chromium refused its sandbox.
struct StartFailure {
    error: BrowserError,
    sandbox_refused: Option<String>,
}

impl Chromium {
    /// Start Chromium for an export in `work_dir`; `sandbox` is the source's setting.
    pub async fn launch(
        exe: &Path,
        work_dir: &Path,
        sandbox: Option<bool>,
    ) -> Result<Chromium, BrowserError> {
        let mut decision = Sandbox::decide(sandbox);
        decision.log();
        loop {
            match Chromium::start(exe, work_dir, decision.on).await {
                Ok(chromium) => return Ok(chromium),
                Err(StartFailure {
                    sandbox_refused: Some(line),
                    ..
                }) if decision.on && sandbox.is_none() => {
                    NO_USABLE_SANDBOX.store(true, Ordering::Relaxed);
                    decision = Sandbox {
                        on: false,
                        reason: format!("Chromium found no usable sandbox ({line})"),
                    };
                    decision.log();
                }
                Err(StartFailure {
                    sandbox_refused: Some(line),
                    ..
                }) if decision.on => {
                    return Err(BrowserError::terminal(format!(
                        "Chromium cannot use its sandbox here ({line}): run crm-sync as an \
                         ordinary user where user namespaces are allowed (or install Debian's \
                         chromium-sandbox), or set `sandbox = false` in the source config"
                    )));
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    async fn start(exe: &Path, work_dir: &Path, sandbox: bool) -> Result<Chromium, StartFailure> {
        let fail = |error| StartFailure {
            error,
            sandbox_refused: None,
        };
        let io_err = |what: &str, e: std::io::Error| {
            fail(BrowserError::retryable(format!(
                "cannot create {what} in {}: {e}",
                work_dir.display()
            )))
        };
        let profile = ScratchDir::create(work_dir, ".chromium-profile-")
            .map_err(|e| io_err("the Chromium profile dir", e))?;
        let downloads = ScratchDir::create(work_dir, ".chromium-download-")
            .map_err(|e| io_err("the download staging dir", e))?;
        let (child_pipes, to_browser, from_browser) =
            cdp::pipes().map_err(|e| io_err("the DevTools pipes", e))?;

        let mut cmd = Command::new(exe);
        cmd.args(CHROMIUM_FLAGS)
            .args((!sandbox).then_some("--no-sandbox"))
            .arg(format!("--user-data-dir={}", profile.path.display()))
            .arg("about:blank")
            // Keeps crashpad's database and caches inside the run's profile, not in ~/.config.
            .env("XDG_CONFIG_HOME", profile.path.join("xdg-config"))
            .env("XDG_CACHE_HOME", profile.path.join("xdg-cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: the closure only calls dup2 (async-signal-safe) on descriptors it owns.
        unsafe {
            cmd.pre_exec(child_pipes.installer());
        }
        let mut child = cmd.spawn().map_err(|e| {
            let msg = format!("cannot start Chromium {}: {e}", exe.display());
            fail(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    BrowserError::terminal(msg)
                }
                _ => BrowserError::retryable(msg),
            })
        })?;
        // Our copies of the child's ends: closed, so that its exit reads as end of file.
        drop(child_pipes);
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(drain_stderr(stderr, stderr_tail.clone())));
        let mut chromium = Chromium {
            cdp: Some(Cdp::start(to_browser, from_browser)),
            child: Some(child),
            pid,
            stderr_task,
            stderr_tail,
            downloads,
            profile,
        };
        let first = match &chromium.cdp {
            Some(cdp) => {
                tokio::time::timeout(LAUNCH_TIMEOUT, cdp.call(None, GetVersionParams::default()))
                    .await
            }
            None => unreachable!("just connected"),
        };
        match first {
            Ok(Ok(_)) => Ok(chromium),
            Ok(Err(_)) => Err(chromium.exited_during_start().await),
            Err(_) => {
                let msg = format!(
                    "Chromium did not answer on its DevTools pipe within {}{}",
                    humantime::format_duration(LAUNCH_TIMEOUT),
                    chromium.stderr_summary()
                );
                chromium.shutdown().await;
                Err(fail(BrowserError::retryable(msg)))
            }
        }
    }

    /// The pipe closed before the first answer: Chromium exited. Its status and stderr say why.
    async fn exited_during_start(&mut self) -> StartFailure {
        let status = match self.child.as_mut() {
            Some(c) => tokio::time::timeout(Duration::from_secs(2), c.wait())
                .await
                .ok()
                .and_then(|r| r.ok()),
            None => None,
        };
        if status.is_some() {
            self.child = None;
        }
        if let Some(task) = self.stderr_task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        let sandbox_refused = {
            let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.iter()
                .find(|l| SANDBOX_REFUSALS.iter().any(|s| l.contains(s)))
                .map(|l| l.rsplit("] ").next().unwrap_or(l).trim().to_string())
        };
        let msg = format!(
            "Chromium exited during start-up ({}){}",
            status.map_or_else(|| "status unknown".to_string(), |s| s.to_string()),
            self.stderr_summary()
        );
        self.shutdown().await;
        StartFailure {
            error: BrowserError::retryable(msg),
            sandbox_refused,
        }
    }

    pub fn stderr_summary(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
            format!("; stderr: {}", lines.join(" | "))
        }
    }

    /// Kill the process group and reap the leader (bounded). Idempotent.
    pub async fn shutdown(&mut self) {
        self.cdp = None;
        if let Some(mut child) = self.child.take() {
            kill_group(self.pid);
            let _ = child.start_kill();
            kill_stragglers(&self.profile.path);
            if tokio::time::timeout(REAP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    pid = self.pid,
                    "browser_export: chromium not reaped after SIGKILL; left to the runtime"
                );
            }
        }
        if let Some(task) = self.stderr_task.take() {
            task.abort();
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Reached with a live child only when the export future was dropped mid-flight.
        self.cdp = None;
        if let Some(mut child) = self.child.take() {
            kill_group(self.pid);
            let _ = child.start_kill();
            kill_stragglers(&self.profile.path);
            // Reap synchronously (briefly) so the profile can be removed below; tokio's
            // kill_on_drop/orphan reaping covers the rest.
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < until {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        if let Some(task) = self.stderr_task.take() {
            task.abort();
        }
    }
}

/// Keep draining Chromium's stderr (a full pipe would block it) into a short tail for error
/// messages.
async fn drain_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // D-Bus complaints are noise in a container.
        if line.trim().is_empty() || line.contains("dbus") {
            continue;
        }
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// SIGKILL the process group `pgid` (the leader is not reaped yet, so the id cannot have been
/// reused).
fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// SIGKILL any other process whose command line names `profile`: Chromium's crashpad handlers
/// run in their own session (outside the process group); they normally exit with the browser.
/// Linux only (reads /proc); elsewhere a no-op.
fn kill_stragglers(profile: &Path) {
    let needle = profile.as_os_str().as_encoded_bytes();
    if needle.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if pid > 1 && cmdline.windows(needle.len()).any(|w| w == needle) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Create `dir` (and missing parents) as 0700, whatever the umask; an existing `dir` is left
/// as it is (it belongs to the caller).
pub(super) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A directory created fresh (0700) inside `work_dir`, removed (recursively) on drop.
pub(super) struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    fn create(parent: &Path, prefix: &str) -> std::io::Result<ScratchDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = parent.join(format!("{prefix}{}-{n}-{nanos:08x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = ScratchDir { path };
                    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // A killed process may still be finishing a write: retry briefly.
        for attempt in 0..5 {
            match std::fs::remove_dir_all(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "browser_export: cannot remove scratch dir");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
