//! Open-loop load generator for the gift-api HTTP service.
//!
//! A run has three phases:
//!
//! 1. **Set-up** (not measured): fetch the catalog, top up every user `1..=users` with the
//!    initial balance (idempotency key `<run_id>-init-<user>`), a bounded number at a time.
//! 2. **Timed run**: request `i` is due at `start + i / rate` and is sent then, whether or not
//!    earlier requests have finished (one task per request). Latency is measured from the due
//!    time, not from when the request happened to go out, so a slow server cannot hide its
//!    latency by slowing the client down (coordinated omission). Requests over the in-flight
//!    cap are not delayed but counted as errors (`overload_client_cap`). Users and streamers
//!    are Zipf-distributed, so a few hot keys take much of the load.
//! 3. **Read-back**: every committed send is fetched again (`GET /v1/orders/{id}`) and must
//!    exist with the amount the send reported.
//!
//! ```no_run
//! # async fn demo() -> Result<(), drills::loadgen::LoadgenError> {
//! use drills::loadgen::{run, LoadgenConfig};
//! let mut config = LoadgenConfig::new(vec!["http://127.0.1.5:43210".into()]);
//! config.rate_per_sec = 200;
//! config.duration_secs = 10;
//! let report = run(&config).await?;
//! println!("{:.1} sends/s, p99 {:.1} ms", report.committed_sends_per_sec(), report.send_p99_ms());
//! # Ok(()) }
//! ```

mod http;
mod mix;
mod report;
mod schedule;
pub mod timeline;
mod zipf;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Url;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::lab::{LabDescription, LabError};

pub use http::Gift;
pub use mix::{Mix, MixError, Op};
pub use report::{
    LatencyMs, LoadReport, OpReport, Outcome, ReadbackReport, SetupReport, MAX_LISTED,
};
pub use schedule::{due_offset, total_requests};
pub use zipf::Zipf;

use http::{Ctx, Reply};
use report::RunStats;

/// Gift count per send is uniform in `1..=MAX_SEND_COUNT`.
pub const MAX_SEND_COUNT: i64 = 3;
/// Largest `users` / `streamers`: the Zipf CDF holds one `f64` per key.
pub const MAX_KEYS: u64 = 10_000_000;
/// Largest `max_in_flight` (each in-flight request may hold a connection).
pub const MAX_IN_FLIGHT: usize = 1_000_000;
/// Longest `run_id`: keys are `<run_id>-send-<i>` and the server takes at most 200 bytes.
pub const MAX_RUN_ID_LEN: usize = 64;
/// Attempts for each set-up top-up and each read-back (retrying transport errors and 5xx).
const AUX_ATTEMPTS: u32 = 3;
/// The error reason of a request the in-flight cap kept from being sent.
pub const OVERLOAD_REASON: &str = "overload_client_cap";

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A bad setting; the binary exits 64 on these.
    #[error("{0}")]
    Config(String),
    #[error("bad --mix: {0}")]
    Mix(#[from] MixError),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("the lab in {} lists no gift-api endpoint (endpoints.gift_api in lab.json is empty)", .0.display())]
    NoGiftApi(PathBuf),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("fetching the catalog from {url}: {reason}")]
    Catalog { url: String, reason: String },
    #[error("set-up: {failed} of {total} initial top-ups failed (first: user {first_user}: {first_reason})")]
    Setup {
        failed: u64,
        total: u64,
        first_user: u64,
        first_reason: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl LoadgenError {
    /// Whether the error is the caller's input rather than the server or the run.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            LoadgenError::Config(_)
                | LoadgenError::Mix(_)
                | LoadgenError::Lab(_)
                | LoadgenError::NoGiftApi(_)
        )
    }
}

/// Which target a request goes to when there are several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spread {
    /// `(user_id - 1) % targets`: a user always talks to the same site, as a sticky client
    /// would, so reads see that site's writes.
    User,
    /// Request `i` goes to target `i % targets`.
    RoundRobin,
}

impl FromStr for Spread {
    type Err = String;

    fn from_str(s: &str) -> Result<Spread, String> {
        match s {
            "user" => Ok(Spread::User),
            "round-robin" => Ok(Spread::RoundRobin),
            other => Err(format!(
                "unknown spread `{other}`; expected `user` or `round-robin`"
            )),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Spread::User => "user",
            Spread::RoundRobin => "round-robin",
        })
    }
}

