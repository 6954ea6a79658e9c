// crm-sync console: live event streams, read with fetch (EventSource cannot send a bearer token).
//
// A browser allows six HTTP/1.1 connections per host, so the all-runs stream (/api/events) is held
// by one tab per browser and token, not one per tab: the tab holding the Web Lock
// "crm-sync-events-<token hash>" reads it and relays each event and its connection state to the
// other tabs over a BroadcastChannel of the same name. When that tab closes, the browser hands the
// lock to the next tab waiting for it. Where Web Locks are missing (a plain-http origin other than
// localhost), each tab reads its own stream, only while it is visible. Every stream closes when
// the page goes into the back/forward cache (pagehide); the pages reopen theirs when it comes back.
"use strict";

// What the live indicator says in each state.
const LIVE_TEXT = { connecting: "connecting", live: "live", retrying: "disconnected, retrying", ended: "" };

function showLive(el, state) {
  el.className = `live ${state}`;
  el.dataset.state = state;
  el.textContent = LIVE_TEXT[state];
}

// A stream the server refused: its status, and the delay it asked for (Retry-After, seconds).
class StreamError extends Error {
  constructor(status, retryAfter) {
    super(`the event stream answered ${status}`);
    this.status = status;
    this.retryAfter = Number(retryAfter) || 0;
  }
}

// Reconnection delay after `failures` failures in a row: 1, 2, 4 ... 30 s with jitter, or the
// server's Retry-After (at most 60 s).
function backoff(failures, error) {
  if (error instanceof StreamError && error.retryAfter > 0) return Math.min(error.retryAfter, 60) * 1000;
  const base = Math.min(1000 * 2 ** failures, 30000);
  return base * (0.8 + Math.random() * 0.4);
}

// Reads one server-sent event stream: onOpen() once the server accepted it, onEvent(kind, data) per
// event; resolves when the server ends the stream.
async function readEvents(path, token, signal, onOpen, onEvent) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, signal, cache: "no-store" });
  if (!resp.ok) {
    resp.body?.cancel().catch(() => {});
    throw new StreamError(resp.status, resp.headers.get("Retry-After"));
  }
  onOpen();
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(kind, JSON.parse(data));
    }
  }
}

// Resolves after `ms`, or at once when `signal` aborts.
function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// Resolves once the page is visible (or `signal` aborts).
function visible(signal) {
  if (document.visibilityState === "visible" || signal.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (document.visibilityState !== "visible" && !signal.aborted) return;
      document.removeEventListener("visibilitychange", check);
      resolve();
    };
    document.addEventListener("visibilitychange", check);
    signal.addEventListener("abort", check, { once: true });
  });
}

// Keeps `path` followed until `signal` aborts, reconnecting with backoff after errors, refusals
// (429, 5xx) and unexpected ends. Options: token; onEvent(kind, data); onState(state) with the
// states of LIVE_TEXT; finished() true when an end of stream is final (a finished run's stream);
// onFatal(status) for 401, 403 and 404, which end the following; whileVisible closes the stream
// while the page is hidden.
function follow(path, { token, signal, onEvent, onState, finished = () => false, onFatal, whileVisible = false }) {
  (async () => {
    let failures = 0;
    while (!signal.aborted) {
      if (whileVisible) await visible(signal);
      if (signal.aborted) return;
      // One connection: aborted with the page, or when the page is hidden.
      const conn = new AbortController();
      const stop = () => conn.abort();
      const hidden = () => { if (whileVisible && document.visibilityState === "hidden") conn.abort(); };
      signal.addEventListener("abort", stop, { once: true });
      document.addEventListener("visibilitychange", hidden);
      let error = null;
      try {
        if (failures === 0) onState("connecting");
        await readEvents(path, token, conn.signal, () => { failures = 0; onState("live"); }, onEvent);
        if (finished()) { onState("ended"); return; }
      } catch (e) {
        error = e;
        if (e instanceof StreamError && [401, 403, 404].includes(e.status)) { onFatal(e.status); return; }
      } finally {
        signal.removeEventListener("abort", stop);
        document.removeEventListener("visibilitychange", hidden);
      }
      if (signal.aborted || conn.signal.aborted) continue; // navigated away, or hidden
      onState("retrying");
      await pause(backoff(failures++, error), signal);
    }
  })();
}

