//! Per-site admission from the routing table's `throttle_max_rps`: a token bucket per
//! throttled site, refilled at that rate and holding at most one second of it, so a site that
//! took over more load than it can carry is offered no more than its capacity.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

#[derive(Debug, Clone)]
struct Bucket {
    rate_per_sec: u64,
    tokens: f64,
    refilled_at: Instant,
}

impl Bucket {
    fn new(rate_per_sec: u64, now: Instant) -> Bucket {
        Bucket {
            rate_per_sec,
            tokens: Bucket::capacity(rate_per_sec),
            refilled_at: now,
        }
    }

    /// One second's worth, and at least one request.
    fn capacity(rate_per_sec: u64) -> f64 {
        (rate_per_sec as f64).max(1.0)
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_sec as f64)
            .min(Bucket::capacity(self.rate_per_sec));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The throttled sites and their buckets; sites without a limit are always admitted.
#[derive(Debug, Default)]
pub struct Throttle {
    buckets: Mutex<BTreeMap<String, Bucket>>,
}

impl Throttle {
    /// Follows a new table's limits. A site whose limit did not change keeps its bucket (a
    /// table change must not hand out a fresh burst); `0` or absent lifts the limit.
    pub fn set_limits(&self, limits: &BTreeMap<String, u64>, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets.retain(|site, b| limits.get(site) == Some(&b.rate_per_sec));
        for (site, &rate) in limits.iter().filter(|(_, &r)| r > 0) {
            buckets
                .entry(site.clone())
                .or_insert_with(|| Bucket::new(rate, now));
        }
    }

    /// May one more request go to `site` now?
    pub fn admit(&self, site: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match buckets.get_mut(site) {
            None => true,
            Some(bucket) => bucket.take(now),
        }
    }

    /// The limits in force (for `/routing`).
    pub fn limits(&self) -> BTreeMap<String, u64> {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(s, b)| (s.clone(), b.rate_per_sec))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admitted(t: &Throttle, site: &str, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| t.admit(site, now)).count()
    }

    #[test]
    fn a_throttled_site_gets_its_rate_and_no_more() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(admitted(&t, "b", 1000, start), 1000, "no limit yet");
        t.set_limits(&BTreeMap::from([("b".into(), 100)]), start);
        // One second's burst, then nothing until tokens refill.
        assert_eq!(admitted(&t, "b", 500, start), 100);
        assert!(!t.admit("b", start));
        assert_eq!(
            admitted(&t, "a", 500, start),
            500,
            "other sites are not throttled"
        );
        let later = start + Duration::from_millis(250);
        assert_eq!(admitted(&t, "b", 500, later), 25);
        // Over a longer stretch, the rate holds: 10 s at 100/s with requests every 1 ms.
        let mut ok = 0;
        for ms in 1..=10_000u64 {
            if t.admit("b", later + Duration::from_millis(ms)) {
                ok += 1;
            }
        }
        assert!((995..=1005).contains(&ok), "{ok}");
    }

    #[test]
    fn unchanged_limits_keep_their_bucket_and_zero_lifts_them() {
        let t = Throttle::default();
        let now = Instant::now();
        t.set_limits(&BTreeMap::from([("b".into(), 10)]), now);
        assert_eq!(admitted(&t, "b", 50, now), 10);
        // Another table with the same limit: no fresh burst.
        t.set_limits(&BTreeMap::from([("b".into(), 10)]), now);
        assert!(!t.admit("b", now));
        // A different limit starts a new bucket.
        t.set_limits(&BTreeMap::from([("b".into(), 20)]), now);
        assert_eq!(admitted(&t, "b", 50, now), 20);
        assert_eq!(t.limits(), BTreeMap::from([("b".to_string(), 20)]));
        t.set_limits(&BTreeMap::from([("b".into(), 0)]), now);
        assert_eq!(admitted(&t, "b", 50, now), 50);
        assert!(t.limits().is_empty());
        // A limit below one request per second still admits one now and then.
        t.set_limits(&BTreeMap::from([("a".into(), 1)]), now);
        assert_eq!(admitted(&t, "a", 5, now), 1);
        assert_eq!(admitted(&t, "a", 5, now + Duration::from_secs(1)), 1);
    }
}