/// Everything a run needs; echoed in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadgenConfig {
    /// gift-api base URLs (`http://host:port`).
    pub targets: Vec<String>,
    pub spread: Spread,
    pub rate_per_sec: u64,
    pub duration_secs: u64,
    /// Requests past this many in flight are not sent but counted as errors.
    pub max_in_flight: usize,
    /// Per request, from when it is sent.
    pub timeout_ms: u64,
    pub users: u64,
    pub streamers: u64,
    /// Zipf exponent for users and streamers (0 = uniform).
    pub zipf_s: f64,
    pub mix: Mix,
    /// Seeds every random choice of the timed run (op, user, streamer, gift, count).
    pub seed: u64,
    /// Prefix of every idempotency key, so that runs never collide.
    pub run_id: String,
    /// Send `x-shadow: 1` on every request.
    pub shadow: bool,
    /// Minor units given to every user in set-up; 0 skips the set-up top-ups.
    pub initial_balance: i64,
    /// Minor units of each `topup` op of the timed run.
    pub topup_amount: i64,
    /// Top-ups in flight at once during set-up.
    pub setup_concurrency: usize,
    /// Whether to read back every committed send after the run.
    pub readback: bool,
    /// Order reads in flight at once during read-back.
    pub readback_concurrency: usize,
}

impl LoadgenConfig {
    /// The defaults of the command line, with a fresh random run id and seed.
    pub fn new(targets: Vec<String>) -> LoadgenConfig {
        LoadgenConfig {
            targets,
            spread: Spread::User,
            rate_per_sec: 100,
            duration_secs: 10,
            max_in_flight: 2000,
            timeout_ms: 2000,
            users: 10_000,
            streamers: 1000,
            zipf_s: 1.1,
            mix: Mix::default(),
            seed: rand::random(),
            run_id: random_run_id(),
            shadow: false,
            initial_balance: 1_000_000,
            topup_amount: 100,
            setup_concurrency: 64,
            readback: true,
            readback_concurrency: 64,
        }
    }

    /// Checks every setting; returns the parsed targets.
    pub fn validate(&self) -> Result<Vec<Url>, LoadgenError> {
        let bad = |msg: String| Err(LoadgenError::Config(msg));
        if self.targets.is_empty() {
            return bad("no target: give --url or --lab".into());
        }
        let targets = self
            .targets
            .iter()
            .map(|t| http::parse_target(t))
            .collect::<Result<Vec<_>, _>>()?;
        if self.rate_per_sec == 0 {
            return bad("--rate-per-sec must be at least 1".into());
        }
        if self.duration_secs == 0 {
            return bad("--duration-secs must be at least 1".into());
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return bad(format!("--max-in-flight must be in 1..={MAX_IN_FLIGHT}"));
        }
        if self.timeout_ms == 0 {
            return bad("--timeout-ms must be at least 1".into());
        }
        for (name, n) in [("--users", self.users), ("--streamers", self.streamers)] {
            if !(1..=MAX_KEYS).contains(&n) {
                return bad(format!("{name} must be in 1..={MAX_KEYS}, got {n}"));
            }
        }
        if !self.zipf_s.is_finite() || self.zipf_s < 0.0 {
            return bad(format!(
                "--zipf-s must be a finite number >= 0, got {}",
                self.zipf_s
            ));
        }
        if self.run_id.is_empty()
            || self.run_id.len() > MAX_RUN_ID_LEN
            || !self
                .run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad(format!(
                "--run-id must be 1 to {MAX_RUN_ID_LEN} characters of A-Z a-z 0-9 - _ ., got `{}`",
                self.run_id
            ));
        }
        if self.initial_balance < 0 {
            return bad("--initial-balance must be >= 0".into());
        }
        if self.mix.weight(Op::Topup) > 0 && self.topup_amount <= 0 {
            return bad("--topup-amount must be positive when the mix has topups".into());
        }
        if self.setup_concurrency == 0 || self.readback_concurrency == 0 {
            return bad("--setup-concurrency and --readback-concurrency must be at least 1".into());
        }
        Ok(targets)
    }
}

/// 16 random hex digits.
pub fn random_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Where in a lab the load goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LabTarget {
    /// The edge router when the lab has one (as real clients would), else every gift-api.
    #[default]
    Auto,
    /// Every site's gift-api directly, bypassing the edge.
    Direct,
    /// One site's gift-api directly.
    Site(String),
}

