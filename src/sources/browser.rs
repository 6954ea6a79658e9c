//! `browser_export` source: drives a back office that has no API (Qashier) with headless
//! Chromium and captures the CSV it downloads.
//!
//! Flow: launch a private Chromium (fresh user-data dir, own process group, CDP over
//! `--remote-debugging-pipe`: no TCP port; sandboxed unless the platform or `sandbox = false`
//! rules it out, see [`chromium`]) → open `login_url`
//! → fill the inputs found *by their label text* → click the Login button (found by its visible
//! text) → wait until the login form goes away (or an alert rejects the login) → poll the DOM until
//! the Export button appears (hash-routed app: no navigation event is relied on) → click Export,
//! then Confirm → follow the download through CDP download events (`Browser.setDownloadBehavior`
//! with `allowAndName` + events) → check the file is complete → move it to
//! `work_dir/<download_name>`.
//!
//! Guarantees:
//! - every wait is bounded (launch, page load, login, Export, Confirm, download, each CDP call);
//! - the browser is always reaped: on success and on error it is killed (the whole process group)
//!   and waited for; if the future is dropped mid-flight (cancellation, panic), `Drop` kills the
//!   group and reaps it; the profile and download staging directories (inside `work_dir`) are
//!   removed; the work dir, profile and staging dirs are 0700 and the download 0600;
//! - a failed or interrupted download never leaves a file at `work_dir/<download_name>`;
//! - credentials travel only in CDP `Input.insertText` messages over the private pipe; no CDP
//!   message is ever logged, and error texts read from the page are redacted, so they appear in
//!   no log or error.
//!
//! Errors carry a class ([`ErrorClass::Retryable`] or [`ErrorClass::Terminal`]) and, when the
//! page was open, a PNG screenshot taken at the moment of failure.

