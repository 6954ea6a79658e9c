//! A small Chrome DevTools Protocol client over `--remote-debugging-pipe`: Chromium reads
//! commands on its fd 3 and writes answers and events on its fd 4, each message a JSON text ended
//! by a NUL byte. No TCP port and no socket exist, so no other process or user can attach to the
//! browser (see docs/architecture.md, "Chromium over a pipe", for why this is not chromiumoxide's
//! `Browser`, which speaks only WebSocket over TCP).
//!
//! The typed commands and events are chromiumoxide's (`chromiumoxide::cdp`); this module only
//! moves them. No message is ever logged (they carry typed credentials).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::input::{
    DispatchMouseEventParams, DispatchMouseEventType, MouseButton,
};
use chromiumoxide::cdp::browser_protocol::page::{
    CaptureScreenshotFormat, CaptureScreenshotParams, EnableParams, EventLoadEventFired,
    NavigateParams,
};
use chromiumoxide::cdp::browser_protocol::target::{AttachToTargetParams, CreateTargetParams};
use chromiumoxide::cdp::js_protocol::runtime::EvaluateParams;
use chromiumoxide::{Command, MethodType};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Why a CDP call failed. The texts carry no message content (no typed value can leak).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CdpError {
    /// Chromium closed the pipe (it exited or is exiting).
    #[error("the pipe to Chromium is closed (Chromium exited)")]
    Closed,
    /// Chromium answered with an error.
    #[error("{method} failed: {message} (code {code})")]
    Protocol {
        method: String,
        code: i64,
        message: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer to {method}: {detail}")]
    Decode { method: String, detail: String },
    /// A navigation failed (`net::ERR_CONNECTION_REFUSED`, ...).
    #[error("{0}")]
    Navigation(String),
    /// A script threw.
    #[error("script error: {0}")]
    Script(String),
}

/// A serde error described without the value it choked on.
fn decode_error(method: &str, e: &serde_json::Error) -> CdpError {
    CdpError::Decode {
        method: method.to_string(),
        detail: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    }
}

/// The child's ends of the two pipes, to become its fds 3 and 4 (see [`ChildPipes::install`]).
pub struct ChildPipes {
    commands: OwnedFd,
    answers: OwnedFd,
}

impl ChildPipes {
    /// In the forked child, before exec: make the command pipe fd 3 and the answer pipe fd 4.
    /// Both sources are at fd 10 or above (see [`pipes`]), so neither is clobbered. Only
    /// async-signal-safe calls (dup2).
    pub fn installer(&self) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
        let (commands, answers) = (self.commands.as_raw_fd(), self.answers.as_raw_fd());
        move || {
            for (from, to) in [(commands, 3), (answers, 4)] {
                // SAFETY: dup2 on descriptors this process owns; async-signal-safe.
                if unsafe { libc::dup2(from, to) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        }
    }
}

/// Duplicate `fd` to a close-on-exec descriptor numbered 10 or more, so that installing the
/// child's fds 3 and 4 cannot overwrite one with the other.
fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own; the result is a new descriptor we then own.
    let raw: RawFd = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if raw == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Two pipes: (the child's ends, our writer to its fd 3, our reader of its fd 4). The child's
/// ends stay blocking (Chromium reads them on its own thread); ours are non-blocking for tokio.
/// All are close-on-exec until installed as fds 3 and 4 in the child.
pub fn pipes() -> io::Result<(ChildPipes, pipe::Sender, pipe::Receiver)> {
    let (cmd_read, cmd_write) = std::io::pipe()?;
    let (ans_read, ans_write) = std::io::pipe()?;
    let child = ChildPipes {
        commands: high_fd(OwnedFd::from(cmd_read))?,
        answers: high_fd(OwnedFd::from(ans_write))?,
    };
    let to_browser = pipe::Sender::from_owned_fd(OwnedFd::from(cmd_write))?;
    let from_browser = pipe::Receiver::from_owned_fd(OwnedFd::from(ans_read))?;
    Ok((child, to_browser, from_browser))
}

/// An event: its method, the session it belongs to (`None`: the browser), and its parameters.
#[derive(Debug)]
pub struct Event {
    pub method: String,
    pub session_id: Option<String>,
    pub params: Value,
}

impl Event {
    /// The parameters as the typed event `E`, when this is one (and for `session`).
    pub fn parse<E: MethodType + DeserializeOwned>(&self, session: Option<&str>) -> Option<E> {
        if self.method != E::method_id() || self.session_id.as_deref() != session {
            return None;
        }
        serde_json::from_value(self.params.clone()).ok()
    }
}

type Answer = Result<Value, (i64, String)>;

/// What the reader task shares with callers. `None` once the pipe is closed.
#[derive(Default)]
struct Shared {
    pending: Option<HashMap<u64, oneshot::Sender<Answer>>>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<Event>>>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A CDP connection over the two pipes. Dropping it stops its tasks.
pub struct Cdp {
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Mutex<Shared>>,
    next_id: AtomicU64,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cdp {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cdp {
    /// Start the reader and writer tasks over the pipes from [`pipes`].
    pub fn start(mut to_browser: pipe::Sender, from_browser: pipe::Receiver) -> Cdp {
        let shared = Arc::new(Mutex::new(Shared {
            pending: Some(HashMap::new()),
            subscribers: Vec::new(),
        }));
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Some(mut msg) = queue.recv().await {
                    msg.push(0);
                    if to_browser.write_all(&msg).await.is_err() {
                        break;
                    }
                }
                close(&shared);
            }
        });
        let reader = tokio::spawn(read_loop(from_browser, shared.clone()));
        Cdp {
            outgoing,
            shared,
            next_id: AtomicU64::new(1),
            tasks: vec![writer, reader],
        }
    }

    /// Every event from now on (browser and sessions), until the pipe closes.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Arc<Event>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut shared = lock(&self.shared);
        if shared.pending.is_some() {
            shared.subscribers.push(tx);
        }
        rx
    }

    /// Send `cmd` (to `session`, or to the browser) and wait for its answer.
    pub async fn call<C: Command>(
        &self,
        session: Option<&str>,
        cmd: C,
    ) -> Result<C::Response, CdpError> {
        let method = cmd.identifier();
        let params = serde_json::to_value(&cmd).map_err(|e| decode_error(&method, &e))?;
        let answer = self.call_raw(session, &method, params).await?;
        C::response_from_value(answer).map_err(|e| decode_error(&method, &e))
    }

    async fn call_raw(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, CdpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            msg["sessionId"] = Value::from(session);
        }
        let bytes = serde_json::to_vec(&msg).map_err(|e| decode_error(method, &e))?;
        let (tx, rx) = oneshot::channel();
        match lock(&self.shared).pending.as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(CdpError::Closed),
        };
        // Forget the call if this future is dropped (a caller's timeout) before the answer.
        let _forget = Forget {
            shared: &self.shared,
            id,
        };
        self.outgoing.send(bytes).map_err(|_| CdpError::Closed)?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((code, message))) => Err(CdpError::Protocol {
                method: method.to_string(),
                code,
                message,
            }),
            Err(_) => Err(CdpError::Closed),
        }
    }

    /// Open a blank tab and attach to it (flattened session), with Page events on and the
    /// given viewport.
    pub async fn open_tab(&self, width: i64, height: i64) -> Result<Tab<'_>, CdpError> {
        let target = self
            .call(None, CreateTargetParams::new("about:blank"))
            .await?
            .target_id;
        let mut attach = AttachToTargetParams::new(target);
        attach.flatten = Some(true);
        let session = self.call(None, attach).await?.session_id.into();
        let tab = Tab { cdp: self, session };
        tab.call(EnableParams::default()).await?;
        tab.call(SetDeviceMetricsOverrideParams::new(
            width, height, 1.0, false,
        ))
        .await?;
        Ok(tab)
    }
}

