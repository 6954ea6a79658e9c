//! A TCP relay between a browser and a test server, for the console tests: it counts the event
//! streams (connections whose latest request is `GET .../events`, still open) the server holds for
//! the browser, and it can cut every connection and refuse new ones, then listen again on the same
//! port: what a browser sees when its server goes away and comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Event streams open through the relay now, and the most open at once.
#[derive(Default)]
pub struct StreamCounts {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl StreamCounts {
    pub fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    /// Forgets the maximum so far (the next one is counted from what is open now).
    pub fn reset_max(&self) {
        self.max.store(self.now(), Ordering::SeqCst);
    }
}

pub struct Relay {
    /// `http://127.0.0.1:PORT`, the same across [`Relay::cut`] and [`Relay::resume`].
    pub base: String,
    pub streams: Arc<StreamCounts>,
    addr: SocketAddr,
    upstream: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays a free local port to `upstream` (an `http://host:port` base URL).
    pub async fn start(upstream: &str) -> Relay {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("an http://IP:PORT base");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut relay = Relay {
            base: format!("http://{addr}"),
            streams: Arc::default(),
            addr,
            upstream,
            accept: None,
        };
        relay.listen(listener);
        relay
    }

    /// Closes every relayed connection and the port: the server is gone.
    pub async fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }

    /// Listens again on the same port: the server is back.
    pub async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.listen(listener);
    }

    fn listen(&mut self, listener: TcpListener) {
        let (upstream, streams) = (self.upstream, self.streams.clone());
        // The connections live in the accept task's set: aborting it closes them all.
        self.accept = Some(tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        connections.spawn(relay(client, upstream, streams.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        }));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// One connection, both ways, until either side closes it.
async fn relay(client: TcpStream, upstream: SocketAddr, streams: Arc<StreamCounts>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut kind = ConnectionKind {
        streams,
        stream: false,
    };
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            kind.saw(&buf[..n]);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let responses = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = requests => {}
        _ = responses => {}
    }
}

/// Whether a connection's latest request is an event stream, counted in `streams` while it is.
struct ConnectionKind {
    streams: Arc<StreamCounts>,
    stream: bool,
}

impl ConnectionKind {
    /// Notes the request lines (`GET /path HTTP/1.1`) in bytes the browser sent.
    fn saw(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let Some(path) = text
            .split("\r\n")
            .filter(|line| line.ends_with(" HTTP/1.1"))
            .filter_map(|line| line.split(' ').nth(1))
            .last()
        else {
            return;
        };
        self.set(path.split('?').next().unwrap_or(path).ends_with("/events"));
    }

    fn set(&mut self, stream: bool) {
        if stream == self.stream {
            return;
        }
        self.stream = stream;
        if stream {
            let now = self.streams.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.streams.max.fetch_max(now, Ordering::SeqCst);
        } else {
            self.streams.now.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for ConnectionKind {
    fn drop(&mut self) {
        self.set(false);
    }
}
