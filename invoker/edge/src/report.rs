//! Real traffic as an observer of the sites: request and error rates per site over each
//! report interval, published as an agent report (role edge) for the session with the
//! invoker leader (`site_agent::session`). An error is a 5xx answer, a connection failure or
//! a timeout: what a viewer would have seen go wrong at that site.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use invoker_api::pb;
use tokio::sync::watch;

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// Attempts per site since the last report.
#[derive(Debug)]
pub struct Traffic {
    sites: BTreeMap<String, Counters>,
}

impl Traffic {
    pub fn new(sites: &[String]) -> Traffic {
        Traffic {
            sites: sites
                .iter()
                .map(|s| (s.clone(), Counters::default()))
                .collect(),
        }
    }

    /// One attempt at `site` (a retry is a second attempt, at the other site).
    pub fn record(&self, site: &str, error: bool) {
        if let Some(c) = self.sites.get(site) {
            c.requests.fetch_add(1, Ordering::Relaxed);
            if error {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts since the last call, per site, and resets them.
    pub fn take(&self) -> BTreeMap<String, (u64, u64)> {
        self.sites
            .iter()
            .map(|(site, c)| {
                let requests = c.requests.swap(0, Ordering::Relaxed);
                let errors = c.errors.swap(0, Ordering::Relaxed);
                (site.clone(), (requests, errors))
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Per-second rate of `count` events over `elapsed` (rounded to the nearest).
pub fn per_second(count: u64, elapsed: Duration) -> u64 {
    let ms = elapsed.as_millis().max(1);
    let rate = (u128::from(count) * 1000 + ms / 2) / ms;
    u64::try_from(rate).unwrap_or(u64::MAX)
}

/// The report of one interval; every configured site is in it, idle ones with zeros, so the
/// policy can tell "no traffic" from "no report".
pub fn report(
    seq: u64,
    observed_at_ms: u64,
    service: &str,
    counts: &BTreeMap<String, (u64, u64)>,
    elapsed: Duration,
) -> pb::AgentReport {
    pb::AgentReport {
        seq,
        observed_at_ms: i64::try_from(observed_at_ms).unwrap_or(i64::MAX),
        edge: counts
            .iter()
            .map(|(site, (requests, errors))| pb::EdgeSample {
                site: site.clone(),
                service: service.to_string(),
                request_rps: per_second(*requests, elapsed),
                error_rps: per_second(*errors, elapsed),
            })
            .collect(),
        ..Default::default()
    }
}

/// Publishes a report every `interval` until `stop`.
pub async fn run_reporter(
    traffic: Arc<Traffic>,
    service: String,
    interval: Duration,
    reports: watch::Sender<Option<pb::AgentReport>>,
    mut stop: watch::Receiver<bool>,
) {
    // Sequence numbers must grow across restarts of the edge too (the leader refuses a
    // sequence it has seen): start from the clock, as the site agent does.
    let mut seq = now_ms().saturating_mul(1000);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    traffic.take();
    let mut since = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let counts = traffic.take();
        let now = Instant::now();
        seq += 1;
        reports.send_replace(Some(report(
            seq,
            now_ms(),
            &service,
            &counts,
            now.duration_since(since),
        )));
        since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_per_site_over_the_interval() {
        let t = Traffic::new(&["a".into(), "b".into()]);
        for i in 0..50 {
            t.record("a", i % 10 == 0);
        }
        t.record("b", true);
        t.record("elsewhere", true);
        let counts = t.take();
        assert_eq!(counts["a"], (50, 5));
        assert_eq!(counts["b"], (1, 1));
        assert_eq!(counts.len(), 2);
        assert_eq!(t.take()["a"], (0, 0), "taking resets");

        let r = report(7, 1_000, "gift-api", &counts, Duration::from_millis(500));
        assert_eq!(r.seq, 7);
        assert_eq!(r.edge.len(), 2);
        assert_eq!(r.edge[0].site, "a");
        assert_eq!(r.edge[0].service, "gift-api");
        assert_eq!(r.edge[0].request_rps, 100);
        assert_eq!(r.edge[0].error_rps, 10);
        assert_eq!(r.edge[1].request_rps, 2);
        assert!(r.instances.is_empty() && r.peers.is_empty() && r.databases.is_empty());
        assert_eq!(per_second(1, Duration::from_millis(3000)), 0);
        assert_eq!(per_second(2, Duration::from_millis(3000)), 1);
        assert_eq!(per_second(5, Duration::ZERO), 5000);
    }
}
