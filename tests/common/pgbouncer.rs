//! A real PgBouncer (Debian's package, 1.18) in TRANSACTION pool mode in front of a PostgreSQL server,
//! the way Supabase and other managed poolers are reached. Each test starts its own on a free loopback
//! port, with its config in a temporary directory; the process is stopped (and reaped) when the handle
//! drops, also after a panic.
//!
//! Where the program comes from: `scripts/test.sh` installs the `pgbouncer` apt package when it is
//! missing (`CRM_SYNC_PGBOUNCER_BIN` points elsewhere). PgBouncer refuses to run as root and tests run
//! as root, so the process is started as the `postgres` user (uid/gid switched before exec); the
//! temporary directory is handed to that user.
//!
//! ```ignore
//! let bouncer = common::pgbouncer::PgBouncer::start("127.0.0.1:5432");
//! let url = bouncer.url(&db.name); // postgres://postgres@127.0.0.1:PORT/NAME
//! ```

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The settings of the `[pgbouncer]` section; [`PgBouncer::start_with`] replaces or adds to them.
/// `listen_port`, `auth_file` and the `[databases]` line are filled in by [`PgBouncer::start_with`].
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addr", "127.0.0.1"),
    // TCP only: no socket file in /var/run/postgresql next to the server's.
    ("unix_socket_dir", ""),
    ("pool_mode", "transaction"),
    ("auth_type", "trust"),
    // The admin console (database `pgbouncer`, simple query protocol only): SHOW POOLS, SHOW SERVERS.
    ("admin_users", "postgres"),
    // sqlx sends it at startup; without this PgBouncer refuses the login.
    ("ignore_startup_parameters", "extra_float_digits"),
    ("default_pool_size", "20"),
    ("max_client_conn", "500"),
    // After a failed server login retry in 1 s, not the default 15 s.
    ("server_login_retry", "1"),
];

/// How long [`PgBouncer::start`] waits for the first login through the pooler.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// A running PgBouncer; stopped when dropped.
pub struct PgBouncer {
    /// The loopback port it listens on.
    pub port: u16,
    dir: TempDir,
    child: Child,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of `upstream` ("host:port", e.g.
    /// "127.0.0.1:5432", a trust-auth server with superuser `postgres`; every database name is passed
    /// through) and waits until a login through it (user and database `postgres`) succeeds.
    pub fn start(upstream: &str) -> PgBouncer {
        Self::start_with(upstream, &[])
    }

    /// [`PgBouncer::start`] with `[pgbouncer]` settings replaced or added, e.g.
    /// `&[("default_pool_size", "2")]` to make transactions share few server connections, or
    /// `&[("pool_mode", "session")]`.
    ///
    /// Call it from the test's own thread (not from `spawn_blocking`): the process is also killed
    /// when the thread that started it ends, so that a test process killed outright leaves no
    /// PgBouncer behind.
    pub fn start_with(upstream: &str, settings: &[(&str, &str)]) -> PgBouncer {
        let (host, upstream_port) = upstream
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("upstream {upstream:?} is not host:port"));
        // PgBouncer itself would keep the login waiting (query_wait_timeout) while it retries.
        let reachable = std::net::ToSocketAddrs::to_socket_addrs(upstream)
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
        assert!(
            reachable,
            "PgBouncer's upstream {upstream} is not reachable"
        );
        let dir = tempfile::Builder::new()
            .prefix("crm-sync-pgbouncer-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        let user = run_as();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown of PgBouncer's directory to postgres");
        }
        // The port is free when picked, not necessarily when PgBouncer binds it: retry on a clash.
        let mut last_log = String::new();
        let log_path = dir.path().join("pgbouncer.log");
        for _ in 0..5 {
            let listen_port = super::emulators::free_port();
            let ini = ini_text(host, upstream_port, listen_port, dir.path(), settings);
            std::fs::write(dir.path().join("pgbouncer.ini"), ini).unwrap();
            let log = std::fs::File::create(&log_path).unwrap();
            let mut command = Command::new(program());
            command
                .arg(dir.path().join("pgbouncer.ini"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            if let Some((uid, gid)) = user {
                command.uid(uid).gid(gid);
            }
            // SAFETY: prctl is async-signal-safe; nothing here allocates or locks. It runs after the
            // uid/gid switch (a credential change would clear the parent-death signal).
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program().display()));
            match wait_ready(&mut child, listen_port) {
                Ok(()) => {
                    return PgBouncer {
                        port: listen_port,
                        dir,
                        child,
                    };
                }
                Err(e) => {
                    let exited = child.try_wait().unwrap().is_some();
                    stop(&mut child);
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if exited && last_log.contains("Address already in use") {
                        continue;
                    }
                    panic!("PgBouncer in front of {upstream} not ready: {e}\nlog:\n{last_log}");
                }
            }
        }
        panic!("PgBouncer found no free port in 5 tries\nlast log:\n{last_log}");
    }

    /// The URL of database `dbname` through the pooler (user `postgres`, no password).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The URL of the admin console (`SHOW POOLS;` etc. with `sqlx::raw_sql`: simple protocol only).
    pub fn admin_url(&self) -> String {
        self.url("pgbouncer")
    }

    /// The process id (the PgBouncer process itself, not a shell).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What PgBouncer has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Logs in through the pooler until it answers ReadyForQuery (which needs a server login
