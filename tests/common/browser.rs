//! Headless Chromium (Debian's /usr/bin/chromium) driven over CDP, for the console's end-to-end
//! tests: launch, open pages, read the DOM, click, type, take screenshots. Killed on drop. Also how
//! tests find browsers left running: by a path their command line names (their profile directory).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::browser::Browser;
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::handler::HandlerConfig;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, BufReader};

pub struct Chromium {
    pub browser: Browser,
    child: tokio::process::Child,
    handler: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    pub async fn launch() -> Chromium {
        let exe = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "Chromium is not installed: run scripts/test.sh (it installs Debian's chromium)",
            );
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.trim().strip_prefix("DevTools listening on ") {
                    return url.to_string();
                }
            }
            panic!("chromium exited before announcing its DevTools address");
        })
        .await
        .expect("chromium started within 30 s");
        // Keep draining stderr so a full pipe never blocks the browser.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let config = HandlerConfig {
            viewport: Some(Viewport {
                width: 1280,
                height: 900,
                ..Viewport::default()
            }),
            request_timeout: Duration::from_secs(20),
            ..HandlerConfig::default()
        };
        let (browser, mut handler) = Browser::connect_with_config(ws, config).await.unwrap();
        let handler = tokio::spawn(async move {
            while let Some(event) = handler.next().await {
                if event.is_err() {
                    break;
                }
            }
        });
        Chromium {
            browser,
            child,
            handler,
            _profile: profile,
        }
    }

    pub async fn open(&self, url: &str) -> Page {
        self.browser.new_page(url).await.unwrap()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.handler.abort();
        let _ = self.child.start_kill();
    }
}

/// Evaluates a JavaScript expression in the page (`undefined` reads as null).
pub async fn js<T: DeserializeOwned>(page: &Page, expression: &str) -> T {
    let result = page
        .evaluate(expression)
        .await
        .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"));
    let value = result.value().cloned().unwrap_or(serde_json::Value::Null);
    serde_json::from_value(value).unwrap_or_else(|e| panic!("result of {expression}: {e}"))
}

/// Polls a JavaScript condition until it is true; fails with `what` after `timeout`.
pub async fn wait_for(page: &Page, condition: &str, timeout: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ok: bool = page
            .evaluate(format!("Boolean({condition})"))
            .await
            .ok()
            .and_then(|v| v.into_value().ok())
            .unwrap_or(false);
        if ok {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let text: String = js(page, "document.body.innerText").await;
            panic!("timed out waiting for {what} ({condition}); page text:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clicks the element matching `selector`.
pub async fn click(page: &Page, selector: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Types `text` into the input matching `selector`.
pub async fn type_into(page: &Page, selector: &str, text: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .click()
        .await
        .unwrap()
        .type_str(text)
        .await
        .unwrap();
}

/// Emulates a phone-width screen (390 x 844 CSS pixels) or back to desktop.
pub async fn phone_width(page: &Page, phone: bool) {
    let (w, h, scale) = if phone {
        (390, 844, 2.0)
    } else {
        (1280, 900, 1.0)
    };
    page.execute(SetDeviceMetricsOverrideParams::new(w, h, scale, phone))
        .await
        .unwrap();
}

/// Saves a full-page screenshot as a test artifact and returns its path.
pub async fn screenshot(page: &Page, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let png = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .unwrap();
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

/// Processes whose command line mentions `path`, as (pid, command line), found with `pgrep -af`.
/// Every Chromium process names its `--user-data-dir` (or, for crashpad, a directory inside it), so
/// a directory that holds a test's browser profiles finds every browser the test started. Zombies
/// have no command line and do not count.
pub fn processes_mentioning(path: &Path) -> Vec<(i32, String)> {
    // pgrep takes a regular expression: match the path literally.
    let mut pattern = String::new();
    for c in path.to_string_lossy().chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    let out = std::process::Command::new("pgrep")
        .args(["-af", &pattern])
        .output()
        .expect("pgrep (procps) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (pid, command) = line.split_once(' ')?;
            Some((pid.parse().ok()?, command.chars().take(200).collect()))
        })
        .collect()
}

/// Fails unless, within `grace` (SIGKILL is asynchronous), no process mentions `path`; whatever is
/// still there is killed first, so a failing test leaves nothing behind either.
pub async fn assert_no_process_mentions(path: &Path, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let left = processes_mentioning(path);
        if left.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            for (pid, _) in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!(
                "{} process(es) naming {} left running: {left:#?}",
                left.len(),
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
