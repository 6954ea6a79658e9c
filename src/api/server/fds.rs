//! File descriptors: the soft `RLIMIT_NOFILE` raised to the hard limit once per process, and the
//! connection cap kept below it so that `accept` never fails with "Too many open files".

use std::sync::OnceLock;

/// Descriptors kept for everything but HTTP connections (the database pool, LISTEN, backup and
/// staging files, Chromium's pipes, logs): a quarter of the limit, at most this many.
const RESERVED: u64 = 256;

fn reserved(limit: u64) -> u64 {
    (limit / 4).min(RESERVED)
}

/// `configured`, lowered (with a warning) to what the process may open besides [`RESERVED`].
pub fn connection_cap(configured: usize) -> usize {
    let limit = open_files_limit();
    let usable = usize::try_from(limit - reserved(limit))
        .unwrap_or(usize::MAX)
        .max(2);
    if configured > usable {
        tracing::warn!(
            configured,
            used = usable,
            open_files_limit = limit,
            "server.max_connections is more than this process may open (RLIMIT_NOFILE); \
             lowered. Raise the limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=) to serve more"
        );
        usable
    } else {
        configured
    }
}

/// The soft limit on open files after raising it to the hard limit (once).
pub fn open_files_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(raise_to_hard_limit)
}

fn raise_to_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return 1024;
    }
    // An unlimited hard limit is still bounded by the kernel's nr_open (1048576 by default).
    let target = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(from = lim.rlim_cur, to = target, "raised RLIMIT_NOFILE");
            return target;
        }
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_open_files_limit() {
        let limit = open_files_limit();
        assert!(connection_cap(usize::MAX) as u64 <= (limit - reserved(limit)).max(2));
        assert_eq!(reserved(256), 64);
        assert_eq!(reserved(1 << 20), RESERVED);
        assert_eq!(connection_cap(2), 2);
    }
}