/// The base URLs to load in the lab in `dir`: see [`LabTarget`]; gift-apis in site order.
pub fn targets_from_lab(dir: &Path, target: &LabTarget) -> Result<Vec<String>, LoadgenError> {
    let description = LabDescription::load(dir)?;
    let endpoints = description.endpoints;
    let targets: Vec<String> = match target {
        LabTarget::Auto => match endpoints.edge {
            Some(edge) => vec![edge],
            None => endpoints.gift_api.into_values().collect(),
        },
        LabTarget::Direct => endpoints.gift_api.into_values().collect(),
        LabTarget::Site(site) => endpoints.gift_api.get(site).cloned().into_iter().collect(),
    };
    if targets.is_empty() {
        return Err(LoadgenError::NoGiftApi(dir.to_path_buf()));
    }
    Ok(targets)
}

/// [`run`] owning its configuration, for `tokio::spawn`.
pub async fn run_owned(config: LoadgenConfig) -> Result<LoadReport, LoadgenError> {
    run(&config).await
}

/// Runs set-up, the timed run and read-back; see the module documentation.
pub async fn run(config: &LoadgenConfig) -> Result<LoadReport, LoadgenError> {
    let targets = config.validate()?;
    let timeout = Duration::from_millis(config.timeout_ms);
    let ctx = Ctx {
        client: http::build_client(config.max_in_flight, timeout)?,
        targets,
        shadow: config.shadow,
        timeout,
    };
    let users = Zipf::new(config.users, config.zipf_s)?;
    let streamers = Zipf::new(config.streamers, config.zipf_s)?;

    let setup_start = Instant::now();
    let first = ctx
        .targets
        .first()
        .ok_or_else(|| LoadgenError::Config("no target".into()))?;
    let catalog = http::fetch_catalog(&ctx, first).await?;
    tracing::info!(gifts = catalog.len(), run_id = %config.run_id, "loadgen: catalog fetched");
    let shared = Arc::new(Shared {
        ctx,
        catalog,
        run_id: config.run_id.clone(),
        topup_amount: config.topup_amount,
    });
    let users_topped_up = setup_balances(&shared, config).await?;
    let setup = SetupReport {
        catalog_gifts: shared.catalog.len(),
        users_topped_up,
        elapsed_secs: setup_start.elapsed().as_secs_f64(),
    };
    tracing::info!(
        users = users_topped_up,
        secs = setup.elapsed_secs,
        "loadgen: set-up done"
    );

    let (stats, committed, elapsed) = timed_run(&shared, config, users, streamers).await?;
    tracing::info!(
        secs = elapsed.as_secs_f64(),
        committed_sends = committed.len(),
        "loadgen: timed run done"
    );

    let committed_order_ids: Vec<String> = committed.iter().map(|c| c.order_id.clone()).collect();
    let readback = if config.readback {
        let r = read_back(&shared, committed, config.readback_concurrency).await;
        tracing::info!(
            checked = r.checked,
            missing = r.missing,
            mismatched = r.mismatched,
            "loadgen: read-back done"
        );
        r
    } else {
        ReadbackReport::default()
    };
    let mut report = LoadReport::assemble(config, setup, &stats, elapsed, readback)?;
    report.committed_order_ids = committed_order_ids;
    Ok(report)
}

/// What the per-request tasks share.
struct Shared {
    ctx: Ctx,
    catalog: Vec<Gift>,
    run_id: String,
    topup_amount: i64,
}

impl Shared {
    fn target(&self, index: usize) -> Result<&Url, Outcome> {
        // Plans only hold indexes below targets.len(); an error here beats a panic.
        self.ctx
            .targets
            .get(index)
            .ok_or_else(|| Outcome::Error("internal_bad_target".into()))
    }
}

/// Which target serves `user_id` (set-up and `Spread::User`).
fn target_for_user(user_id: u64, targets: usize) -> usize {
    (user_id.saturating_sub(1) % targets.max(1) as u64) as usize
}

/// The random choices for one request of the timed run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    i: u64,
    op: Op,
    user_id: i64,
    streamer_id: i64,
    gift: usize,
    count: i64,
    target: usize,
}

