//! Counting outcomes during the run, and the report assembled from the counts afterwards.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::mix::Op;
use super::{LoadgenConfig, LoadgenError};

/// Latencies above an hour saturate; no request lives that long (they time out first).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How many missing order ids (and mismatch details) the report lists.
pub const MAX_LISTED: usize = 20;

pub(crate) fn new_histogram() -> Result<Histogram<u64>, LoadgenError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| LoadgenError::Internal(format!("creating a histogram: {e}")))
}

pub(crate) fn micros(d: Duration) -> u64 {
    // Zero cannot be recorded with a lower bound of 1 µs; anything that fast is "1 µs".
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the server committed it.
    Committed,
    /// 422 or 409: a business rejection, by error code (`insufficient_funds`, ...).
    Rejected(String),
    /// Anything else, by reason (`timeout`, `connect`, `http_503_payments_unavailable`, ...).
    Error(String),
}

/// Latency percentiles in milliseconds (the histogram records microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    /// How many latencies were recorded; the percentiles are 0 when this is 0.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyMs {
    pub fn from_histogram(h: &Histogram<u64>) -> LatencyMs {
        if h.is_empty() {
            return LatencyMs::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// Counts and latencies of one op while the run goes on.
#[derive(Debug, Clone)]
pub(crate) struct OpStats {
    pub requests: u64,
    pub committed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub latency_us: Histogram<u64>,
}

impl OpStats {
    fn new() -> Result<OpStats, LoadgenError> {
        Ok(OpStats {
            requests: 0,
            committed: 0,
            rejected: 0,
            errors: 0,
            rejected_by_code: BTreeMap::new(),
            errors_by_reason: BTreeMap::new(),
            latency_us: new_histogram()?,
        })
    }
}

/// Everything counted during the timed run.
#[derive(Debug, Clone)]
pub(crate) struct RunStats {
    /// In the order of [`Op::ALL`].
    pub ops: [OpStats; 3],
    pub send_status: BTreeMap<String, u64>,
    pub send_duplicates: u64,
    pub sends_with_unexpected_amount: u64,
    pub read_sources: BTreeMap<String, u64>,
    pub dispatch_lag_us: Histogram<u64>,
    pub timeline: super::timeline::Timeline,
}

impl RunStats {
    pub fn new() -> Result<RunStats, LoadgenError> {
        Ok(RunStats {
            ops: [OpStats::new()?, OpStats::new()?, OpStats::new()?],
            send_status: BTreeMap::new(),
            send_duplicates: 0,
            sends_with_unexpected_amount: 0,
            read_sources: BTreeMap::new(),
            dispatch_lag_us: new_histogram()?,
            timeline: super::timeline::Timeline::new(0),
        })
    }

    /// `latency` is `None` for a request that was never sent (client overload): there is no
    /// latency to record, and it is counted as an error instead.
    pub fn record(&mut self, op: Op, outcome: &Outcome, latency: Option<Duration>) {
        let s = &mut self.ops[op as usize];
        s.requests += 1;
        match outcome {
            Outcome::Committed => s.committed += 1,
            Outcome::Rejected(code) => {
                s.rejected += 1;
                *s.rejected_by_code.entry(code.clone()).or_default() += 1;
            }
            Outcome::Error(reason) => {
                s.errors += 1;
                *s.errors_by_reason.entry(reason.clone()).or_default() += 1;
            }
        }
        if let Some(latency) = latency {
            s.latency_us.saturating_record(micros(latency));
        }
    }

    pub fn record_dispatch_lag(&mut self, lag: Duration) {
        self.dispatch_lag_us.saturating_record(micros(lag));
    }
}

/// Per-op results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpReport {
    /// Scheduled requests of this op (including those the client cap refused to send).
    pub requests: u64,
    pub committed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub committed_per_sec: f64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// From each request's scheduled time to its complete response, for every request that
    /// was sent, whatever its outcome (timeouts count at the time they gave up).
    pub latency_ms: LatencyMs,
}

/// The set-up phase (not measured).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SetupReport {
    pub catalog_gifts: usize,
    pub users_topped_up: u64,
    pub elapsed_secs: f64,
}

