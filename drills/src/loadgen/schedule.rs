//! Open-loop schedule arithmetic: request `i` is due at `start + i / rate`.
//!
//! Integer nanoseconds rather than `f64` seconds so that request `rate * k` lands exactly on
//! second `k` however long the run, and no drift accumulates.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How many requests a run of `duration_secs` at `rate_per_sec` sends.
pub fn total_requests(rate_per_sec: u64, duration_secs: u64) -> u64 {
    rate_per_sec.saturating_mul(duration_secs)
}

/// When request `i` is due, as an offset from the start of the run. `rate_per_sec` 0 is
/// treated as 1 (the config rejects it before a run gets here).
pub fn due_offset(i: u64, rate_per_sec: u64) -> Duration {
    let nanos = u128::from(i) * NANOS_PER_SEC / u128::from(rate_per_sec.max(1));
    let secs = nanos / NANOS_PER_SEC;
    let sub = nanos % NANOS_PER_SEC;
    // sub < 1e9 always fits u32; secs fits u64 because i and rate are both u64.
    Duration::new(
        u64::try_from(secs).unwrap_or(u64::MAX),
        u32::try_from(sub).unwrap_or(0),
    )
}

/// How far behind its due time a request was sent (zero when on time or early).
pub fn lag(due_offset: Duration, sent_offset: Duration) -> Duration {
    sent_offset.saturating_sub(due_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals() {
        assert_eq!(total_requests(100, 10), 1000);
        assert_eq!(total_requests(0, 10), 0);
        assert_eq!(total_requests(u64::MAX, 2), u64::MAX);
    }

    #[test]
    fn due_times_are_exact_and_evenly_spaced() {
        assert_eq!(due_offset(0, 100), Duration::ZERO);
        assert_eq!(due_offset(1, 100), Duration::from_millis(10));
        assert_eq!(due_offset(100, 100), Duration::from_secs(1));
        assert_eq!(due_offset(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(due_offset(2, 3), Duration::from_nanos(666_666_666));
        assert_eq!(due_offset(3, 3), Duration::from_secs(1));
        // A long run lands on whole seconds with no drift.
        assert_eq!(due_offset(3 * 86_400, 3), Duration::from_secs(86_400));
        assert_eq!(due_offset(7_000 * 3600, 7_000), Duration::from_secs(3600));
        // Faster than one per nanosecond: several requests share a due time.
        assert_eq!(due_offset(1, 2_000_000_000), Duration::ZERO);
        assert_eq!(due_offset(2, 2_000_000_000), Duration::from_nanos(1));
    }

    #[test]
    fn due_times_never_decrease_and_never_overflow() {
        let rate = 7;
        let mut prev = Duration::ZERO;
        for i in 0..1000 {
            let d = due_offset(i, rate);
            assert!(d >= prev);
            prev = d;
        }
        assert_eq!(due_offset(u64::MAX, 1), Duration::from_secs(u64::MAX));
        assert_eq!(due_offset(5, 0), Duration::from_secs(5));
    }

    #[test]
    fn the_last_request_is_due_before_the_duration_ends() {
        let (rate, secs) = (250, 4);
        let n = total_requests(rate, secs);
        assert!(due_offset(n - 1, rate) < Duration::from_secs(secs));
        assert_eq!(due_offset(n, rate), Duration::from_secs(secs));
    }

    #[test]
    fn lag_is_never_negative() {
        let due = Duration::from_millis(10);
        assert_eq!(lag(due, Duration::from_millis(4)), Duration::ZERO);
        assert_eq!(
            lag(due, Duration::from_millis(15)),
            Duration::from_millis(5)
        );
    }
}