#[allow(clippy::too_many_arguments)]
fn plan<R: Rng + ?Sized>(
    i: u64,
    rng: &mut R,
    mix: &Mix,
    users: &Zipf,
    streamers: &Zipf,
    gifts: usize,
    targets: usize,
    spread: Spread,
) -> Plan {
    // Every request draws the same values in the same order, whatever its op, so that a seed
    // gives the same users and streamers under any mix.
    let op = mix.pick(rng.random_range(0..mix.total()));
    let user = users.sample(rng);
    let streamer = streamers.sample(rng);
    let gift = rng.random_range(0..gifts.max(1));
    let count = rng.random_range(1..=MAX_SEND_COUNT);
    let target = match spread {
        Spread::User => target_for_user(user, targets),
        Spread::RoundRobin => (i % targets.max(1) as u64) as usize,
    };
    Plan {
        i,
        op,
        // Both are at most MAX_KEYS (validated), far below i64::MAX. Streamers get their own
        // id range: a user may not send a gift to themselves (gift-api refuses it).
        user_id: i64::try_from(user).unwrap_or(i64::MAX),
        streamer_id: STREAMER_ID_BASE + i64::try_from(streamer).unwrap_or(0),
        gift,
        count,
        target,
    }
}

/// Streamer ids are `STREAMER_ID_BASE + rank`, apart from user ids (`rank`).
pub const STREAMER_ID_BASE: i64 = 1_000_000_000;

/// A committed send, kept for read-back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CommittedSend {
    order_id: String,
    target: usize,
    amount: i64,
    user_id: i64,
    streamer_id: i64,
    gift: usize,
    count: i64,
}

#[derive(Debug)]
enum Detail {
    None,
    Send {
        status: String,
        duplicate: bool,
        unexpected_amount: bool,
        committed: CommittedSend,
    },
    Read {
        source: Option<String>,
    },
}

/// One finished (or refused) request, sent to the collector.
#[derive(Debug)]
struct Sample {
    op: Op,
    /// When the request was due, from the start of the timed run.
    due_offset: Duration,
    outcome: Outcome,
    /// `None` when the request was never sent.
    latency: Option<Duration>,
    dispatch_lag: Duration,
    detail: Detail,
}

async fn execute(shared: &Shared, plan: &Plan) -> (Outcome, Detail) {
    let target = match shared.target(plan.target) {
        Ok(t) => t,
        Err(outcome) => return (outcome, Detail::None),
    };
    let ctx = &shared.ctx;
    match plan.op {
        Op::Send => {
            let Some(gift) = shared.catalog.get(plan.gift) else {
                return (Outcome::Error("internal_bad_gift".into()), Detail::None);
            };
            let key = format!("{}-send-{}", shared.run_id, plan.i);
            let req = http::SendRequest {
                user_id: plan.user_id,
                streamer_id: plan.streamer_id,
                room_id: plan.streamer_id,
                gift_id: &gift.gift_id,
                count: plan.count,
                idempotency_key: &key,
            };
            let reply = http::send_gift(ctx, target, &req).await;
            let outcome = http::classify(&reply);
            if outcome != Outcome::Committed {
                return (outcome, Detail::None);
            }
            let Reply::Http { body, .. } = &reply else {
                return (outcome, Detail::None);
            };
            match serde_json::from_slice::<http::SendResponse>(body) {
                Ok(resp) => {
                    let unexpected_amount = gift.price.checked_mul(plan.count) != Some(resp.amount);
                    let committed = CommittedSend {
                        order_id: resp.order_id,
                        target: plan.target,
                        amount: resp.amount,
                        user_id: plan.user_id,
                        streamer_id: plan.streamer_id,
                        gift: plan.gift,
                        count: plan.count,
                    };
                    (
                        outcome,
                        Detail::Send {
                            status: resp.status,
                            duplicate: resp.duplicate,
                            unexpected_amount,
                            committed,
                        },
                    )
                }
                // A commit we cannot read back is not a commit we can vouch for.
                Err(_) => (Outcome::Error("bad_response_body".into()), Detail::None),
            }
        }
        Op::Read => {
            let reply = http::read_wallet(ctx, target, plan.user_id).await;
            let outcome = http::classify(&reply);
            match (&outcome, &reply) {
                (Outcome::Committed, Reply::Http { body, .. }) => {
                    match serde_json::from_slice::<http::WalletResponse>(body) {
                        Ok(w) => (outcome, Detail::Read { source: w.source }),
                        Err(_) => (Outcome::Error("bad_response_body".into()), Detail::None),
                    }
                }
                _ => (outcome, Detail::None),
            }
        }
        Op::Topup => {
            let key = format!("{}-topup-{}", shared.run_id, plan.i);
            let reply = http::topup(ctx, target, plan.user_id, shared.topup_amount, &key).await;
            (http::classify(&reply), Detail::None)
        }
    }
}

