//! The HTTP/1.1 server under the API and the health ports, hardened against slow clients: hyper's
//! header-read timer (also the keep-alive idle timer), a connection cap below what the process may
//! open, the longest-idle connection closed to make room at the cap, and graceful shutdown (requests
//! in flight finish, then connections close). HTTP/1.1 only: browsers speak HTTP/2 over TLS only,
//! and hyper's header timer covers HTTP/1.

mod body;
mod fds;
mod slots;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ServerConfig;
use slots::{Slot, Slots};

/// Serves `app` on `listener` with the limits of `[server]` until `shutdown` is cancelled.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cap = fds::connection_cap(limits.max_connections);
    tracing::info!(
        addr = %listener.local_addr()?,
        max_connections = cap,
        header_timeout = %humantime::format_duration(limits.header_timeout),
        "HTTP listening"
    );
    let slots = Slots::new(cap);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: the cap should prevent them; do not spin if one happens.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = tokio::select! {
            s = slots.take() => s,
            _ = shutdown.cancelled() => break,
        };
        let conn = Connection {
            http: http.clone(),
            stream,
            peer,
            app: app.clone(),
            slot,
        };
        connections.spawn(conn.run(shutdown.clone()));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One accepted connection, ready to serve.
struct Connection {
    http: hyper::server::conn::http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    slot: Slot,
}

impl Connection {
    async fn run(self, shutdown: CancellationToken) {
        let Connection {
            http,
            stream,
            peer,
            app,
            slot,
        } = self;
        let conn_state = slot.conn.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let busy = conn_state.busy();
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                let response = app.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(response.map(|b| body::Guarded::new(b, busy)))
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let evict = slot.conn.evict.clone();
        tokio::select! {
            r = conn.as_mut() => log_end(r, peer),
            _ = evict.cancelled() => {}
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => log_end(r, peer),
                    _ = evict.cancelled() => {}
                }
            }
        }
        drop(slot);
    }
}

fn log_end(result: Result<(), hyper::Error>, peer: SocketAddr) {
    if let Err(e) = result {
        // Timeouts and clients that go away are routine for a server on a network.
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}