/// Reading back every committed send.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReadbackReport {
    /// False when read-back was turned off; every count is then 0.
    pub enabled: bool,
    /// Orders read back (= committed sends).
    pub checked: u64,
    /// Found, with the amount (and identity fields) the send reported.
    pub ok: u64,
    /// 404: the server said it committed the order, but has no record of it.
    pub missing: u64,
    pub mismatched: u64,
    /// Could not tell (transport error, 5xx, unreadable body) even after retries.
    pub errors: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// Up to [`MAX_LISTED`].
    pub missing_order_ids: Vec<String>,
    /// Up to [`MAX_LISTED`], e.g. `o-17: amount 30, sent 20`.
    pub mismatch_details: Vec<String>,
    pub elapsed_secs: f64,
}

/// The result of one run; `Serialize` gives the `--json` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub config: LoadgenConfig,
    pub setup: SetupReport,
    pub requests_scheduled: u64,
    /// `requests_scheduled / duration_secs`.
    pub offered_rate_per_sec: f64,
    /// From the first request's due time until the last response (or timeout).
    pub elapsed_secs: f64,
    /// How late the dispatcher sent requests relative to their due time (client-side
    /// slowness; it is already inside the latencies, which start at the due time).
    pub dispatch_lag_ms: LatencyMs,
    /// Committed requests of every op per second of `elapsed_secs`.
    pub committed_per_sec: f64,
    /// Committed sends per second of `elapsed_secs`.
    pub send_committed_per_sec: f64,
    pub requests: u64,
    pub committed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// Every op together.
    pub latency_ms: LatencyMs,
    pub ops: BTreeMap<Op, OpReport>,
    /// `status` of committed sends (`paid`, `delivered`, `refunded`, `failed`).
    pub send_status: BTreeMap<String, u64>,
    /// Committed sends answered `duplicate: true` (every key is fresh, so expect 0).
    pub send_duplicates: u64,
    /// Committed sends whose `amount` was not catalog price × count.
    pub sends_with_unexpected_amount: u64,
    /// `source` of wallet reads (`primary`, `replica`).
    pub read_sources: BTreeMap<String, u64>,
    pub readback: ReadbackReport,
    /// Successes and errors per 200 ms window of due time (availability over the run).
    pub timeline: super::timeline::Timeline,
    /// Every send answered as committed (what the lost-transaction checks compare with).
    #[serde(skip)]
    pub committed_order_ids: Vec<String>,
}