/// Tops up every user with the initial balance; fails when any top-up does.
async fn setup_balances(shared: &Arc<Shared>, config: &LoadgenConfig) -> Result<u64, LoadgenError> {
    if config.initial_balance == 0 {
        return Ok(0);
    }
    let amount = config.initial_balance;
    let mut results = futures::stream::iter(1..=config.users)
        .map(|user| {
            let shared = Arc::clone(shared);
            async move {
                let key = format!("{}-init-{user}", shared.run_id);
                let index = target_for_user(user, shared.ctx.targets.len());
                let target = match shared.target(index) {
                    Ok(t) => t,
                    Err(outcome) => return (user, outcome),
                };
                let user_id = i64::try_from(user).unwrap_or(i64::MAX);
                let reply = http::with_retries(AUX_ATTEMPTS, || {
                    http::topup(&shared.ctx, target, user_id, amount, &key)
                })
                .await;
                (user, http::classify(&reply))
            }
        })
        .buffer_unordered(config.setup_concurrency);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first: Option<(u64, String)> = None;
    while let Some((user, outcome)) = results.next().await {
        match outcome {
            Outcome::Committed => ok += 1,
            Outcome::Rejected(reason) | Outcome::Error(reason) => {
                failed += 1;
                // buffer_unordered finishes out of order; report the lowest user for a stable
                // message.
                if first.as_ref().is_none_or(|(u, _)| user < *u) {
                    first = Some((user, reason));
                }
            }
        }
    }
    match first {
        None => Ok(ok),
        Some((first_user, first_reason)) => Err(LoadgenError::Setup {
            failed,
            total: config.users,
            first_user,
            first_reason,
        }),
    }
}

/// Sends the requests of the timed run on schedule.
struct Dispatcher {
    shared: Arc<Shared>,
    config: LoadgenConfig,
    users: Zipf,
    streamers: Zipf,
    runtime: tokio::runtime::Handle,
    tx: mpsc::UnboundedSender<Sample>,
    /// Set when the caller drops the run, so the thread does not go on sending.
    cancelled: Arc<AtomicBool>,
}

/// Sets the flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Dispatcher {
    /// Blocks until the last request has been sent (not answered); returns the start time,
    /// also as Unix milliseconds.
    fn run(self, total: u64) -> (Instant, u64) {
        let config = &self.config;
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let mut rng = StdRng::seed_from_u64(config.seed);
        let progress_every = config.rate_per_sec.saturating_mul(10).max(1);
        let start = Instant::now();
        let start_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        for i in 0..total {
            if self.cancelled.load(Ordering::Relaxed) {
                break;
            }
            let plan = plan(
                i,
                &mut rng,
                &config.mix,
                &self.users,
                &self.streamers,
                self.shared.catalog.len(),
                self.shared.ctx.targets.len(),
                config.spread,
            );
            let offset = due_offset(i, config.rate_per_sec);
            let due = start + offset;
            // Requests already due (a burst after a late wake-up) go out back to back.
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let dispatch_lag = schedule::lag(offset, start.elapsed());
            if i > 0 && i % progress_every == 0 {
                tracing::info!(
                    sent = i,
                    of = total,
                    in_flight = config.max_in_flight - in_flight.available_permits(),
                    "loadgen: running"
                );
            }
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                // The collector receives until every sender is gone, so this cannot fail.
                let _ = self.tx.send(Sample {
                    op: plan.op,
                    due_offset: offset,
                    outcome: Outcome::Error(OVERLOAD_REASON.into()),
                    latency: None,
                    dispatch_lag,
                    detail: Detail::None,
                });
                continue;
            };
            let shared = Arc::clone(&self.shared);
            let tx = self.tx.clone();
            self.runtime.spawn(async move {
                let (outcome, detail) = execute(&shared, &plan).await;
                let latency = due.elapsed();
                drop(permit);
                let _ = tx.send(Sample {
                    op: plan.op,
                    due_offset: offset,
                    outcome,
                    latency: Some(latency),
                    dispatch_lag,
                    detail,
                });
            });
        }
        (start, start_unix_ms)
    }
}

