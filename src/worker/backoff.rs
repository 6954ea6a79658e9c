//! Retry delays: exponential backoff with jitter, never shorter than what the server asked for.

use std::time::Duration;

/// Delay before the attempt after `attempt` (1-based): `base * 2^(attempt-1)` capped at `max`, of which
/// a random half is kept ("equal jitter": retries of many runs spread out, yet never retry at once),
/// and at least `retry_after` when the source sent one (429 Retry-After).
pub fn retry_delay(
    attempt: i32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    let full = base.saturating_mul(1u32 << exponent).min(max);
    let half = full / 2;
    let jitter_ms = rand::random_range(0..=half.as_millis().min(u128::from(u64::MAX)) as u64);
    let delay = half + Duration::from_millis(jitter_ms);
    match retry_after {
        Some(asked) => delay.max(asked),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_bounds() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 1..=6 {
            let full = Duration::from_millis(100 * 2u64.pow(attempt as u32 - 1));
            for _ in 0..50 {
                let d = retry_delay(attempt, base, max, None);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
    }

    #[test]
    fn capped_and_honours_retry_after() {
        let d = retry_delay(40, Duration::from_secs(1), Duration::from_secs(60), None);
        assert!(d <= Duration::from_secs(60) && d >= Duration::from_secs(30));
        let d = retry_delay(
            1,
            Duration::from_millis(10),
            Duration::from_secs(1),
            Some(Duration::from_secs(7)),
        );
        assert_eq!(d, Duration::from_secs(7));
    }
}