fn per_sec(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl LoadReport {
    /// Puts the report together from the run's counts.
    pub(crate) fn assemble(
        config: &LoadgenConfig,
        setup: SetupReport,
        stats: &RunStats,
        elapsed: Duration,
        readback: ReadbackReport,
    ) -> Result<LoadReport, LoadgenError> {
        let secs = elapsed.as_secs_f64();
        let mut overall = new_histogram()?;
        let mut ops = BTreeMap::new();
        let (mut requests, mut committed, mut rejected, mut errors) = (0, 0, 0, 0);
        let mut rejected_by_code = BTreeMap::new();
        let mut errors_by_reason = BTreeMap::new();
        for op in Op::ALL {
            let s = &stats.ops[op as usize];
            overall
                .add(&s.latency_us)
                .map_err(|e| LoadgenError::Internal(format!("merging histograms: {e}")))?;
            requests += s.requests;
            committed += s.committed;
            rejected += s.rejected;
            errors += s.errors;
            merge_counts(&mut rejected_by_code, &s.rejected_by_code);
            merge_counts(&mut errors_by_reason, &s.errors_by_reason);
            ops.insert(
                op,
                OpReport {
                    requests: s.requests,
                    committed: s.committed,
                    rejected: s.rejected,
                    errors: s.errors,
                    committed_per_sec: per_sec(s.committed, secs),
                    rejected_by_code: s.rejected_by_code.clone(),
                    errors_by_reason: s.errors_by_reason.clone(),
                    latency_ms: LatencyMs::from_histogram(&s.latency_us),
                },
            );
        }
        let send_committed = stats.ops[Op::Send as usize].committed;
        Ok(LoadReport {
            config: config.clone(),
            setup,
            requests_scheduled: requests,
            offered_rate_per_sec: per_sec(requests, config.duration_secs as f64),
            elapsed_secs: secs,
            dispatch_lag_ms: LatencyMs::from_histogram(&stats.dispatch_lag_us),
            committed_per_sec: per_sec(committed, secs),
            send_committed_per_sec: per_sec(send_committed, secs),
            requests,
            committed,
            rejected,
            errors,
            rejected_by_code,
            errors_by_reason,
            latency_ms: LatencyMs::from_histogram(&overall),
            ops,
            send_status: stats.send_status.clone(),
            send_duplicates: stats.send_duplicates,
            sends_with_unexpected_amount: stats.sends_with_unexpected_amount,
            read_sources: stats.read_sources.clone(),
            readback,
            timeline: stats.timeline.clone(),
            committed_order_ids: Vec::new(),
        })
    }

    /// Committed sends per second.
    pub fn committed_sends_per_sec(&self) -> f64 {
        self.send_committed_per_sec
    }

    /// p99 latency of sends in milliseconds (0 when none was sent).
    pub fn send_p99_ms(&self) -> f64 {
        self.op(Op::Send).map_or(0.0, |o| o.latency_ms.p99)
    }

    pub fn op(&self, op: Op) -> Option<&OpReport> {
        self.ops.get(&op)
    }

    /// No errors, and every committed send was found, with the right amount, on read-back.
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.readback.missing == 0 && self.readback.mismatched == 0
    }

    /// Why [`passed`](Self::passed) is false (empty when it is true).
    pub fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.errors > 0 {
            why.push(format!("{} errors", self.errors));
        }
        if self.readback.missing > 0 {
            why.push(format!(
                "{} committed orders missing on read-back",
                self.readback.missing
            ));
        }
        if self.readback.mismatched > 0 {
            why.push(format!(
                "{} orders mismatched on read-back",
                self.readback.mismatched
            ));
        }
        why
    }
}