// A short, stable name for a token (so tabs signed in with different tokens do not share a stream).
async function tokenKey(token) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(token));
  return [...new Uint8Array(digest).slice(0, 8)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const canShare = () => Boolean(navigator.locks && window.BroadcastChannel && window.crypto?.subtle);

// The all-runs stream of one tab: read by this tab when it leads, relayed by the leader otherwise.
class RunFeed {
  constructor(token, onFatal) {
    this.token = token;
    this.onFatal = onFatal;
    this.listeners = new Set();
    this.state = "connecting";
    this.abort = new AbortController();
    this.channel = null;
    this.leading = false;
    this.start().catch(() => this.lead());
  }

  async start() {
    if (!canShare()) { this.lead(); return; }
    const name = `crm-sync-events-${await tokenKey(this.token)}`;
    if (this.abort.signal.aborted) return;
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (m) => this.heard(m.data);
    this.channel.postMessage({ type: "hello" });
    // Granted when no other tab of this browser leads; held until this feed stops.
    navigator.locks.request(name, { signal: this.abort.signal }, () => this.lead()).catch(() => {});
  }

  // Reads the stream for this tab and every tab listening; resolves (releasing the lock) on stop.
  lead() {
    this.leading = true;
    follow("/api/events", {
      token: this.token,
      signal: this.abort.signal,
      whileVisible: !this.channel, // a leader reads for hidden tabs too
      onEvent: (kind, data) => { this.deliver(kind, data); this.tell({ type: "event", kind, data }); },
      onState: (state) => { this.setState(state); this.tell({ type: "state", state }); },
      onFatal: (status) => this.onFatal(status),
    });
    return new Promise((resolve) => this.abort.signal.addEventListener("abort", resolve, { once: true }));
  }

  tell(message) {
    if (this.channel && !this.abort.signal.aborted) this.channel.postMessage(message);
  }

  // A message from another tab: the leader's events and state, or a newcomer asking for the state.
  heard(message) {
    if (message.type === "hello" && this.leading) this.tell({ type: "state", state: this.state });
    else if (message.type === "event" && !this.leading) this.deliver(message.kind, message.data);
    else if (message.type === "state" && !this.leading) this.setState(message.state);
  }

  deliver(kind, data) {
    for (const l of this.listeners) l.onEvent(kind, data);
  }

  setState(state) {
    const was = this.state;
    this.state = state;
    for (const l of this.listeners) l.onState(state, was);
  }

  stop() {
    this.abort.abort();
    this.channel?.close();
  }
}

let runFeed = null;

// Runs events for a page until `signal` aborts: onEvent(kind, run) per event, the live indicator
// kept in `liveEl`, and onResync() whenever the stream comes back after a break (a lost connection,
// a hand-over between tabs), since events may have been missed in between.
function followRuns(token, signal, liveEl, onEvent, onResync, onFatal) {
  if (!runFeed || runFeed.token !== token) {
    runFeed?.stop();
    runFeed = new RunFeed(token, (status) => { stopRunFeed(); onFatal(status); });
  }
  let broken = false; // the stream was live for this page, then not
  const listener = {
    onEvent,
    onState: (state, was) => {
      showLive(liveEl, state);
      if (state !== "live" && was === "live") broken = true;
      if (state === "live" && broken) { broken = false; onResync(); }
    },
  };
  showLive(liveEl, runFeed.state);
  runFeed.listeners.add(listener);
  const feed = runFeed;
  signal.addEventListener("abort", () => feed.listeners.delete(listener), { once: true });
}

// Closes this tab's all-runs stream (sign-out, back/forward cache); the next page opens it again.
function stopRunFeed() {
  runFeed?.stop();
  runFeed = null;
}