/// Removes a pending call on drop (a no-op once it was answered).
struct Forget<'a> {
    shared: &'a Mutex<Shared>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(pending) = lock(self.shared).pending.as_mut() {
            pending.remove(&self.id);
        }
    }
}

/// The pipe is closed: fail every pending call and end every subscription.
fn close(shared: &Mutex<Shared>) {
    let mut shared = lock(shared);
    shared.pending = None;
    shared.subscribers.clear();
}

/// Read NUL-ended messages until the pipe closes; answer calls and fan out events.
async fn read_loop(mut from_browser: pipe::Receiver, shared: Arc<Mutex<Shared>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from_browser.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let scanned = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        let mut from = scanned;
        while let Some(end) = buf[from..].iter().position(|&b| b == 0).map(|i| from + i) {
            dispatch(&buf[start..end], &shared);
            start = end + 1;
            from = start;
        }
        buf.drain(..start);
    }
    close(&shared);
}

fn dispatch(raw: &[u8], shared: &Mutex<Shared>) {
    let Ok(mut msg) = serde_json::from_slice::<Value>(raw) else {
        return;
    };
    if let Some(id) = msg.get("id").and_then(Value::as_u64) {
        let answer = match msg.get_mut("error") {
            Some(err) => Err((
                err.get("code").and_then(Value::as_i64).unwrap_or(0),
                err.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )),
            None => Ok(msg.get_mut("result").map(Value::take).unwrap_or_default()),
        };
        let waiter = lock(shared).pending.as_mut().and_then(|p| p.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
        return;
    }
    let Some(method) = msg.get("method").and_then(Value::as_str) else {
        return;
    };
    let event = Arc::new(Event {
        method: method.to_string(),
        session_id: msg
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_string),
        params: msg.get_mut("params").map(Value::take).unwrap_or_default(),
    });
    lock(shared)
        .subscribers
        .retain(|s| s.send(event.clone()).is_ok());
}

