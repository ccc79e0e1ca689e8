//! Availability over time: requests counted per fixed window of their due time, and the
//! recovery time after an event (a kill) that this gives.
//!
//! A request counts as a success when the service answered it as designed: committed, or a
//! business rejection (insufficient funds is the service working). Errors (5xx, timeouts,
//! refused connections, throttling) count against availability. Requests are placed by when
//! they were due, not when they finished, so a request that hung for two seconds after a
//! kill counts at the moment of the kill.

use serde::Serialize;

/// Width of one window; the RTO is "success rate over 200 ms windows back at ≥ 99%".
pub const WINDOW_MS: u64 = 200;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WindowCounts {
    pub ok: u64,
    pub errors: u64,
}

impl WindowCounts {
    pub fn total(&self) -> u64 {
        self.ok + self.errors
    }

    /// Success share; an empty window is not a failure (1.0).
    pub fn success_rate(&self) -> f64 {
        match self.total() {
            0 => 1.0,
            n => self.ok as f64 / n as f64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    pub window_ms: u64,
    /// Wall clock of the first request's due time, so events can be placed on it.
    pub started_at_unix_ms: u64,
    pub windows: Vec<WindowCounts>,
}

/// What an event did to availability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recovery {
    /// From the event until the start of the first window after which every window (that
    /// one included) is at or above the threshold; 0 when no window after it dipped.
    pub rto_ms: u64,
    /// Failed requests due at or after the event.
    pub failed_after_event: u64,
    pub requests_after_event: u64,
    /// The lowest window success rate after the event.
    pub worst_window_rate: f64,
    /// False when the run ended before availability was back (`rto_ms` then runs to the end).
    pub recovered: bool,
}

impl Timeline {
    pub fn new(started_at_unix_ms: u64) -> Timeline {
        Timeline {
            window_ms: WINDOW_MS,
            started_at_unix_ms,
            windows: Vec::new(),
        }
    }

    pub fn record(&mut self, due_offset_ms: u64, ok: bool) {
        let index = usize::try_from(due_offset_ms / self.window_ms.max(1)).unwrap_or(usize::MAX);
        if index >= self.windows.len() {
            // Bounded by the run's duration: the dispatcher never schedules past its end.
            self.windows
                .resize(index.saturating_add(1), WindowCounts::default());
        }
        if let Some(w) = self.windows.get_mut(index) {
            if ok {
                w.ok += 1;
            } else {
                w.errors += 1;
            }
        }
    }

    /// Recovery after an event at `event_unix_ms`, judged on windows at `threshold` (0.99).
    pub fn recovery_after(&self, event_unix_ms: u64, threshold: f64) -> Recovery {
        let width = self.window_ms.max(1);
        let event_offset = event_unix_ms.saturating_sub(self.started_at_unix_ms);
        // The window holding the event is the first one judged.
        let first = usize::try_from(event_offset / width).unwrap_or(usize::MAX);
        let after = self.windows.get(first..).unwrap_or(&[]);
        let failed_after_event = after.iter().map(|w| w.errors).sum();
        let requests_after_event = after.iter().map(|w| w.total()).sum();
        let worst_window_rate = after
            .iter()
            .map(WindowCounts::success_rate)
            .fold(1.0, f64::min);
        // The last window below the threshold; recovery starts at the window after it.
        let last_bad = after.iter().rposition(|w| w.success_rate() < threshold);
        let (rto_ms, recovered) = match last_bad {
            None => (0, true),
            Some(i) => {
                let back_at = (first + i + 1) as u64 * width;
                (
                    back_at.saturating_sub(event_offset),
                    first + i + 1 < self.windows.len(),
                )
            }
        };
        Recovery {
            rto_ms,
            failed_after_event,
            requests_after_event,
            worst_window_rate,
            recovered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(rates: &[(u64, u64)]) -> Timeline {
        let mut t = Timeline::new(10_000);
        for (i, (ok, errors)) in rates.iter().enumerate() {
            let at = i as u64 * WINDOW_MS + 1;
            for _ in 0..*ok {
                t.record(at, true);
            }
            for _ in 0..*errors {
                t.record(at, false);
            }
        }
        t
    }

    #[test]
    fn rto_runs_from_the_event_to_the_first_window_that_stays_good() {
        // Windows 0-1 good, 2-4 bad, 5 good, 6 bad (one straggler), 7-9 good.
        let t = timeline(&[
            (100, 0),
            (100, 0),
            (10, 90),
            (0, 100),
            (50, 50),
            (100, 0),
            (98, 2),
            (100, 0),
            (100, 0),
            (100, 0),
        ]);
        // Event 50 ms into window 2.
        let r = t.recovery_after(10_000 + 2 * WINDOW_MS + 50, 0.99);
        assert_eq!(r.rto_ms, 7 * WINDOW_MS - (2 * WINDOW_MS + 50));
        assert_eq!(r.failed_after_event, 242);
        assert_eq!(r.worst_window_rate, 0.0);
        assert!(r.recovered);
    }

    #[test]
    fn no_dip_is_zero_and_a_dip_to_the_end_is_not_recovered() {
        let t = timeline(&[(100, 0), (100, 0), (100, 0)]);
        let r = t.recovery_after(10_000, 0.99);
        assert_eq!((r.rto_ms, r.failed_after_event, r.recovered), (0, 0, true));
        let t = timeline(&[(100, 0), (0, 100)]);
        let r = t.recovery_after(10_000 + WINDOW_MS, 0.99);
        assert!(!r.recovered);
        assert_eq!(r.rto_ms, WINDOW_MS);
        // Failures before the event do not count.
        let t = timeline(&[(0, 100), (100, 0)]);
        let r = t.recovery_after(10_000 + WINDOW_MS, 0.99);
        assert_eq!((r.rto_ms, r.failed_after_event), (0, 0));
    }
}