/// upstream), the process exits, or [`READY_LIMIT`] passes.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("PgBouncer exited ({status})"));
        }
        match startup_login(port, deadline) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SIGTERM (PgBouncer's immediate shutdown), SIGKILL if it is still there after 5 s; reaps it.
fn stop(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: plain kill(2). The child is not reaped yet, so its pid cannot have been reused.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `CRM_SYNC_PGBOUNCER_BIN`, else Debian's `/usr/sbin/pgbouncer`, else `pgbouncer` on PATH.
fn program() -> PathBuf {
    if let Some(p) = std::env::var_os("CRM_SYNC_PGBOUNCER_BIN") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/pgbouncer");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("pgbouncer")
    }
}

/// The `postgres` user's uid and gid when running as root (PgBouncer will not), else `None`.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail; getpwnam's result is read before any other passwd call.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(
            !pw.is_null(),
            "running as root and there is no postgres user to run PgBouncer as"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn ini_text(
    host: &str,
    port: &str,
    listen_port: u16,
    dir: &Path,
    overrides: &[(&str, &str)],
) -> String {
    let mut settings: Vec<(String, String)> = DEFAULT_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    settings.push(("listen_port".into(), listen_port.to_string()));
    settings.push((
        "auth_file".into(),
        dir.join("userlist.txt").display().to_string(),
    ));
    for (key, value) in overrides {
        match settings.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => settings.push((key.to_string(), value.to_string())),
        }
    }
    let mut text = format!("[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n");
    for (key, value) in settings {
        text.push_str(&format!("{key} = {value}\n"));
    }
    text
}

/// One protocol-level login (StartupMessage as user and database `postgres`), read up to
/// ReadyForQuery, then Terminate. Std I/O only: usable before and outside any async runtime.
fn startup_login(port: u16, deadline: Instant) -> Result<(), String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, left).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(left)).unwrap();
    let mut body = 196_608_i32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    stream.write_all(&packet).map_err(|e| e.to_string())?;
    loop {
        let mut header = [0u8; 5];
        stream
            .read_exact(&mut header)
            .map_err(|e| format!("login: {e}"))?;
        let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len.saturating_sub(4)];
        stream
            .read_exact(&mut payload)
            .map_err(|e| format!("login: {e}"))?;
        match header[0] {
            b'Z' => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                return Ok(());
            }
            b'E' => {
                let text: Vec<String> = payload
                    .split(|b| *b == 0)
                    .filter(|f| f.len() > 1)
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .collect();
                return Err(format!("login refused: {}", text.join(" | ")));
            }
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0]) => {
                return Err("PgBouncer asked for a password (auth_type is not trust?)".into());
            }
            _ => {} // AuthenticationOk, ParameterStatus, BackendKeyData
        }
    }
}
