//! The `browser_export` source's Chromium is private to crm-sync: real headless Chromium against the
//! Qashier fixture shows that, during an export, no process of the browser listens on a TCP port
//! (CDP goes over `--remote-debugging-pipe`), that the sandbox decision is logged with its reason
//! (and the sandbox really runs for an ordinary user), and that the scratch folders are 0700 and
//! the download 0600.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_sync::fixtures::qashier::{self, QashierConfig, QashierFixture};
use crm_sync::secrets::SecretRef;
use crm_sync::sources::browser::{BrowserError, BrowserExportConfig, Downloaded, export};

/// The fixture (its list slow enough to watch the browser for a while), secret files and a work
/// dir, all under `dir`.
async fn setup(dir: &Path) -> (QashierFixture, BrowserExportConfig, PathBuf) {
    let fixture = QashierFixture::start_on_free_port(QashierConfig {
        list_delay: Duration::from_millis(1500),
        ..QashierConfig::default()
    })
    .await
    .expect("qashier fixture");
    let user = dir.join("user");
    let pass = dir.join("pass");
    // Secret files others cannot read (crm-sync refuses them otherwise).
    crm_sync::private_fs::write_new(&user, qashier::DEFAULT_USERNAME.as_bytes()).unwrap();
    crm_sync::private_fs::write_new(&pass, qashier::DEFAULT_PASSWORD.as_bytes()).unwrap();
    let cfg = BrowserExportConfig::new(
        fixture.login_url(),
        SecretRef::file(user),
        SecretRef::file(pass),
    );
    (fixture, cfg, dir.join("work"))
}

/// What the watcher saw of one browser process.
#[derive(Debug, Clone)]
struct Seen {
    cmdline: String,
    /// TCP sockets of the process in LISTEN state, as "address:port" (hex, as /proc shows them).
    listening: Vec<String>,
    /// Its user namespace (`user:[inode]`).
    userns: String,
}

/// Processes whose command line names `path` (every Chromium process of an export names its
/// profile, which lives in the work dir).
fn browser_pids(path: &Path) -> Vec<i32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if pid != me && cmdline.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The TCP sockets `pid` holds that are listening: its socket inodes (/proc/PID/fd) matched
/// against the LISTEN rows (state 0A) of /proc/PID/net/tcp and tcp6.
fn listening_sockets(pid: i32) -> Vec<String> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                found.push(format!("{table} {}", cols[1]));
            }
        }
    }
    found
}