async fn timed_run(
    shared: &Arc<Shared>,
    config: &LoadgenConfig,
    users: Zipf,
    streamers: Zipf,
) -> Result<(RunStats, Vec<CommittedSend>, Duration), LoadgenError> {
    let total = total_requests(config.rate_per_sec, config.duration_secs);
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let mut stats = RunStats::new()?;
    let collector = tokio::spawn(async move {
        let mut committed = Vec::new();
        while let Some(sample) = rx.recv().await {
            stats.record(sample.op, &sample.outcome, sample.latency);
            stats.timeline.record(
                u64::try_from(sample.due_offset.as_millis()).unwrap_or(u64::MAX),
                !matches!(sample.outcome, Outcome::Error(_)),
            );
            stats.record_dispatch_lag(sample.dispatch_lag);
            match sample.detail {
                Detail::None => {}
                Detail::Send {
                    status,
                    duplicate,
                    unexpected_amount,
                    committed: c,
                } => {
                    *stats.send_status.entry(status).or_default() += 1;
                    stats.send_duplicates += u64::from(duplicate);
                    stats.sends_with_unexpected_amount += u64::from(unexpected_amount);
                    committed.push(c);
                }
                Detail::Read { source } => {
                    let source = source.unwrap_or_else(|| "unknown".into());
                    *stats.read_sources.entry(source).or_default() += 1;
                }
            }
        }
        (stats, committed)
    });

    let dispatcher = Dispatcher {
        shared: Arc::clone(shared),
        config: config.clone(),
        users,
        streamers,
        runtime: tokio::runtime::Handle::current(),
        tx,
        cancelled: Arc::new(AtomicBool::new(false)),
    };
    let _cancel = CancelOnDrop(Arc::clone(&dispatcher.cancelled));
    // A thread of its own rather than a task: tokio's timer wakes on whole milliseconds, which
    // would add up to a millisecond of dispatch lag to every latency; thread::sleep is good to
    // tens of microseconds.
    let (start, start_unix_ms) = tokio::task::spawn_blocking(move || dispatcher.run(total))
        .await
        .map_err(|e| LoadgenError::Internal(format!("the dispatcher thread failed: {e}")))?;
    // The dispatcher dropped its sender on return; the collector ends when the last request
    // task drops its clone, i.e. when the last request is done.
    let (mut stats, committed) = collector
        .await
        .map_err(|e| LoadgenError::Internal(format!("the collector task failed: {e}")))?;
    stats.timeline.started_at_unix_ms = start_unix_ms;
    Ok((stats, committed, start.elapsed()))
}

/// How one read-back went.
#[derive(Debug, PartialEq, Eq)]
enum Checked {
    Ok,
    Missing(String),
    Mismatched(String),
    Error(String),
}

/// Differences between what the send reported and the stored order; `None` when they agree.
/// Fields the order view leaves out are not compared.
fn compare_order(
    sent: &CommittedSend,
    gift_id: &str,
    order: &http::OrderResponse,
) -> Option<String> {
    let mut diffs = Vec::new();
    if order.amount != sent.amount {
        diffs.push(format!("amount {} (sent {})", order.amount, sent.amount));
    }
    let ids = [
        ("user_id", order.user_id, sent.user_id),
        ("streamer_id", order.streamer_id, sent.streamer_id),
        ("room_id", order.room_id, sent.streamer_id),
        ("count", order.count, sent.count),
    ];
    for (name, got, want) in ids {
        if let Some(got) = got {
            if got != want {
                diffs.push(format!("{name} {got} (sent {want})"));
            }
        }
    }
    if let Some(got) = &order.gift_id {
        if got != gift_id {
            diffs.push(format!("gift_id {got} (sent {gift_id})"));
        }
    }
    (!diffs.is_empty()).then(|| format!("{}: {}", sent.order_id, diffs.join(", ")))
}

async fn check_one(shared: &Shared, sent: &CommittedSend) -> Checked {
    let target = match shared.target(sent.target) {
        Ok(t) => t,
        Err(_) => return Checked::Error("internal_bad_target".into()),
    };
    let reply = http::with_retries(AUX_ATTEMPTS, || {
        http::get_order(&shared.ctx, target, &sent.order_id)
    })
    .await;
    match &reply {
        Reply::Http { status: 404, .. } => Checked::Missing(sent.order_id.clone()),
        Reply::Http { status: 200, body } => {
            match serde_json::from_slice::<http::OrderResponse>(body) {
                Ok(order) => {
                    let gift_id = shared
                        .catalog
                        .get(sent.gift)
                        .map_or("", |g| g.gift_id.as_str());
                    match compare_order(sent, gift_id, &order) {
                        None => Checked::Ok,
                        Some(diff) => Checked::Mismatched(diff),
                    }
                }
                Err(_) => Checked::Error("bad_response_body".into()),
            }
        }
        _ => match http::classify(&reply) {
            Outcome::Error(reason) | Outcome::Rejected(reason) => Checked::Error(reason),
            Outcome::Committed => Checked::Error("unexpected_2xx".into()),
        },
    }
}