/// One page, driven through its flattened session.
pub struct Tab<'a> {
    cdp: &'a Cdp,
    session: String,
}

impl Tab<'_> {
    /// Send `cmd` to this page.
    pub async fn call<C: Command>(&self, cmd: C) -> Result<C::Response, CdpError> {
        self.cdp.call(Some(&self.session), cmd).await
    }

    /// Navigate to `url` and wait for its load event (callers bound the wait).
    pub async fn goto(&self, url: &str) -> Result<(), CdpError> {
        let mut events = self.cdp.subscribe();
        let nav = self.call(NavigateParams::new(url)).await?;
        if let Some(error) = nav.error_text.filter(|e| !e.is_empty()) {
            return Err(CdpError::Navigation(error));
        }
        while let Some(event) = events.recv().await {
            if event
                .parse::<EventLoadEventFired>(Some(&self.session))
                .is_some()
            {
                return Ok(());
            }
        }
        Err(CdpError::Closed)
    }

    /// Evaluate `expression` in the page and return its value (JSON; `undefined` is null).
    pub async fn evaluate<T: DeserializeOwned>(&self, expression: String) -> Result<T, CdpError> {
        let mut params = EvaluateParams::new(expression);
        params.return_by_value = Some(true);
        let answer = self.call(params).await?;
        if let Some(exception) = answer.exception_details {
            let text = exception
                .exception
                .and_then(|e| e.description)
                .unwrap_or(exception.text);
            return Err(CdpError::Script(text));
        }
        let value = answer.result.value.unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|e| decode_error("Runtime.evaluate", &e))
    }

    /// A left click at (x, y) in CSS pixels: move, press, release.
    pub async fn click(&self, x: f64, y: f64) -> Result<(), CdpError> {
        for kind in [
            DispatchMouseEventType::MouseMoved,
            DispatchMouseEventType::MousePressed,
            DispatchMouseEventType::MouseReleased,
        ] {
            let mut event = DispatchMouseEventParams::new(kind, x, y);
            if event.r#type != DispatchMouseEventType::MouseMoved {
                event.button = Some(MouseButton::Left);
                event.click_count = Some(1);
            }
            self.call(event).await?;
        }
        Ok(())
    }

    /// A PNG of the viewport.
    pub async fn screenshot_png(&self) -> Result<Vec<u8>, CdpError> {
        let params = CaptureScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .build();
        let shot = self.call(params).await?;
        let data: &str = shot.data.as_ref();
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| CdpError::Decode {
                method: "Page.captureScreenshot".into(),
                detail: e.to_string(),
            })
    }
}