/// Watches the browser processes naming `work` every 50 ms until `stop`, and the modes of the
/// scratch dirs in `work`.
async fn watch(
    work: PathBuf,
    seen: Arc<Mutex<BTreeMap<i32, Seen>>>,
    modes: Arc<Mutex<Vec<String>>>,
) {
    loop {
        for pid in browser_pids(&work) {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            let listening = listening_sockets(pid);
            let userns = user_namespace(pid);
            let mut seen = seen.lock().unwrap();
            let entry = seen.entry(pid).or_insert(Seen {
                cmdline,
                listening: Vec::new(),
                userns,
            });
            entry.listening.extend(listening);
        }
        if let Ok(entries) = std::fs::read_dir(&work) {
            let mut modes = modes.lock().unwrap();
            modes.push(format!("work {:o}", mode(&work)));
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".chromium-") {
                    let kind = name.split('-').take(2).collect::<Vec<_>>().join("-");
                    modes.push(format!("{kind} {:o}", mode(&e.path())));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn user_namespace(pid: impl std::fmt::Display) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/user"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or(0)
}

/// A tracing writer that keeps everything.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Runs one export while watching its browser; returns the result, what was seen, the scratch
/// modes seen and the logs.
struct Watched {
    result: Result<Downloaded, BrowserError>,
    seen: BTreeMap<i32, Seen>,
    modes: Vec<String>,
    logs: String,
    elapsed: Duration,
}

impl Watched {
    /// The browser process (the first seen: the one of the first launch), not one of its
    /// children (`--type=renderer`, ...).
    fn browser(&self) -> &Seen {
        self.seen
            .values()
            .find(|s| !s.cmdline.contains("--type="))
            .unwrap_or_else(|| panic!("the browser process was never seen: {:#?}", self.seen))
    }
}

async fn watched_export(cfg: &BrowserExportConfig, work: &Path) -> Watched {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let modes = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn(watch(work.to_path_buf(), seen.clone(), modes.clone()));
    let started = std::time::Instant::now();
    let result = export(cfg, work).await;
    let elapsed = started.elapsed();
    watcher.abort();
    let _ = watcher.await;
    let seen = seen.lock().unwrap().clone();
    let modes = modes.lock().unwrap().clone();
    Watched {
        result,
        seen,
        modes,
        logs: logs.text(),
        elapsed,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn an_export_listens_on_no_tcp_port_and_keeps_its_files_private() {
    let dir = tempfile::tempdir().unwrap();
    let (fixture, cfg, work) = setup(dir.path()).await;
    let w = watched_export(&cfg, &work).await;
    let got = w.result.as_ref().expect("export");
    assert!(std::fs::read(&got.path).unwrap() == qashier::render_csv(fixture.config()));
    eprintln!("export took {:?}", w.elapsed);

    // The browser was seen, over a pipe, and none of its processes listened on TCP.
    let browser = w.browser();
    assert!(
        w.seen.len() > 2,
        "expected the browser and its children: {:#?}",
        w.seen
    );
    assert!(
        browser.cmdline.contains("--remote-debugging-pipe"),
        "{}",
        browser.cmdline
    );
    for (pid, s) in &w.seen {
        assert!(
            s.listening.is_empty(),
            "process {pid} listened on {:?}: {}",
            s.listening,
            s.cmdline
        );
        assert!(
            !s.cmdline.contains("--remote-debugging-port"),
            "{pid}: {}",
            s.cmdline
        );
    }

    // Scratch dirs 0700 while the browser ran, the work dir 0700, the download 0600.
    for kind in ["work", ".chromium-profile", ".chromium-download"] {
        let of_kind: Vec<&String> = w.modes.iter().filter(|m| m.starts_with(kind)).collect();
        assert!(!of_kind.is_empty(), "{kind} never seen: {:?}", w.modes);
        assert!(
            of_kind.iter().all(|m| m.ends_with(" 700")),
            "{kind}: {of_kind:?}"
        );
    }
    assert_eq!(mode(&work), 0o700);
    assert_eq!(mode(&got.path), 0o600);
}

#[tokio::test]
async fn the_sandbox_decision_is_logged_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_fixture, cfg, work) = setup(dir.path()).await;
    let w = watched_export(&cfg, &work).await;
    w.result.as_ref().expect("export");
    let line = w
        .logs
        .lines()
        .find(|l| l.contains("browser_export: chromium sandbox"))
        .unwrap_or_else(|| panic!("no sandbox line in the logs:\n{}", w.logs));
    let browser = w.browser();
    if is_root() {
        assert!(
            line.contains("WARN")
                && line.contains("sandbox off")
                && line.contains("runs as root (euid 0)"),
            "{line}"
        );
        assert!(
            browser.cmdline.contains("--no-sandbox"),
            "{}",
            browser.cmdline
        );
    } else {
        assert!(line.contains("sandbox on"), "{line}");
        assert!(
            !browser.cmdline.contains("--no-sandbox"),
            "{}",
            browser.cmdline
        );
    }

    // Turned off in the config: said so at info.
    let mut off = cfg.clone();
    off.sandbox = Some(false);
    let w = watched_export(&off, &dir.path().join("work-off")).await;
    w.result.as_ref().expect("export without the sandbox");
    assert!(
        w.logs.lines().any(|l| l.contains(" INFO ")
            && l.contains("sandbox off")
            && l.contains("`sandbox = false` in the source config")),
        "{}",
        w.logs
    );
}

#[tokio::test]
async fn a_required_sandbox_that_cannot_run_fails_with_the_reason_and_the_fix() {
    if !is_root() {
        eprintln!("not root: Chromium's sandbox is available, nothing to refuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (fixture, mut cfg, work) = setup(dir.path()).await;
    cfg.sandbox = Some(true);
    let err = export(&cfg, &work)
        .await
        .expect_err("Chromium refuses its sandbox as root");
    assert!(!err.is_retryable(), "{err:?}");
    let message = err.message();
    assert!(
        message.contains("Chromium cannot use its sandbox here")
            && message.contains("Running as root without --no-sandbox is not supported")
            && message.contains("`sandbox = false`"),
        "{message}"
    );
    assert_eq!(fixture.counts().logins_ok, 0);
    assert!(browser_pids(&work).is_empty());
}

/// Set in the environment of the copy of this test binary that runs as an ordinary user:
/// `sandbox` or `fallback`, the case it checks.
const AS_USER: &str = "CRM_SYNC_TEST_SANDBOX_AS_USER";

/// Runs `as_an_ordinary_user` of a copy of this test binary as `nobody` (uid 65534) with
/// `AS_USER=case`, directly or under `wrapper` (a shell script given the command as "$@");
/// returns its stderr once it has passed.
async fn run_as_nobody(case: &str, wrapper: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("test-binary");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let args = ["--exact", "as_an_ordinary_user", "--nocapture"];
    let mut cmd = match wrapper {
        Some(script) => {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c").arg(script).arg("sh").arg(&exe).args(args);
            cmd
        }
        None => {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(args).uid(65534).gid(65534);
            cmd
        }
    };
    let out = cmd
        .env(AS_USER, case)
        .env("HOME", &home)
        .env("TMPDIR", &home)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{}\n{stdout}\n{stderr}",
        out.status
    );
    let ok = format!("{case} case ok");
    let line = stderr.lines().find(|l| l.contains(&ok));
    eprintln!(
        "{}",
        line.unwrap_or_else(|| panic!("no {ok:?} in:\n{stderr}"))
    );
    stderr
}

/// Runs "$@" as uid/gid 65534 in a new user namespace whose own limit on user namespaces is 0
/// (the machine's stays as it is), as on a host or container that forbids them: the new
/// namespace maps ids 0-65535 onto the same ids outside (written from outside, as root), its
/// root sets the limit, then drops to `nobody`.
const NO_USER_NAMESPACES: &str = r#"
unshare -U sh -c 'while [ -z "$(cat /proc/self/uid_map)" ]; do sleep 0.02; done
  exec sh -c "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"\$@\"" sh "$@"' sh "$@" &
pid=$!
sleep 0.1
echo "0 0 65536" > /proc/$pid/gid_map
echo "0 0 65536" > /proc/$pid/uid_map
wait $pid
"#;

/// As an ordinary user the sandbox is on by default: the export runs in a copy of this binary as
/// `nobody` (see `as_an_ordinary_user`), its browser has no `--no-sandbox` and its renderers
/// run in user namespaces of their own.
#[tokio::test]
async fn as_an_ordinary_user_the_export_runs_sandboxed() {
    if !is_root() {
        eprintln!("not root: cannot switch to another user (the other tests cover this case)");
        return;
    }
    run_as_nobody("sandbox", None).await;
}

/// Where user namespaces are forbidden, Chromium finds no usable sandbox: the first launch fails,
/// the export goes on without the sandbox and says why, and later exports start without it.
#[tokio::test]
async fn without_user_namespaces_the_export_goes_on_unsandboxed_and_says_why() {
    if !is_root() {
        eprintln!("not root: cannot set up a user namespace without user namespaces");
        return;
    }
    run_as_nobody("fallback", Some(NO_USER_NAMESPACES)).await;
}

/// The half of the two tests above that runs as `nobody`; does nothing in an ordinary test run.
#[tokio::test]
async fn as_an_ordinary_user() {
    let Some(case) = std::env::var(AS_USER).ok() else {
        return;
    };
    assert!(!is_root());
    let dir = tempfile::tempdir().unwrap();
    let (_fixture, cfg, work) = setup(dir.path()).await;
    let w = watched_export(&cfg, &work).await;
    w.result.as_ref().expect("export");
    let browser = w.browser();
    for (pid, s) in &w.seen {
        assert!(s.listening.is_empty(), "{pid}: {:?}", s.listening);
    }
    if case == "sandbox" {
        assert!(
            w.logs
                .lines()
                .any(|l| l.contains(" INFO ") && l.contains("chromium sandbox on")),
            "{}",
            w.logs
        );
        assert!(
            !browser.cmdline.contains("--no-sandbox"),
            "{}",
            browser.cmdline
        );
        // Renderers run inside the sandbox: a user namespace of their own.
        let renderers: Vec<&Seen> = w
            .seen
            .values()
            .filter(|s| s.cmdline.contains("--type=renderer"))
            .collect();
        assert!(!renderers.is_empty(), "{:#?}", w.seen);
        let ours = user_namespace("self");
        for r in &renderers {
            assert!(
                !r.userns.is_empty() && r.userns != ours,
                "renderer in our user namespace {ours}: {r:#?}"
            );
        }
    } else {
        let warned = |logs: &str, reason: &str| {
            logs.lines().any(|l| {
                l.contains(" WARN ") && l.contains("chromium sandbox off") && l.contains(reason)
            })
        };
        assert!(
            warned(
                &w.logs,
                "Chromium found no usable sandbox (No usable sandbox!"
            ),
            "{}",
            w.logs
        );
        // The second launch (the first, sandboxed, exited at once).
        assert!(
            w.seen
                .values()
                .any(|s| !s.cmdline.contains("--type=") && s.cmdline.contains("--no-sandbox")),
            "{:#?}",
            w.seen
        );
        // The next export starts without it at once (one launch, one line).
        let again = watched_export(&cfg, &dir.path().join("again")).await;
        again.result.expect("second export");
        assert!(
            warned(&again.logs, "an earlier launch found no usable sandbox"),
            "{}",
            again.logs
        );
        let launches = again.logs.matches("chromium sandbox").count();
        assert_eq!(launches, 1, "{}", again.logs);
    }
    eprintln!("{case} case ok in {:?}", w.elapsed);
}