async fn read_back(
    shared: &Arc<Shared>,
    committed: Vec<CommittedSend>,
    concurrency: usize,
) -> ReadbackReport {
    let start = Instant::now();
    let mut report = ReadbackReport {
        enabled: true,
        ..ReadbackReport::default()
    };
    let mut results = futures::stream::iter(committed)
        .map(|sent| {
            let shared = Arc::clone(shared);
            async move { check_one(&shared, &sent).await }
        })
        .buffer_unordered(concurrency);
    while let Some(checked) = results.next().await {
        report.checked += 1;
        match checked {
            Checked::Ok => report.ok += 1,
            Checked::Missing(id) => {
                report.missing += 1;
                if report.missing_order_ids.len() < MAX_LISTED {
                    report.missing_order_ids.push(id);
                }
            }
            Checked::Mismatched(detail) => {
                report.mismatched += 1;
                if report.mismatch_details.len() < MAX_LISTED {
                    report.mismatch_details.push(detail);
                }
            }
            Checked::Error(reason) => {
                report.errors += 1;
                *report.errors_by_reason.entry(reason).or_default() += 1;
            }
        }
    }
    report.missing_order_ids.sort();
    report.elapsed_secs = start.elapsed().as_secs_f64();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zipfs() -> (Zipf, Zipf) {
        (Zipf::new(100, 1.1).unwrap(), Zipf::new(10, 1.1).unwrap())
    }

    #[test]
    fn plans_are_deterministic_per_seed_and_in_range() {
        let (users, streamers) = zipfs();
        let mix = Mix::default();
        let plans = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..500)
                .map(|i| plan(i, &mut rng, &mix, &users, &streamers, 4, 2, Spread::User))
                .collect::<Vec<_>>()
        };
        let a = plans(9);
        assert_eq!(a, plans(9));
        assert_ne!(a, plans(10));
        for p in &a {
            assert!((1..=100).contains(&p.user_id));
            assert!((STREAMER_ID_BASE + 1..=STREAMER_ID_BASE + 10).contains(&p.streamer_id));
            assert!(p.gift < 4);
            assert!((1..=MAX_SEND_COUNT).contains(&p.count));
            assert_eq!(p.target, ((p.user_id - 1) % 2) as usize);
        }
        let sends = a.iter().filter(|p| p.op == Op::Send).count();
        assert!((300..=500).contains(&sends), "{sends} sends of 500 at 80 %");
    }

    #[test]
    fn the_mix_does_not_change_who_is_picked() {
        let (users, streamers) = zipfs();
        let pick = |mix: Mix| {
            let mut rng = StdRng::seed_from_u64(5);
            (0..200)
                .map(|i| {
                    let p = plan(i, &mut rng, &mix, &users, &streamers, 3, 1, Spread::User);
                    (p.user_id, p.streamer_id, p.gift, p.count)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(Mix::default()), pick(Mix::new(0, 1, 0).unwrap()));
    }

    #[test]
    fn round_robin_spreads_by_request() {
        let (users, streamers) = zipfs();
        let mut rng = StdRng::seed_from_u64(1);
        let mix = Mix::default();
        let targets: Vec<usize> = (0..6)
            .map(|i| {
                plan(
                    i,
                    &mut rng,
                    &mix,
                    &users,
                    &streamers,
                    1,
                    3,
                    Spread::RoundRobin,
                )
                .target
            })
            .collect();
        assert_eq!(targets, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(target_for_user(1, 2), 0);
        assert_eq!(target_for_user(2, 2), 1);
        assert_eq!(target_for_user(7, 1), 0);
    }

    #[test]
    fn config_validation() {
        let good = LoadgenConfig::new(vec!["http://127.0.1.5:43210".into()]);
        assert_eq!(good.validate().unwrap().len(), 1);
        assert_eq!(good.run_id.len(), 16);

        let check = |f: &dyn Fn(&mut LoadgenConfig), needle: &str| {
            let mut c = good.clone();
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.is_usage());
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        };
        check(&|c| c.targets.clear(), "no target");
        check(&|c| c.targets = vec!["https://x:1".into()], "http://");
        check(&|c| c.rate_per_sec = 0, "--rate-per-sec");
        check(&|c| c.duration_secs = 0, "--duration-secs");
        check(&|c| c.max_in_flight = 0, "--max-in-flight");
        check(&|c| c.timeout_ms = 0, "--timeout-ms");
        check(&|c| c.users = 0, "--users");
        check(&|c| c.streamers = MAX_KEYS + 1, "--streamers");
        check(&|c| c.zipf_s = -1.0, "--zipf-s");
        check(&|c| c.run_id = "a b".into(), "--run-id");
        check(&|c| c.run_id = "x".repeat(65), "--run-id");
        check(&|c| c.initial_balance = -1, "--initial-balance");
        check(&|c| c.topup_amount = 0, "--topup-amount");
        check(&|c| c.setup_concurrency = 0, "concurrency");

        let mut no_topups = good.clone();
        no_topups.mix = Mix::new(1, 1, 0).unwrap();
        no_topups.topup_amount = 0;
        assert!(no_topups.validate().is_ok());
    }

    #[test]
    fn spread_parses() {
        assert_eq!("user".parse::<Spread>().unwrap(), Spread::User);
        assert_eq!("round-robin".parse::<Spread>().unwrap(), Spread::RoundRobin);
        assert!("rr".parse::<Spread>().unwrap_err().contains("round-robin"));
        assert_eq!(Spread::RoundRobin.to_string(), "round-robin");
    }

    fn sent() -> CommittedSend {
        CommittedSend {
            order_id: "o-1".into(),
            target: 0,
            amount: 30,
            user_id: 7,
            streamer_id: 3,
            gift: 0,
            count: 3,
        }
    }

    fn order(json: &str) -> http::OrderResponse {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn read_back_compares_amount_and_identity() {
        let full = order(
            r#"{"order_id":"o-1","status":"delivered","user_id":7,"streamer_id":3,"room_id":3,
                "gift_id":"rose","count":3,"amount":30}"#,
        );
        assert_eq!(compare_order(&sent(), "rose", &full), None);
        // Only the amount is required of the server.
        assert_eq!(
            compare_order(&sent(), "rose", &order(r#"{"amount":30}"#)),
            None
        );

        let diff = compare_order(&sent(), "rose", &order(r#"{"amount":20,"user_id":8}"#)).unwrap();
        assert_eq!(diff, "o-1: amount 20 (sent 30), user_id 8 (sent 7)");
        let diff = compare_order(&sent(), "rose", &order(r#"{"amount":30,"gift_id":"cake"}"#));
        assert_eq!(diff.unwrap(), "o-1: gift_id cake (sent rose)");
    }

    #[test]
    fn targets_come_from_the_lab_description() {
        let dir = tempfile::tempdir().unwrap();
        let missing = targets_from_lab(dir.path(), &LabTarget::Auto).unwrap_err();
        assert!(matches!(missing, LoadgenError::Lab(_)) && missing.is_usage());

        let mut desc = LabDescription::new(dir.path(), crate::lab::Components::Full);
        desc.save().unwrap();
        let empty = targets_from_lab(dir.path(), &LabTarget::Auto).unwrap_err();
        assert!(matches!(empty, LoadgenError::NoGiftApi(_)), "{empty}");

        desc.endpoints
            .gift_api
            .insert("b".into(), "http://127.0.2.5:2".into());
        desc.endpoints
            .gift_api
            .insert("a".into(), "http://127.0.1.5:1".into());
        desc.save().unwrap();
        let both = vec![
            "http://127.0.1.5:1".to_string(),
            "http://127.0.2.5:2".to_string(),
        ];
        assert_eq!(
            targets_from_lab(dir.path(), &LabTarget::Auto).unwrap(),
            both
        );

        // With an edge router, the load goes through it unless told otherwise.
        desc.endpoints.edge = Some("http://127.0.3.10:3".into());
        desc.save().unwrap();
        assert_eq!(
            targets_from_lab(dir.path(), &LabTarget::Auto).unwrap(),
            vec!["http://127.0.3.10:3".to_string()]
        );
        assert_eq!(
            targets_from_lab(dir.path(), &LabTarget::Direct).unwrap(),
            both
        );
        assert_eq!(
            targets_from_lab(dir.path(), &LabTarget::Site("b".into())).unwrap(),
            vec!["http://127.0.2.5:2".to_string()]
        );
        assert!(targets_from_lab(dir.path(), &LabTarget::Site("c".into())).is_err());
    }
}
