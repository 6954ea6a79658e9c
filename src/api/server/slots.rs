//! The connection cap: one slot per open connection. When every slot is taken, the connection that
//! has been idle longest (no request in flight: a half-sent request, a kept-alive connection between
//! requests) is closed to make room, so a flood of idle connections cannot lock out `/healthz`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The open connections of one listener.
pub struct Slots {
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// One open connection: its requests in flight and since when it has had none.
pub struct Conn {
    busy: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// Cancelled to close the connection (evicted for a newer one).
    pub evict: CancellationToken,
    epoch: Instant,
}

/// A taken slot; freed (and its connection forgotten) when dropped.
pub struct Slot {
    id: u64,
    pub conn: Arc<Conn>,
    slots: Arc<Slots>,
    _permit: OwnedSemaphorePermit,
}

/// A request in flight on a connection (held until its response body is sent or dropped).
pub struct Busy(Arc<Conn>);

impl Slots {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(cap)),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A slot for a just-accepted connection: a free one, else the longest-idle connection's once
    /// it has closed (or any one freed first, when every connection is busy).
    pub async fn take(self: &Arc<Self>) -> Slot {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if let Some(victim) = self.longest_idle() {
                    tracing::debug!("connection cap reached: closing the longest-idle connection");
                    victim.evict.cancel();
                }
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            evict: CancellationToken::new(),
            epoch: self.epoch,
        });
        self.lock().insert(id, conn.clone());
        Slot {
            id,
            conn,
            slots: self.clone(),
            _permit: permit,
        }
    }

    fn longest_idle(&self) -> Option<Arc<Conn>> {
        self.lock()
            .values()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evict.is_cancelled())
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire))
            .cloned()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
    }
}

impl Conn {
    /// Marks a request in flight until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.0.epoch.elapsed().as_millis() as u64;
            self.0.idle_since_ms.store(now, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_table_closes_the_longest_idle_connection_not_a_busy_one() {
        let slots = Slots::new(2);
        let first = slots.take().await;
        let busy = first.conn.busy();
        let second = slots.take().await;
        let (third, ()) = tokio::join!(slots.take(), async {
            second.conn.evict.cancelled().await;
            assert!(!first.conn.evict.is_cancelled());
            drop(second);
        });
        assert_eq!(slots.lock().len(), 2);
        drop(busy);
        drop(third);
        assert_eq!(slots.lock().len(), 1);
    }
}
