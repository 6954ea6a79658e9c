//! Failed authentications by client address: logged at most once a minute per address (with how
//! many were not logged since), and refused with 429 for the rest of a minute in which an address
//! presented `[server] auth_failures_per_minute` wrong tokens (0: never refused). The refusal comes before the token is looked at, so a
//! locked-out address cannot keep guessing (its right token waits too, until `Retry-After`).
//!
//! IPv6 addresses count by /64 (one host usually holds a whole /64). The table holds at most
//! [`MAX_ADDRESSES`] addresses; the stalest are forgotten first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The counting window, and the least time between two log lines about one address.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at once.
pub const MAX_ADDRESSES: usize = 10_000;

pub struct AuthFailures {
    /// Wrong tokens from one address in one [`WINDOW`] before it is refused for the rest of it.
    limit: u32,
    table: Mutex<HashMap<Option<IpAddr>, Entry>>,
}

struct Entry {
    window_start: Instant,
    failures: u32,
    logged_at: Option<Instant>,
    /// Failures (and refusals) since the last log line.
    unlogged: u64,
}

impl AuthFailures {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            table: Mutex::default(),
        }
    }

    /// `Err(retry after)` when `peer` is locked out now (the refusal is counted for the next line).
    pub fn check(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let mut table = self.lock();
        let Some(entry) = table.get_mut(&key(peer)) else {
            return Ok(());
        };
        let elapsed = now.duration_since(entry.window_start);
        if self.limit > 0 && entry.failures >= self.limit && elapsed < WINDOW {
            entry.unlogged += 1;
            return Err(WINDOW - elapsed);
        }
        Ok(())
    }

    /// Counts a wrong token from `peer`, and logs it unless a line about `peer` was logged less
    /// than [`WINDOW`] ago. The token itself is never logged.
    pub fn record(&self, peer: Option<IpAddr>, reason: &'static str) {
        let now = Instant::now();
        let mut table = self.lock();
        let k = key(peer);
        if !table.contains_key(&k) && table.len() >= MAX_ADDRESSES {
            make_room(&mut table, now);
        }
        let entry = table.entry(k).or_insert(Entry {
            window_start: now,
            failures: 0,
            logged_at: None,
            unlogged: 0,
        });
        if now.duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry
            .logged_at
            .is_some_and(|at| now.duration_since(at) < WINDOW)
        {
            entry.unlogged += 1;
            return;
        }
        tracing::warn!(
            peer = %shown(peer),
            reason,
            failures_this_minute = entry.failures,
            not_logged_since_last_line = entry.unlogged,
            locked_out = self.limit > 0 && entry.failures >= self.limit,
            "API authentication failed"
        );
        entry.logged_at = Some(now);
        entry.unlogged = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Option<IpAddr>, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Forgets the addresses whose window and log line are over; if none is, the stalest one.
fn make_room(table: &mut HashMap<Option<IpAddr>, Entry>, now: Instant) {
    table.retain(|_, e| {
        let last = e
            .logged_at
            .map_or(e.window_start, |l| l.max(e.window_start));
        now.duration_since(last) < WINDOW
    });
    if table.len() >= MAX_ADDRESSES
        && let Some(stalest) = table
            .iter()
            .min_by_key(|(_, e)| e.window_start)
            .map(|(k, _)| *k)
    {
        table.remove(&stalest);
    }
}

/// The address as counted: IPv6 by its /64.
fn key(peer: Option<IpAddr>) -> Option<IpAddr> {
    peer.map(|ip| match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
        v4 => v4,
    })
}

fn shown(peer: Option<IpAddr>) -> String {
    peer.map_or_else(|| "unknown".into(), |ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_max_failures_and_others_are_not() {
        let f = AuthFailures::new(10);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..10 {
            assert!(f.check(a).is_ok());
            f.record(a, "wrong_token");
        }
        let retry = f.check(a).unwrap_err();
        assert!(retry <= WINDOW && retry > WINDOW - Duration::from_secs(5));
        assert!(f.check(Some(IpAddr::from([10, 0, 0, 2]))).is_ok());
        let never = AuthFailures::new(0);
        for _ in 0..100 {
            never.record(a, "wrong_token");
        }
        assert!(never.check(a).is_ok());
    }

    #[test]
    fn the_table_stays_bounded_and_ipv6_counts_by_slash_64() {
        let f = AuthFailures::new(10);
        for i in 0..(MAX_ADDRESSES as u32 + 50) {
            f.record(Some(IpAddr::from(i.to_be_bytes())), "wrong_token");
        }
        assert_eq!(f.len(), MAX_ADDRESSES);
        let g = AuthFailures::new(10);
        for i in 0..20u16 {
            g.record(
                Some(IpAddr::from([0x2001, 0xdb8, 1, 2, i, 7, 7, i])),
                "wrong_token",
            );
        }
        assert_eq!(g.len(), 1);
    }
}