mod cdp;
mod chromium;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::browser::{
    DownloadProgressState, EventDownloadProgress, EventDownloadWillBegin,
    SetDownloadBehaviorBehavior, SetDownloadBehaviorParams,
};
use chromiumoxide::cdp::browser_protocol::input::InsertTextParams;
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use self::cdp::{CdpError, Tab};
use self::chromium::Chromium;
use crate::secrets::SecretRef;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `source = { kind = "browser_export", ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserExportConfig {
    /// Page to open, e.g. `"{base}/#/login?redirect=/customer-management"`.
    pub login_url: String,
    /// User name of the back office.
    pub username: SecretRef,
    /// Password of the back office.
    pub password: SecretRef,
    /// Text of the `<label>` of the user-name input.
    #[serde(default = "defaults::username_label")]
    pub username_label: String,
    /// Text of the `<label>` of the password input.
    #[serde(default = "defaults::password_label")]
    pub password_label: String,
    /// Visible text of the login button.
    #[serde(default = "defaults::login_button")]
    pub login_button: String,
    /// Visible text of the export button (may be inside a span).
    #[serde(default = "defaults::export_button")]
    pub export_button: String,
    /// Visible text of the confirm button of the export dialog.
    #[serde(default = "defaults::confirm_button")]
    pub confirm_button: String,
    /// Name the file is saved under in `work_dir` (and the name the site is expected to suggest).
    #[serde(default = "defaults::download_name")]
    pub download_name: String,
    /// Chromium executable; default `$CHROMIUM`, `/usr/bin/chromium`, or `chromium` on `PATH`.
    #[serde(default)]
    pub chromium: Option<PathBuf>,
    /// Chromium's sandbox: unset = on unless crm-sync runs as root or Chromium finds no usable
    /// sandbox (the reason is logged); `true` = required (the export fails if it cannot be
    /// had); `false` = off.
    #[serde(default)]
    pub sandbox: Option<bool>,
    /// Bound on opening the login page, on finding the form, and on the login itself.
    #[serde(
        default = "defaults::login_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub login_timeout: Duration,
    /// Bound on the Export button appearing after login (the list loads slowly).
    #[serde(
        default = "defaults::export_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub export_timeout: Duration,
    /// Bound on the Confirm button appearing and on the download completing.
    #[serde(
        default = "defaults::download_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub download_timeout: Duration,
}

mod defaults {
    use std::time::Duration;

    pub fn username_label() -> String {
        "Username".into()
    }
    pub fn password_label() -> String {
        "Password".into()
    }
    pub fn login_button() -> String {
        "Login".into()
    }
    pub fn export_button() -> String {
        "Export".into()
    }
    pub fn confirm_button() -> String {
        "Confirm".into()
    }
    pub fn download_name() -> String {
        "Customer Management.csv".into()
    }
    pub fn login_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn export_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn download_timeout() -> Duration {
        Duration::from_secs(120)
    }
}

/// Durations are humantime strings in the config (`"30s"`, `"2m"`, `"1m 30s"`).
impl BrowserExportConfig {
    /// A config with every optional field at its default.
    pub fn new(login_url: impl Into<String>, username: SecretRef, password: SecretRef) -> Self {
        BrowserExportConfig {
            login_url: login_url.into(),
            username,
            password,
            username_label: defaults::username_label(),
            password_label: defaults::password_label(),
            login_button: defaults::login_button(),
            export_button: defaults::export_button(),
            confirm_button: defaults::confirm_button(),
            download_name: defaults::download_name(),
            chromium: None,
            sandbox: None,
            login_timeout: defaults::login_timeout(),
            export_timeout: defaults::export_timeout(),
            download_timeout: defaults::download_timeout(),
        }
    }

    /// Static checks (what `check-config` can report without running anything).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.login_url.starts_with("http://") || self.login_url.starts_with("https://")) {
            return Err("login_url must be an http:// or https:// URL".into());
        }
        for (name, value) in [
            ("username_label", &self.username_label),
            ("password_label", &self.password_label),
            ("login_button", &self.login_button),
            ("export_button", &self.export_button),
            ("confirm_button", &self.confirm_button),
        ] {
            if value.trim().is_empty() {
                return Err(format!("{name} must not be empty"));
            }
        }
        let name = &self.download_name;
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\\')
            || name.contains('\0')
        {
            return Err(format!(
                "download_name {name:?} must be a plain file name (no directory)"
            ));
        }
        for (field, d) in [
            ("login_timeout", self.login_timeout),
            ("export_timeout", self.export_timeout),
            ("download_timeout", self.download_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{field} must be more than zero"));
            }
        }
        Ok(())
    }

    /// The Chromium executable to run: `chromium` if set, else `$CHROMIUM`, else
    /// `/usr/bin/chromium`, else `chromium` / `chromium-browser` on `PATH`.
    pub fn chromium_path(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.chromium {
            return Ok(p.clone());
        }
        if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        let default = Path::new("/usr/bin/chromium");
        if default.is_file() {
            return Ok(default.to_path_buf());
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                for name in ["chromium", "chromium-browser"] {
                    let candidate = dir.join(name);
                    if candidate.is_file() {
                        return Ok(candidate);
                    }
                }
            }
        }
        Err(
            "no Chromium executable found: set `chromium` in the source config or $CHROMIUM, \
             or install Debian's `chromium` package"
                .into(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Results and errors
// ---------------------------------------------------------------------------------------------

/// The captured download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// `work_dir/<download_name>`: complete, owned by the caller from now on.
    pub path: PathBuf,
    /// The file name the site suggested (Content-Disposition).
    pub suggested_name: String,
    /// Size of the file.
    pub bytes: u64,
}

/// Whether running the source again may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (slow page, cut download, browser crash): retry with backoff.
    Retryable,
    /// Retrying cannot help (rejected login, bad config, no Chromium): fail the run.
    Terminal,
}

/// A failed export. The message never contains a credential.
#[derive(thiserror::Error)]
pub enum BrowserError {
    /// See [`ErrorClass::Retryable`].
    #[error("{message}")]
    Retryable {
        /// What went wrong, for the run log.
        message: String,
        /// PNG of the page at the moment of failure, when a page was open.
        screenshot: Option<Vec<u8>>,
    },
    /// See [`ErrorClass::Terminal`].
    #[error("{message}")]
    Terminal {
        /// What went wrong, for the run log.
        message: String,
        /// PNG of the page at the moment of failure, when a page was open.
        screenshot: Option<Vec<u8>>,
    },
}

impl BrowserError {
    pub(crate) fn retryable(message: impl Into<String>) -> Self {
        BrowserError::Retryable {
            message: message.into(),
            screenshot: None,
        }
    }

    pub(crate) fn terminal(message: impl Into<String>) -> Self {
        BrowserError::Terminal {
            message: message.into(),
            screenshot: None,
        }
    }

    /// Retryable or terminal.
    pub fn class(&self) -> ErrorClass {
        match self {
            BrowserError::Retryable { .. } => ErrorClass::Retryable,
            BrowserError::Terminal { .. } => ErrorClass::Terminal,
        }
    }

    /// Shorthand for `class() == Retryable`.
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// The message (same as `Display`).
    pub fn message(&self) -> &str {
        match self {
            BrowserError::Retryable { message, .. } | BrowserError::Terminal { message, .. } => {
                message
            }
        }
    }

    /// The PNG screenshot taken at the moment of failure, if any.
    pub fn screenshot(&self) -> Option<&[u8]> {
        match self {
            BrowserError::Retryable { screenshot, .. }
            | BrowserError::Terminal { screenshot, .. } => screenshot.as_deref(),
        }
    }

    /// Move the screenshot out (e.g. to hand it to the backup store).
    pub fn take_screenshot(&mut self) -> Option<Vec<u8>> {
        match self {
            BrowserError::Retryable { screenshot, .. }
            | BrowserError::Terminal { screenshot, .. } => screenshot.take(),
        }
    }

    fn with_screenshot(mut self, png: Option<Vec<u8>>) -> Self {
        match &mut self {
            BrowserError::Retryable { screenshot, .. }
            | BrowserError::Terminal { screenshot, .. } => *screenshot = png,
        }
        self
    }
}

impl fmt::Debug for BrowserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the PNG would fill the log.
        f.debug_struct("BrowserError")
            .field("class", &self.class())
            .field("message", &self.message())
            .field("screenshot_bytes", &self.screenshot().map(<[u8]>::len))
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Tunables that are not in the config
// ---------------------------------------------------------------------------------------------

/// Bound on single CDP commands outside the configured waits (new page, download behaviour).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on taking the failure screenshot.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the DOM is polled while waiting for something to appear.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// Log in, export, and download the CSV into `work_dir` (created if missing; the caller owns
/// it). On success the file is `work_dir/<download_name>` (replacing any file of that name); on
/// failure nothing is written there (a partial download stays in a staging dir that is removed).
/// The browser, its profile and the staging directory (both `work_dir/.chromium-*`) are gone
/// when this returns or when the future is dropped.
pub async fn export(
    cfg: &BrowserExportConfig,
    work_dir: &Path,
) -> Result<Downloaded, BrowserError> {
    cfg.validate()
        .map_err(|e| BrowserError::terminal(format!("invalid browser_export config: {e}")))?;
    let creds = Credentials {
        username: cfg
            .username
            .resolve()
            .map(|s| s.expose().to_string())
            .map_err(|e| BrowserError::terminal(format!("username: {e}")))?,
        password: cfg
            .password
            .resolve()
            .map(|s| s.expose().to_string())
            .map_err(|e| BrowserError::terminal(format!("password: {e}")))?,
    };
    if creds.username.is_empty() || creds.password.is_empty() {
        return Err(BrowserError::terminal(
            "the username or password secret resolved to an empty value",
        ));
    }
    let exe = cfg.chromium_path().map_err(BrowserError::terminal)?;
    chromium::create_private_dir(work_dir).map_err(|e| {
        BrowserError::retryable(format!(
            "cannot create work dir {}: {e}",
            work_dir.display()
        ))
    })?;
    let work_dir = std::path::absolute(work_dir)
        .map_err(|e| BrowserError::retryable(format!("work dir {}: {e}", work_dir.display())))?;

    let started = Instant::now();
    let mut chromium = Chromium::launch(&exe, &work_dir, cfg.sandbox).await?;
    tracing::info!(
        pid = chromium.pid,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "browser_export: chromium started"
    );
    let result = run(&chromium, cfg, &creds, &work_dir).await;
    chromium.shutdown().await;
    let result = result.map_err(|e| {
        // Belt and braces: the page could echo what was typed.
        let message = creds.redact(e.message());
        match e {
            BrowserError::Retryable { screenshot, .. } => BrowserError::Retryable {
                message,
                screenshot,
            },
            BrowserError::Terminal { screenshot, .. } => BrowserError::Terminal {
                message,
                screenshot,
            },
        }
    });
    match &result {
        Ok(d) => tracing::info!(
            bytes = d.bytes,
            path = %d.path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "browser_export: download complete"
        ),
        Err(e) => tracing::warn!(
            class = ?e.class(),
            error = %e,
            screenshot = e.screenshot().is_some(),
            "browser_export: failed"
        ),
    }
    result
}

struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    /// Replace every occurrence of a credential (3+ characters) by `***`.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in [&self.password, &self.username] {
            if secret.chars().count() >= 3 {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(***)")
    }
}

// ---------------------------------------------------------------------------------------------
// One export in a launched browser
// ---------------------------------------------------------------------------------------------

/// Log in, export and move the download into `work_dir` (0600).
async fn run(
    chromium: &Chromium,
    cfg: &BrowserExportConfig,
    creds: &Credentials,
    work_dir: &Path,
) -> Result<Downloaded, BrowserError> {
    let cdp = chromium
        .cdp
        .as_ref()
        .ok_or_else(|| BrowserError::retryable("browser not connected"))?;
    // Subscribed first: no download event can be missed.
    let mut events = cdp.subscribe();
    let page = step("opening a tab", cdp.open_tab(1280, 900)).await?;

    // Downloads: saved under their GUID in the staging dir, with progress events.
    let behavior = SetDownloadBehaviorParams::builder()
        .behavior(SetDownloadBehaviorBehavior::AllowAndName)
        .download_path(chromium.downloads.path.to_string_lossy().into_owned())
        .events_enabled(true)
        .build()
        .map_err(BrowserError::retryable)?;
    step("enabling downloads", cdp.call(None, behavior)).await?;
    let downloads =
        futures::stream::poll_fn(move |cx| events.poll_recv(cx)).filter_map(|event| async move {
            if let Some(b) = event.parse::<EventDownloadWillBegin>(None) {
                Some(DownloadEvent::Begin(b))
            } else {
                event
                    .parse::<EventDownloadProgress>(None)
                    .map(DownloadEvent::Progress)
            }
        });
    let mut downloads = std::pin::pin!(downloads);

    let flow = Flow { page: &page, cfg };
    flow.login(creds).await?;
    flow.click_export_and_confirm().await?;
    let (guid, done, suggested) = flow.await_download(&mut downloads).await?;

    // Check the file, then move it into place.
    let staged = match &done.file_path {
        Some(p) if Path::new(p).is_file() => PathBuf::from(p),
        _ => chromium.downloads.path.join(&guid),
    };
    let len = tokio::fs::metadata(&staged)
        .await
        .map_err(|e| {
            BrowserError::retryable(format!(
                "Chromium reported the download complete but the file is missing: {e}"
            ))
        })?
        .len();
    let received = done.received_bytes as u64;
    let total = done.total_bytes as u64;
    if len != received || (total > 0 && len != total) {
        return Err(flow
            .fail(BrowserError::retryable(format!(
                "incomplete download of {suggested:?}: {len} bytes on disk, \
                 {received} received, {total} announced"
            )))
            .await);
    }
    if suggested != cfg.download_name {
        tracing::warn!(
            suggested = %suggested,
            expected = %cfg.download_name,
            "browser_export: the site suggested another file name; saving under the configured one"
        );
    }
    let dest = work_dir.join(&cfg.download_name);
    // Private before it is visible under its final name (Chromium makes downloads 0644).
    let private = std::fs::Permissions::from_mode(0o600);
    let moved = match tokio::fs::set_permissions(&staged, private).await {
        Ok(()) => tokio::fs::rename(&staged, &dest).await,
        Err(e) => Err(e),
    };
    moved.map_err(|e| {
        BrowserError::retryable(format!(
            "cannot move the download to {}: {e}",
            dest.display()
        ))
    })?;
    Ok(Downloaded {
        path: dest,
        suggested_name: suggested,
        bytes: len,
    })
}

/// Bound a CDP call by [`STEP_TIMEOUT`]; failures are retryable.
async fn step<T>(
    what: &str,
    fut: impl Future<Output = Result<T, CdpError>>,
) -> Result<T, BrowserError> {
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BrowserError::retryable(format!("{what}: {e}"))),
        Err(_) => Err(BrowserError::retryable(format!(
            "{what}: no answer from Chromium within {}",
            humantime::format_duration(STEP_TIMEOUT)
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// The page flow
// ---------------------------------------------------------------------------------------------

enum DownloadEvent {
    Begin(EventDownloadWillBegin),
    Progress(EventDownloadProgress),
}

/// DOM helpers injected with every call (no global state is left in the page).
const JS_LIB: &str = r#"
const norm = (s) => (s || '').replace(/\s+/g, ' ').trim();
const key = (s) => norm(s).replace(/[\s:*]+$/, '').toLowerCase();
const visible = (el) => {
  if (!el || !el.isConnected) return false;
  const st = window.getComputedStyle(el);
  if (st.visibility === 'hidden' || st.display === 'none') return false;
  const r = el.getBoundingClientRect();
  return r.width > 0 && r.height > 0;
};
const byLabel = (text) => {
  const want = key(text);
  for (const label of document.querySelectorAll('label')) {
    if (key(label.textContent) !== want) continue;
    const c = label.control;
    if (c && visible(c)) return c;
  }
  for (const el of document.querySelectorAll('[aria-labelledby]')) {
    const ids = (el.getAttribute('aria-labelledby') || '').split(/\s+/);
    const t = ids.map((id) => { const n = document.getElementById(id); return n ? n.textContent : ''; }).join(' ');
    if (key(t) === want && visible(el)) return el;
  }
  for (const el of document.querySelectorAll('input, textarea')) {
    if (key(el.getAttribute('aria-label')) === want && visible(el)) return el;
  }
  return null;
};
const buttonText = (el) => {
  if (el.tagName === 'INPUT') return el.value || el.getAttribute('aria-label') || '';
  return el.innerText || el.textContent || el.getAttribute('aria-label') || '';
};
const byText = (text) => {
  const want = key(text);
  const sel = 'button, input[type=submit], input[type=button], [role=button], a';
  let fallback = null;
  for (const el of document.querySelectorAll(sel)) {
    if (key(buttonText(el)) !== want || !visible(el)) continue;
    if (el.tagName === 'BUTTON' || el.tagName === 'INPUT') return el;
    if (!fallback) fallback = el;
  }
  return fallback;
};
"#;

/// Where a button is, once it is visible.
#[derive(Debug, Deserialize)]
struct ButtonSpot {
    found: bool,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    covered: bool,
    #[serde(default)]
    x: f64,
    #[serde(default)]
    y: f64,
}

#[derive(Debug, Deserialize)]
struct LoginState {
    alert: String,
    password_visible: bool,
}

#[derive(Debug, Deserialize)]
struct FormState {
    username: bool,
    password: bool,
    button: bool,
}

struct Flow<'a> {
    page: &'a Tab<'a>,
    cfg: &'a BrowserExportConfig,
}

impl Flow<'_> {
    /// Call `body` (a function body using `JS_LIB` and `arguments`) in the page.
    async fn js<T: DeserializeOwned>(
        &self,
        body: &str,
        args: &[serde_json::Value],
    ) -> Result<T, CdpError> {
        // The arguments are config texts (labels, button texts), never credentials.
        let args = serde_json::Value::from(args.to_vec());
        self.page
            .evaluate(format!(
                "(function() {{\n{JS_LIB}\n{body}\n}}).apply(null, {args})"
            ))
            .await
    }

    /// Attach a screenshot of the page to `err`. Text in inputs is masked first (the user name
    /// would otherwise be readable on a login-page screenshot).
    async fn fail(&self, err: BrowserError) -> BrowserError {
        const MASK: &str = r#"
for (const el of document.querySelectorAll('input, textarea')) el.style.webkitTextSecurity = 'disc';
return true;
"#;
        let masked = tokio::time::timeout(SCREENSHOT_TIMEOUT, self.js::<bool>(MASK, &[])).await;
        if !matches!(masked, Ok(Ok(true))) {
            tracing::debug!("browser_export: could not mask inputs before the screenshot");
        }
        let png = match tokio::time::timeout(SCREENSHOT_TIMEOUT, self.page.screenshot_png()).await {
            Ok(Ok(png)) if !png.is_empty() => Some(png),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "browser_export: screenshot failed");
                None
            }
            Err(_) => {
                tracing::warn!("browser_export: screenshot timed out");
                None
            }
        };
        err.with_screenshot(png)
    }

    /// Poll `probe` every [`POLL_INTERVAL`] until it yields `Some`, or `deadline` passes
    /// (`Ok(None)`). Script errors while the page changes are retried; a lost connection is not.
    async fn poll<T, F, Fut>(
        &self,
        deadline: Instant,
        mut probe: F,
    ) -> Result<Option<T>, BrowserError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, CdpError>>,
    {
        loop {
            match tokio::time::timeout_at(deadline, probe()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(v))) => return Ok(Some(v)),
                Ok(Ok(None)) => {}
                Ok(Err(e @ CdpError::Closed)) => {
                    return Err(self
                        .fail(BrowserError::retryable(format!(
                            "lost the connection to Chromium: {e}"
                        )))
                        .await);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "browser_export: probe failed; retrying"),
            }
            let next = Instant::now() + POLL_INTERVAL;
            if next >= deadline {
                return Ok(None);
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// Wait until a button with visible text `text` is shown and enabled, then click it.
    /// `Ok(false)` when `deadline` passed first.
    async fn click_button(&self, text: &str, deadline: Instant) -> Result<bool, BrowserError> {
        const LOCATE: &str = r#"
const el = byText(arguments[0]);
if (!el) return { found: false };
if (el.disabled || el.getAttribute('aria-disabled') === 'true') return { found: true, disabled: true };
el.scrollIntoView({ block: 'center', inline: 'center', behavior: 'instant' });
const r = el.getBoundingClientRect();
const x = r.left + r.width / 2, y = r.top + r.height / 2;
const hit = document.elementFromPoint(x, y);
return { found: true, disabled: false, covered: !(hit && (hit === el || el.contains(hit))), x, y };
"#;
        let arg = [serde_json::Value::from(text)];
        let spot = self
            .poll(deadline, || async {
                let spot: ButtonSpot = self.js(LOCATE, &arg).await?;
                Ok((spot.found && !spot.disabled).then_some(spot))
            })
            .await?;
        let Some(spot) = spot else {
            return Ok(false);
        };
        if spot.covered {
            // Something overlays the button's centre: fall back to a DOM click.
            tracing::debug!(
                button = text,
                "browser_export: button covered; using a DOM click"
            );
            let clicked: bool = step(
                &format!("clicking {text:?}"),
                self.js(
                    "const el = byText(arguments[0]); if (el) el.click(); return !!el;",
                    &arg,
                ),
            )
            .await?;
            return Ok(clicked);
        }
        step(
            &format!("clicking {text:?}"),
            self.page.click(spot.x, spot.y),
        )
        .await?;
        Ok(true)
    }

    /// Focus the input labelled `label`, clear it, and type `value` into it.
    async fn fill(&self, label: &str, value: &str) -> Result<(), BrowserError> {
        const FOCUS: &str = r#"
const el = byLabel(arguments[0]);
if (!el) return false;
el.scrollIntoView({ block: 'center', behavior: 'instant' });
el.focus();
const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
const setter = Object.getOwnPropertyDescriptor(proto, 'value').set;
setter.call(el, '');
el.dispatchEvent(new Event('input', { bubbles: true }));
return document.activeElement === el;
"#;
        const LENGTH: &str = r#"
const el = byLabel(arguments[0]);
return el ? el.value.length : -1;
"#;
        let arg = [serde_json::Value::from(label)];
        let focused: bool = step(
            &format!("focusing the {label:?} field"),
            self.js(FOCUS, &arg),
        )
        .await?;
        if !focused {
            return Err(self
                .fail(BrowserError::retryable(format!(
                    "cannot focus the input labelled {label:?}"
                )))
                .await);
        }
        // The value goes only into this CDP message (never into a script or a log).
        step(
            &format!("typing into the {label:?} field"),
            self.page.call(InsertTextParams::new(value)),
        )
        .await?;
        let len: i64 = step(
            &format!("reading the {label:?} field"),
            self.js(LENGTH, &arg),
        )
        .await?;
        let want = value.encode_utf16().count() as i64;
        if len != want {
            tracing::warn!(
                field = label,
                typed = want,
                held = len,
                "browser_export: the field does not hold what was typed"
            );
        }
        Ok(())
    }

    async fn login(&self, creds: &Credentials) -> Result<(), BrowserError> {
        let cfg = self.cfg;
        let timeout = cfg.login_timeout;
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.page.goto(&cfg.login_url)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(self
                    .fail(BrowserError::retryable(format!(
                        "cannot open the login page: {e}"
                    )))
                    .await);
            }
            Err(_) => {
                return Err(self
                    .fail(BrowserError::retryable(format!(
                        "the login page did not load within {}",
                        humantime::format_duration(timeout)
                    )))
                    .await);
            }
        }

        // The form: both labelled inputs and the button.
        const FORM: &str = r#"
return { username: !!byLabel(arguments[0]), password: !!byLabel(arguments[1]), button: !!byText(arguments[2]) };
"#;
        let args = [
            serde_json::Value::from(cfg.username_label.as_str()),
            serde_json::Value::from(cfg.password_label.as_str()),
            serde_json::Value::from(cfg.login_button.as_str()),
        ];
        let last: std::sync::Mutex<Option<FormState>> = std::sync::Mutex::new(None);
        let form = self
            .poll(deadline, || {
                let probe = self.js::<FormState>(FORM, &args);
                let last = &last;
                async move {
                    let state = probe.await?;
                    let ready = state.username && state.password && state.button;
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
                    Ok(ready.then_some(()))
                }
            })
            .await?;
        if form.is_none() {
            let missing = match last.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(s) => [
                    (!s.username).then(|| format!("input labelled {:?}", cfg.username_label)),
                    (!s.password).then(|| format!("input labelled {:?}", cfg.password_label)),
                    (!s.button).then(|| format!("button {:?}", cfg.login_button)),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", "),
                None => "the page did not answer".to_string(),
            };
            return Err(self
                .fail(BrowserError::retryable(format!(
                    "login form not found within {} (missing: {missing})",
                    humantime::format_duration(timeout)
                )))
                .await);
        }

        self.fill(&cfg.username_label, &creds.username).await?;
        self.fill(&cfg.password_label, &creds.password).await?;
        if !self.click_button(&cfg.login_button, deadline).await? {
            return Err(self
                .fail(BrowserError::retryable(format!(
                    "the {:?} button could not be clicked within {}",
                    cfg.login_button,
                    humantime::format_duration(timeout)
                )))
                .await);
        }
        tracing::debug!("browser_export: login submitted");

        // Outcome: an alert while the form is still there (rejected), or the form goes away.
        const OUTCOME: &str = r#"
let alert = '';
for (const el of document.querySelectorAll('[role="alert"], [aria-live="assertive"], #login-error')) {
  const t = norm(el.innerText || el.textContent);
  if (t && visible(el)) { alert = t; break; }
}
const pw = byLabel(arguments[0]);
return { alert, password_visible: !!pw };
"#;
        let arg = [serde_json::Value::from(cfg.password_label.as_str())];
        let deadline = Instant::now() + timeout;
        let outcome = self
            .poll(deadline, || async {
                let s: LoginState = self.js(OUTCOME, &arg).await?;
                Ok(if !s.password_visible {
                    Some(Ok(()))
                } else if !s.alert.is_empty() {
                    Some(Err(s.alert))
                } else {
                    None
                })
            })
            .await?;
        match outcome {
            Some(Ok(())) => {
                tracing::info!("browser_export: logged in");
                Ok(())
            }
            Some(Err(alert)) => Err(self
                .fail(BrowserError::terminal(format!(
                    "login rejected: {}",
                    creds.redact(&alert)
                )))
                .await),
            None => Err(self
                .fail(BrowserError::retryable(format!(
                    "login did not complete within {} (the login form is still shown)",
                    humantime::format_duration(timeout)
                )))
                .await),
        }
    }

    async fn click_export_and_confirm(&self) -> Result<(), BrowserError> {
        let cfg = self.cfg;
        let deadline = Instant::now() + cfg.export_timeout;
        if !self.click_button(&cfg.export_button, deadline).await? {
            return Err(self
                .fail(BrowserError::retryable(format!(
                    "{} button did not appear within {}",
                    cfg.export_button,
                    humantime::format_duration(cfg.export_timeout)
                )))
                .await);
        }
        tracing::info!("browser_export: clicked {:?}", cfg.export_button);
        let deadline = Instant::now() + cfg.download_timeout;
        if !self.click_button(&cfg.confirm_button, deadline).await? {
            return Err(self
                .fail(BrowserError::retryable(format!(
                    "{} button did not appear within {} after clicking {}",
                    cfg.confirm_button,
                    humantime::format_duration(cfg.download_timeout),
                    cfg.export_button
                )))
                .await);
        }
        tracing::info!("browser_export: clicked {:?}", cfg.confirm_button);
        Ok(())
    }

    /// Follow the first download that begins; returns (guid, final progress, suggested name).
    async fn await_download(
        &self,
        events: &mut (impl futures::Stream<Item = DownloadEvent> + Unpin),
    ) -> Result<(String, EventDownloadProgress, String), BrowserError> {
        let timeout = self.cfg.download_timeout;
        let deadline = Instant::now() + timeout;
        // (guid, suggested name) of the download being followed. (Its URL may carry a session
        // token: never logged.)
        let mut current: Option<(String, String)> = None;
        let mut last: HashMap<String, EventDownloadProgress> = HashMap::new();
        let mut most_received: HashMap<String, u64> = HashMap::new();
        loop {
            if let Some((guid, name)) = &current
                && let Some(p) = last.get(guid)
            {
                match p.state {
                    DownloadProgressState::Completed => {
                        return Ok((guid.clone(), p.clone(), name.clone()));
                    }
                    DownloadProgressState::Canceled => {
                        let got = most_received.get(guid).copied().unwrap_or(0);
                        let total = p.total_bytes as u64;
                        // CDP does not say why: an HTTP error status, or a connection lost
                        // (Chromium retries those a few times by itself before giving up).
                        let of_total = if total > 0 {
                            format!(" of {total}")
                        } else {
                            String::new()
                        };
                        let msg = format!(
                            "download of {name:?} was interrupted after {got}{of_total} bytes \
                             (the server answered an error or the connection was lost)"
                        );
                        return Err(self.fail(BrowserError::retryable(msg)).await);
                    }
                    DownloadProgressState::InProgress => {}
                }
            }
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(DownloadEvent::Begin(b))) => {
                    if current.is_none() {
                        tracing::info!(name = %b.suggested_filename, "browser_export: download started");
                        current = Some((b.guid, b.suggested_filename));
                    }
                }
                Ok(Some(DownloadEvent::Progress(p))) => {
                    let most = most_received.entry(p.guid.clone()).or_default();
                    *most = (*most).max(p.received_bytes as u64);
                    last.insert(p.guid.clone(), p);
                }
                Ok(None) => {
                    return Err(BrowserError::retryable(
                        "lost the connection to Chromium during the download",
                    ));
                }
                Err(_) => {
                    let msg = match &current {
                        None => format!(
                            "the download did not start within {} after clicking {}",
                            humantime::format_duration(timeout),
                            self.cfg.confirm_button
                        ),
                        Some((guid, name)) => {
                            let got = last.get(guid).map_or(0, |p| p.received_bytes as u64);
                            let total = last.get(guid).map_or(0, |p| p.total_bytes as u64);
                            format!(
                                "the download of {name:?} did not complete within {} ({got} of {total} bytes)",
                                humantime::format_duration(timeout)
                            )
                        }
                    };
                    return Err(self.fail(BrowserError::retryable(msg)).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real headless Chromium against the Qashier fixture. Browser tests run one at a time
    //! (`SERIAL`): the machine has two cores.

    use super::*;
    use crate::fixtures::qashier::{self, Fault, QashierConfig, QashierFixture};
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    struct Env {
        fx: QashierFixture,
        _dir: tempfile::TempDir,
        work: PathBuf,
        cfg: BrowserExportConfig,
    }

    async fn env_with(qcfg: QashierConfig, password: &str) -> Env {
        let fx = QashierFixture::start_on_free_port(qcfg)
            .await
            .expect("fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).expect("secrets dir");
        crate::private_fs::write_new(
            &secrets.join("user"),
            format!("{}\n", fx.config().username).as_bytes(),
        )
        .unwrap();
        crate::private_fs::write_new(&secrets.join("pass"), format!("{password}\n").as_bytes())
            .unwrap();
        let work = dir.path().join("work");
        let cfg = BrowserExportConfig::new(
            fx.login_url(),
            SecretRef::file(secrets.join("user")),
            SecretRef::file(secrets.join("pass")),
        );
        Env {
            fx,
            _dir: dir,
            work,
            cfg,
        }
    }

    async fn env() -> Env {
        env_with(QashierConfig::default(), qashier::DEFAULT_PASSWORD).await
    }

    /// Processes whose command line mentions `path` (the profile lives under it, so every
    /// Chromium process of a run names it). Zombies have no command line and do not count.
    fn processes_mentioning(path: &Path) -> Vec<String> {
        let needle = path.to_string_lossy().into_owned();
        let me = std::process::id().to_string();
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                continue;
            }
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&needle) {
                found.push(format!(
                    "{name}: {}",
                    cmd.chars().take(160).collect::<String>()
                ));
            }
        }
        found
    }

    /// No process of the run may remain (SIGKILL is asynchronous: allow a short grace).
    async fn assert_no_browser_left(work: &Path) {
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            let left = processes_mentioning(work);
            if left.is_empty() {
                return;
            }
            if Instant::now() >= until {
                panic!("browser processes left behind: {left:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn is_png(bytes: &[u8]) -> bool {
        bytes.len() > 100 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
    }

    /// Checks the failure screenshot; with `BROWSER_TEST_SCREENSHOTS=<dir>` also saves it there
    /// to look at.
    fn check_screenshot(err: &BrowserError, name: &str) {
        let png = err.screenshot().expect("a screenshot");
        assert!(is_png(png), "not a PNG ({} bytes)", png.len());
        if let Some(dir) = std::env::var_os("BROWSER_TEST_SCREENSHOTS") {
            std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    /// A tracing subscriber that records everything, TRACE included.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[tokio::test]
    async fn full_flow_downloads_the_exact_csv_and_logs_no_credential() {
        let _serial = SERIAL.lock().await;
        let e = env().await;
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let started = Instant::now();
        let got = export(&e.cfg, &e.work).await.expect("export");
        let elapsed = started.elapsed();

        let want = qashier::render_csv(e.fx.config());
        let bytes = std::fs::read(&got.path).expect("read download");
        assert_eq!(bytes.len(), want.len());
        assert!(bytes == want, "downloaded bytes differ from render_csv");
        assert_eq!(got.path, e.work.join(qashier::CSV_FILENAME));
        assert_eq!(got.suggested_name, qashier::CSV_FILENAME);
        assert_eq!(got.bytes, want.len() as u64);
        let counts = e.fx.counts();
        assert_eq!(counts.logins_ok, 1);
        assert_eq!(counts.downloads, 1);
        assert_eq!(
            dir_entries(&e.work),
            vec![qashier::CSV_FILENAME.to_string()]
        );
        assert_no_browser_left(&e.work).await;

        let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(logs.contains("browser_export: logged in"), "logs: {logs}");
        assert!(
            !logs.contains(qashier::DEFAULT_PASSWORD),
            "password in logs"
        );
        assert!(
            !logs.contains(qashier::DEFAULT_USERNAME),
            "username in logs"
        );
        eprintln!("full flow took {elapsed:?}");
    }

    #[tokio::test]
    async fn wrong_password_is_terminal_with_a_screenshot_and_no_download() {
        let _serial = SERIAL.lock().await;
        let e = env_with(QashierConfig::default(), "not-the-password").await;
        let err = export(&e.cfg, &e.work).await.expect_err("must fail");
        assert_eq!(err.class(), ErrorClass::Terminal, "{err:?}");
        assert_eq!(
            err.message(),
            "login rejected: Invalid username or password"
        );
        assert!(!err.to_string().contains("not-the-password"));
        check_screenshot(&err, "login-rejected");
        let counts = e.fx.counts();
        assert_eq!(counts.logins_failed, 1);
        assert_eq!(counts.logins_ok, 0);
        assert_eq!(counts.downloads + counts.downloads_refused, 0);
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
        assert_no_browser_left(&e.work).await;
    }

    #[tokio::test]
    async fn export_button_that_never_appears_times_out_retryably() {
        let _serial = SERIAL.lock().await;
        let mut e = env().await;
        e.fx.faults().set(Fault::ListDelay(Duration::ZERO));
        e.fx.faults().set(Fault::ExportNeverAppears);
        e.cfg.export_timeout = Duration::from_secs(3);
        let started = Instant::now();
        let err = export(&e.cfg, &e.work).await.expect_err("must fail");
        assert_eq!(err.class(), ErrorClass::Retryable, "{err:?}");
        assert_eq!(err.message(), "Export button did not appear within 3s");
        check_screenshot(&err, "export-missing");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(e.fx.counts().list_loads, 1);
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
        assert_no_browser_left(&e.work).await;
    }

    #[tokio::test]
    async fn cut_download_is_retryable_and_leaves_no_file() {
        let _serial = SERIAL.lock().await;
        let e = env().await;
        e.fx.faults().set(Fault::ListDelay(Duration::ZERO));
        e.fx.faults().set(Fault::CutDownloadAfter(10_000));
        let err = export(&e.cfg, &e.work).await.expect_err("must fail");
        assert_eq!(err.class(), ErrorClass::Retryable, "{err:?}");
        assert!(err.message().contains("interrupted"), "{err:?}");
        check_screenshot(&err, "download-cut");
        // Chromium resumes an interrupted download by itself a few times before giving up.
        assert!(e.fx.counts().downloads >= 1);
        eprintln!("cut download: {err} ({} requests)", e.fx.counts().downloads);
        assert!(!e.work.join(qashier::CSV_FILENAME).exists());
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
        assert_no_browser_left(&e.work).await;
    }

    #[tokio::test]
    async fn server_error_on_download_is_retryable_then_a_rerun_succeeds() {
        let _serial = SERIAL.lock().await;
        let e = env().await;
        e.fx.faults().set(Fault::ListDelay(Duration::ZERO));
        e.fx.faults().set(Fault::FailDownloadsNext(1));
        let err = export(&e.cfg, &e.work).await.expect_err("must fail");
        assert_eq!(err.class(), ErrorClass::Retryable, "{err:?}");
        assert_eq!(e.fx.counts().downloads_refused, 1);
        eprintln!("server error: {err}");
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
        assert_no_browser_left(&e.work).await;

        let got = export(&e.cfg, &e.work).await.expect("second run");
        assert!(std::fs::read(&got.path).unwrap() == qashier::render_csv(e.fx.config()));
        assert_no_browser_left(&e.work).await;
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_browser_and_removes_the_profile() {
        let _serial = SERIAL.lock().await;
        let e = env().await;
        // The list never loads in time: the export is stuck waiting for the Export button.
        e.fx.faults().set(Fault::ListDelay(Duration::from_secs(60)));
        let mut fut = Box::pin(export(&e.cfg, &e.work));
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            tokio::select! {
                r = &mut fut => panic!("export ended early: {:?}", r.map(|d| d.path)),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if e.fx.counts().logins_ok == 1 {
                break;
            }
            assert!(Instant::now() < until, "never logged in");
        }
        assert!(
            !processes_mentioning(&e.work).is_empty(),
            "browser should be running"
        );
        drop(fut);
        assert_no_browser_left(&e.work).await;
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
    }

    #[tokio::test]
    async fn unreachable_site_is_retryable_and_fast() {
        let _serial = SERIAL.lock().await;
        let mut e = env().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        e.cfg.login_url = format!("http://127.0.0.1:{port}/#/login");
        let started = Instant::now();
        let err = export(&e.cfg, &e.work).await.expect_err("must fail");
        eprintln!("unreachable: {err} after {:?}", started.elapsed());
        assert_eq!(err.class(), ErrorClass::Retryable, "{err:?}");
        assert!(
            err.message().contains("cannot open the login page"),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
        assert_no_browser_left(&e.work).await;
    }

    #[tokio::test]
    async fn missing_chromium_is_terminal() {
        let e = env().await;
        let mut cfg = e.cfg.clone();
        cfg.chromium = Some(PathBuf::from("/nonexistent/chromium"));
        let err = export(&cfg, &e.work).await.expect_err("must fail");
        assert_eq!(err.class(), ErrorClass::Terminal);
        assert!(err.message().contains("cannot start Chromium"), "{err:?}");
        assert!(err.screenshot().is_none());
        assert!(
            dir_entries(&e.work).is_empty(),
            "{:?}",
            dir_entries(&e.work)
        );
    }

    #[test]
    fn config_defaults_durations_and_unknown_fields() {
        let cfg: BrowserExportConfig = toml::from_str(
            r#"
login_url = "https://backoffice.example/#/login?redirect=/customer-management"
username = { env = "QASHIER_USERNAME" }
password = { file = "/run/secrets/qashier" }
export_timeout = "2m 30s"
"#,
        )
        .expect("parse");
        assert_eq!(cfg.username, SecretRef::env("QASHIER_USERNAME"));
        assert_eq!(cfg.username_label, "Username");
        assert_eq!(cfg.password_label, "Password");
        assert_eq!(cfg.login_button, "Login");
        assert_eq!(cfg.export_button, "Export");
        assert_eq!(cfg.confirm_button, "Confirm");
        assert_eq!(cfg.download_name, "Customer Management.csv");
        assert_eq!(cfg.login_timeout, Duration::from_secs(30));
        assert_eq!(cfg.export_timeout, Duration::from_secs(150));
        assert_eq!(cfg.download_timeout, Duration::from_secs(120));
        assert_eq!(cfg.chromium, None);
        cfg.validate().expect("valid");

        let unknown = toml::from_str::<BrowserExportConfig>(
            r#"
login_url = "https://x/"
username = { env = "U" }
password = { env = "P" }
export_timout = "3s"
"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("export_timout"));
        let bad = toml::from_str::<BrowserExportConfig>(
            r#"
login_url = "https://x/"
username = { env = "U" }
password = { env = "P" }
login_timeout = "soon"
"#,
        );
        assert!(bad.unwrap_err().to_string().contains("invalid duration"));

        let mut c = cfg.clone();
        c.download_name = "../etc/passwd".into();
        assert!(c.validate().is_err());
        let mut c = cfg.clone();
        c.login_url = "file:///etc/passwd".into();
        assert!(c.validate().is_err());
        let mut c = cfg;
        c.export_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn redaction_and_error_debug() {
        let creds = Credentials {
            username: "fixture-user".into(),
            password: "placeholder-pw".into(),
        };
        assert_eq!(
            creds.redact("user fixture-user with placeholder-pw is locked"),
            "user *** with *** is locked"
        );
        assert_eq!(format!("{creds:?}"), "Credentials(***)");
        let err = BrowserError::retryable("x").with_screenshot(Some(vec![0; 5000]));
        let dbg = format!("{err:?}");
        assert!(
            dbg.contains("screenshot_bytes: Some(5000)") && dbg.len() < 200,
            "{dbg}"
        );
    }
}