fn counts_line(counts: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = counts.iter().collect();
    // Largest first: the top reason is the one to look at.
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable summary.
impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "loadgen run {} against {} target(s): {}{}",
            c.run_id,
            c.targets.len(),
            c.targets.join(", "),
            if c.shadow { " (shadow)" } else { "" }
        )?;
        writeln!(
            f,
            "set-up: {} gifts in catalog, {} users topped up with {} each, {:.1} s",
            self.setup.catalog_gifts,
            self.setup.users_topped_up,
            c.initial_balance,
            self.setup.elapsed_secs
        )?;
        writeln!(
            f,
            "offered {:.1}/s for {} s: {} requests (mix {}, {} users, {} streamers, zipf s={}, seed {})",
            self.offered_rate_per_sec,
            c.duration_secs,
            self.requests_scheduled,
            c.mix,
            c.users,
            c.streamers,
            c.zipf_s,
            c.seed
        )?;
        writeln!(
            f,
            "elapsed {:.2} s; dispatch lag p99 {:.2} ms, max {:.2} ms",
            self.elapsed_secs, self.dispatch_lag_ms.p99, self.dispatch_lag_ms.max
        )?;
        writeln!(
            f,
            "throughput: {:.1} committed/s ({:.1} sends/s); committed {}, rejected {}, errors {}",
            self.committed_per_sec,
            self.send_committed_per_sec,
            self.committed,
            self.rejected,
            self.errors
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<6} {:>9} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op",
            "requests",
            "committed",
            "rejected",
            "errors",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        )?;
        let row = |f: &mut fmt::Formatter<'_>,
                   name: &str,
                   (req, com, rej, err): (u64, u64, u64, u64),
                   l: &LatencyMs| {
            writeln!(
                f,
                "{:<6} {:>9} {:>9} {:>8} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, req, com, rej, err, l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        for (op, r) in &self.ops {
            row(
                f,
                op.name(),
                (r.requests, r.committed, r.rejected, r.errors),
                &r.latency_ms,
            )?;
        }
        row(
            f,
            "all",
            (self.requests, self.committed, self.rejected, self.errors),
            &self.latency_ms,
        )?;
        writeln!(f)?;
        for (op, r) in &self.ops {
            if !r.rejected_by_code.is_empty() {
                writeln!(f, "rejected ({op}): {}", counts_line(&r.rejected_by_code))?;
            }
            if !r.errors_by_reason.is_empty() {
                writeln!(f, "errors ({op}): {}", counts_line(&r.errors_by_reason))?;
            }
        }
        if !self.send_status.is_empty() {
            writeln!(
                f,
                "send statuses: {}; duplicates {}; unexpected amounts {}",
                counts_line(&self.send_status),
                self.send_duplicates,
                self.sends_with_unexpected_amount
            )?;
        }
        if !self.read_sources.is_empty() {
            writeln!(
                f,
                "wallet reads by source: {}",
                counts_line(&self.read_sources)
            )?;
        }
        let rb = &self.readback;
        if rb.enabled {
            writeln!(
                f,
                "read-back: {} checked, {} ok, {} missing, {} mismatched, {} errors ({:.1} s)",
                rb.checked, rb.ok, rb.missing, rb.mismatched, rb.errors, rb.elapsed_secs
            )?;
            if !rb.missing_order_ids.is_empty() {
                writeln!(f, "  missing: {}", rb.missing_order_ids.join(", "))?;
            }
            for d in &rb.mismatch_details {
                writeln!(f, "  mismatch: {d}")?;
            }
            if !rb.errors_by_reason.is_empty() {
                writeln!(f, "  errors: {}", counts_line(&rb.errors_by_reason))?;
            }
        } else {
            writeln!(f, "read-back: skipped")?;
        }
        if self.passed() {
            write!(f, "PASS")
        } else {
            write!(f, "FAIL: {}", self.failures().join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_from_a_histogram() {
        let mut h = new_histogram().unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap(); // 1..=1000 ms in µs
        }
        let l = LatencyMs::from_histogram(&h);
        assert_eq!(l.count, 1000);
        // Three significant digits: within 0.1 % of the exact value.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(close(l.p50, 500.0), "p50 {}", l.p50);
        assert!(close(l.p90, 900.0), "p90 {}", l.p90);
        assert!(close(l.p99, 990.0), "p99 {}", l.p99);
        assert!(close(l.p999, 999.0), "p99.9 {}", l.p999);
        assert!(close(l.max, 1000.0), "max {}", l.max);
        assert!(close(l.mean, 500.5), "mean {}", l.mean);
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
    }

    #[test]
    fn empty_histogram_gives_zeros() {
        let h = new_histogram().unwrap();
        assert_eq!(LatencyMs::from_histogram(&h), LatencyMs::default());
    }

    #[test]
    fn sub_microsecond_and_huge_latencies_are_recorded() {
        let mut stats = RunStats::new().unwrap();
        stats.record(Op::Read, &Outcome::Committed, Some(Duration::ZERO));
        stats.record(
            Op::Read,
            &Outcome::Committed,
            Some(Duration::from_secs(10 * 3600)),
        );
        assert_eq!(stats.ops[Op::Read as usize].latency_us.len(), 2);
    }

    fn sample_stats() -> RunStats {
        let mut stats = RunStats::new().unwrap();
        for i in 0..90 {
            stats.record(Op::Send, &Outcome::Committed, Some(ms(10 + i % 10)));
        }
        for _ in 0..5 {
            stats.record(
                Op::Send,
                &Outcome::Rejected("insufficient_funds".into()),
                Some(ms(5)),
            );
        }
        stats.record(Op::Send, &Outcome::Error("timeout".into()), Some(ms(2000)));
        stats.record(
            Op::Send,
            &Outcome::Error("overload_client_cap".into()),
            None,
        );
        for _ in 0..10 {
            stats.record(Op::Read, &Outcome::Committed, Some(ms(1)));
        }
        stats.record(
            Op::Topup,
            &Outcome::Rejected("idempotency_key_reused".into()),
            Some(ms(3)),
        );
        *stats.send_status.entry("delivered".into()).or_default() += 90;
        stats
    }

    #[test]
    fn assembles_counts_rates_and_percentiles() {
        let config = LoadgenConfig::new(vec!["http://127.0.0.1:1".into()]);
        let mut config = config;
        config.duration_secs = 2;
        let stats = sample_stats();
        let report = LoadReport::assemble(
            &config,
            SetupReport::default(),
            &stats,
            Duration::from_secs(4),
            ReadbackReport {
                enabled: true,
                checked: 90,
                ok: 90,
                ..ReadbackReport::default()
            },
        )
        .unwrap();

        assert_eq!(report.requests, 108);
        assert_eq!(report.requests_scheduled, 108);
        assert_eq!(report.offered_rate_per_sec, 54.0);
        assert_eq!(report.committed, 100);
        assert_eq!(report.rejected, 6);
        assert_eq!(report.errors, 2);
        assert_eq!(report.committed_per_sec, 25.0);
        assert_eq!(report.send_committed_per_sec, 22.5);
        assert_eq!(report.committed_sends_per_sec(), 22.5);
        assert_eq!(
            report.rejected_by_code,
            BTreeMap::from([
                ("idempotency_key_reused".to_string(), 1),
                ("insufficient_funds".to_string(), 5)
            ])
        );
        assert_eq!(
            report.errors_by_reason,
            BTreeMap::from([
                ("overload_client_cap".to_string(), 1),
                ("timeout".to_string(), 1)
            ])
        );

        let send = report.op(Op::Send).unwrap();
        assert_eq!((send.requests, send.committed), (97, 90));
        // The overloaded request has no latency; the other 96 do.
        assert_eq!(send.latency_ms.count, 96);
        assert!((send.latency_ms.max - 2000.0).abs() < 2.0);
        // ceil(0.99 * 96) = 96: the p99 of 96 requests is the slowest, the timeout; p90 is
        // the 87th, among the committed sends.
        assert!(
            (report.send_p99_ms() - 2000.0).abs() < 2.0,
            "{}",
            report.send_p99_ms()
        );
        assert!(
            (send.latency_ms.p90 - 19.0).abs() < 0.1,
            "{}",
            send.latency_ms.p90
        );
        assert_eq!(report.latency_ms.count, 96 + 10 + 1);
        assert_eq!(report.op(Op::Read).unwrap().latency_ms.p50, 1.0);
        assert_eq!(report.ops.len(), 3);

        assert!(!report.passed());
        assert_eq!(report.failures(), vec!["2 errors".to_string()]);
        let text = report.to_string();
        assert!(text.contains("FAIL: 2 errors"), "{text}");
        assert!(text.contains("insufficient_funds=5"), "{text}");

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ops"]["send"]["committed"], 90);
        assert_eq!(json["config"]["mix"]["send"], 80);
        assert_eq!(json["readback"]["checked"], 90);
        assert!(json["ops"]["read"]["latency_ms"]["p99"].is_number());
    }

    #[test]
    fn passes_only_without_errors_missing_or_mismatched() {
        let config = LoadgenConfig::new(vec!["http://127.0.0.1:1".into()]);
        let mut stats = RunStats::new().unwrap();
        stats.record(Op::Send, &Outcome::Committed, Some(ms(1)));
        stats.record(
            Op::Send,
            &Outcome::Rejected("insufficient_funds".into()),
            Some(ms(1)),
        );
        let assemble = |readback| {
            LoadReport::assemble(&config, SetupReport::default(), &stats, ms(1000), readback)
                .unwrap()
        };
        let ok = assemble(ReadbackReport {
            enabled: true,
            checked: 1,
            ok: 1,
            ..ReadbackReport::default()
        });
        assert!(ok.passed(), "rejections alone do not fail a run");
        assert!(ok.to_string().ends_with("PASS"));

        let missing = assemble(ReadbackReport {
            enabled: true,
            checked: 1,
            missing: 1,
            missing_order_ids: vec!["o-1".into()],
            ..ReadbackReport::default()
        });
        assert!(!missing.passed());
        assert!(missing.to_string().contains("missing: o-1"));

        let mismatched = assemble(ReadbackReport {
            enabled: true,
            checked: 1,
            mismatched: 1,
            ..ReadbackReport::default()
        });
        assert!(!mismatched.passed());
    }
}
