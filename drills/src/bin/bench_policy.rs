//! Benchmark: the invoker leader's failover loop under many agents.
//!
//! Starts the lab's three invoker nodes, applies a topology of sites a, b, a witness and N
//! stateless services (each routed 50/50), and opens one agent session per simulated agent,
//! each on its own connection from its site's address range, against the leader. Every agent
//! reports all services every interval (jittered start): its own instances of each service
//! in its site (names unique to the agent, as if each agent ran beside its own instances),
//! plus one cross-site probe per service of the other site (the witness's agents: of both).
//!
//! Then it measures:
//! 1. a steady window without faults: CPU (utime+stime from `/proc/<pid>/stat`, % of one
//!    core) and RSS of the leader, the followers and this simulator; the reports the leader
//!    accepted (its `invoker_agent_reports_total`) against those the simulator sent;
//! 2. observation → committed decision: one service at a time, every agent in site a reports
//!    its instances of that service unhealthy from time T (T = when the first report carrying
//!    the failure was handed to its session); the sample ends when the leader's
//!    `RoutingWatch` stream shows that service's buckets all moved to b. The service is then
//!    healthy again and fails back automatically after a short stable period; the next sample
//!    takes the next service meanwhile.
//!
//! Everything runs on one machine: the simulator competes with the three nodes for the CPUs.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench-policy --json docs/bench/policy.json
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use drills::bench::machine;
use drills::lab::{site_ip, Lab, LabOptions};
use futures::StreamExt;
use invoker_api::{pb, InvokerClient};
use invoker_domain::{ServiceClass, ServiceSpec, Topology};
use prost::Message;
use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;

/// How often the leader's policy loop decides (invoker/server/src/policy_loop.rs `TICK_MS`).
const POLICY_TICK_MS: u64 = 100;
/// Buckets a site holds when a service is routed 50/50.
const HALF: u32 = (invoker_domain::BUCKETS / 2) as u32;
/// Linux reports process CPU times in USER_HZ ticks, which the kernel fixes at 100 for
/// user space on every architecture we run on, whatever its internal HZ.
const USER_HZ: f64 = 100.0;

#[derive(Parser, Clone)]
#[command(about = "The invoker leader's failover loop under many agents: CPU and decision latency")]
struct Args {
    /// Simulated agents in all (a few of them at the witness, the rest split over a and b).
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Of --agents, how many run at the witness.
    #[arg(long, default_value_t = 4)]
    witness_agents: usize,
    /// Stateless services (svc-00, svc-01, ...), each routed 50/50.
    #[arg(long, default_value_t = 20)]
    services: usize,
    /// Instances of each service per site agent (each agent probes its own).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Each agent reports this often; also the policy's `probe_interval_ms`.
    #[arg(long, default_value_t = 500)]
    report_interval_ms: u64,
    /// The policy's `failures_to_trip` for every service.
    #[arg(long, default_value_t = 3)]
    failures_to_trip: u32,
    /// The policy's `hold_down_ms` for every service (kept short so that rounds can repeat).
    #[arg(long, default_value_t = 1000)]
    hold_down_ms: u64,
    /// Automatic failback after this long healthy again.
    #[arg(long, default_value_t = 1000)]
    stable_period_ms: u64,
    /// Seconds after every session is open before anything is measured.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Length of the steady (fault-free) measuring window.
    #[arg(long, default_value_t = 30)]
    window_secs: u64,
    /// Observation → decision samples to take.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Give up on one sample after this long.
    #[arg(long, default_value_t = 30)]
    sample_timeout_secs: u64,
    /// Working directory (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "docs/bench/policy.json")]
    json: PathBuf,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn service_name(i: usize) -> String {
    format!("svc-{i:02}")
}

/// What the agents share with the driver: which services fail in site a now, and when the
/// reports about the current failure left.
struct Shared {
    failing: Vec<AtomicBool>,
    marks: Vec<Mutex<Marks>>,
    /// The policy's `failures_to_trip`: an agent counts as tripped on that many failing
    /// reports of a service in a row.
    trip: u32,
    sent: AtomicU64,
    /// Rounds skipped because the session's send buffer was full (the leader reads slowly).
    skipped_full: AtomicU64,
    session_failures: AtomicU64,
    open_sessions: AtomicU64,
}

/// Per service, for the sample in progress.
#[derive(Debug, Clone, Copy, Default)]
struct Marks {
    /// The first report carrying the failure handed to a session (T).
    first_sent: Option<Instant>,
    /// The latest report that was some agent's `trip`-th failing one in a row: from then on,
    /// every site-a agent has said enough for the policy to act.
    last_trip: Option<Instant>,
    tripped_agents: usize,
}

impl Shared {
    fn new(services: usize, trip: u32) -> Shared {
        Shared {
            failing: (0..services).map(|_| AtomicBool::new(false)).collect(),
            marks: (0..services)
                .map(|_| Mutex::new(Marks::default()))
                .collect(),
            trip,
            sent: AtomicU64::new(0),
            skipped_full: AtomicU64::new(0),
            session_failures: AtomicU64::new(0),
            open_sessions: AtomicU64::new(0),
        }
    }

    fn marks(&self, service: usize) -> std::sync::MutexGuard<'_, Marks> {
        self.marks[service]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An agent sent a report in which `service` fails, its `streak`-th in a row.
    fn failing_sent(&self, service: usize, streak: u32, at: Instant) {
        let mut m = self.marks(service);
        m.first_sent.get_or_insert(at);
        if streak == self.trip {
            m.last_trip = Some(m.last_trip.map_or(at, |t| t.max(at)));
            m.tripped_agents += 1;
        }
    }
}

/// One simulated agent: identity and the probes it reports every round.
struct AgentSpec {
    id: String,
    site: String,
    role: pb::AgentRole,
    bind: IpAddr,
    /// (service index, probe) of its own instances.
    instances: Vec<(usize, pb::InstanceProbe)>,
    /// (service index, probe) of instances in other sites.
    peers: Vec<(usize, pb::PeerProbe)>,
}

impl AgentSpec {
    /// This round's report, and the services whose failure in site a it carries.
    fn report(&self, seq: u64, shared: &Shared) -> (pb::AgentReport, Vec<usize>) {
        let mut failing_here = Vec::new();
        let instances = self
            .instances
            .iter()
            .map(|(svc, probe)| {
                let failing = self.site == "a" && shared.failing[*svc].load(Ordering::SeqCst);
                if failing && !failing_here.contains(svc) {
                    failing_here.push(*svc);
                }
                pb::InstanceProbe {
                    healthy: !failing,
                    error: if failing {
                        "readyz: 503".into()
                    } else {
                        String::new()
                    },
                    ..probe.clone()
                }
            })
            .collect();
        // A failing instance fails its cross-site probes too; a's other services still answer,
        // so the peer and the witness keep reaching site a.
        let peers = self
            .peers
            .iter()
            .map(|(svc, probe)| {
                let failing =
                    probe.target_site == "a" && shared.failing[*svc].load(Ordering::SeqCst);
                pb::PeerProbe {
                    reachable: !failing,
                    ..probe.clone()
                }
            })
            .collect();
        let report = pb::AgentReport {
            seq,
            observed_at_ms: now_ms(),
            instances,
            databases: Vec::new(),
            peers,
            ..Default::default()
        };
        (report, failing_here)
    }
}

fn agent_specs(args: &Args) -> Vec<AgentSpec> {
    let witness = args.witness_agents.min(args.agents);
    let site_agents = args.agents - witness;
    let n_a = site_agents.div_ceil(2);
    let n_b = site_agents - n_a;
    let id = |site: &str, i: usize| format!("sim-{site}-{i:04}");
    let instance = |agent: &str, j: usize| format!("{agent}-{j}");
    let mut specs = Vec::new();
    let sites: [(&str, usize); 3] = [("a", n_a), ("b", n_b), ("witness", witness)];
    for (site, count) in sites {
        for i in 0..count {
            let agent = id(site, i);
            // Spread the agents over their site's range: a site has many hosts.
            let host = u8::try_from(10 + i % 240).unwrap_or(10);
            let bind = IpAddr::V4(site_ip(site, host));
            let mut instances = Vec::new();
            let mut peers = Vec::new();
            let targets: Vec<(&str, usize)> = match site {
                "a" => vec![("b", n_b)],
                "b" => vec![("a", n_a)],
                _ => vec![("a", n_a), ("b", n_b)],
            };
            for svc in 0..args.services {
                let name = service_name(svc);
                if site != "witness" {
                    for j in 0..args.instances {
                        instances.push((
                            svc,
                            pb::InstanceProbe {
                                service: name.clone(),
                                instance: instance(&agent, j),
                                address: format!("{}:{}", bind, 20_000 + svc * 16 + j),
                                site: site.to_string(),
                                healthy: true,
                                latency_us: 350,
                                error: String::new(),
                                consecutive_failures: 0,
                            },
                        ));
                    }
                }
                for (target_site, n) in &targets {
                    if *n == 0 {
                        continue;
                    }
                    let target_agent = id(target_site, i % n);
                    peers.push((
                        svc,
                        pb::PeerProbe {
                            target_site: target_site.to_string(),
                            target: format!("{name}/{}", instance(&target_agent, 0)),
                            reachable: true,
                            latency_us: 900,
                            error: String::new(),
                        },
                    ));
                }
            }
            specs.push(AgentSpec {
                id: agent,
                site: site.to_string(),
                role: if site == "witness" {
                    pb::AgentRole::Witness
                } else {
                    pb::AgentRole::Site
                },
                bind,
                instances,
                peers,
            });
        }
    }
    specs
}

enum SessionEnd {
    Redirect(String),
    Failed(String),
}

/// Runs one agent for ever: session to the leader (following `NotLeader`), a report every
/// interval from `first_at` on; a broken session is reopened after a short backoff.
async fn run_agent(
    spec: AgentSpec,
    shared: Arc<Shared>,
    mut endpoint: String,
    interval: Duration,
    first_at: tokio::time::Instant,
) {
    let mut seq = 0u64;
    let mut streaks = vec![0u32; shared.failing.len()];
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = agent_session(
            &spec,
            &shared,
            &endpoint,
            interval,
            first_at,
            &mut seq,
            &mut streaks,
        );
        match session.await {
            SessionEnd::Redirect(leader) => {
                endpoint = leader;
                continue;
            }
            SessionEnd::Failed(why) => {
                shared.session_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(agent = %spec.id, "session ended: {why}");
            }
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn agent_session(
    spec: &AgentSpec,
    shared: &Shared,
    endpoint: &str,
    interval: Duration,
    first_at: tokio::time::Instant,
    seq: &mut u64,
    streaks: &mut [u32],
) -> SessionEnd {
    let channel = match invoker_api::client::channel_from(endpoint, Some(spec.bind)) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Failed(e.to_string()),
    };
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel)
        .max_decoding_message_size(1024 * 1024);
    // Room for a few rounds: a session that cannot take more is a leader that reads slowly,
    // and its rounds are skipped (counted) as the real agent's would be superseded.
    let (mut tx, rx) = futures::channel::mpsc::channel::<pb::AgentMessage>(4);
    let hello = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::AgentHello {
            agent_id: spec.id.clone(),
            site: spec.site.clone(),
            role: spec.role as i32,
            version: "bench-policy".into(),
            last_seq: *seq,
        })),
    };
    if tx.try_send(hello).is_err() {
        return SessionEnd::Failed("could not queue the hello".into());
    }
    let mut inbound = match client.session(rx).await {
        Ok(r) => r.into_inner(),
        Err(e) => return SessionEnd::Failed(format!("{:?}: {}", e.code(), e.message())),
    };
    match inbound.message().await {
        Ok(Some(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Accepted(_)),
        })) => {}
        Ok(Some(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::NotLeader(n)),
        })) if !n.leader_addr.is_empty() && n.leader_addr != endpoint => {
            return SessionEnd::Redirect(n.leader_addr)
        }
        Ok(_) => return SessionEnd::Failed("not accepted, and no leader named".into()),
        Err(e) => return SessionEnd::Failed(format!("{:?}: {}", e.code(), e.message())),
    }
    shared.open_sessions.fetch_add(1, Ordering::Relaxed);
    let start = first_at.max(tokio::time::Instant::now());
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            _ = ticker.tick() => {
                *seq += 1;
                let (report, failing) = spec.report(*seq, shared);
                let message = pb::AgentMessage { body: Some(pb::agent_message::Body::Report(report)) };
                let sent_at = Instant::now();
                match tx.try_send(message) {
                    Ok(()) => {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                        for (svc, streak) in streaks.iter_mut().enumerate() {
                            if failing.contains(&svc) {
                                *streak += 1;
                                shared.failing_sent(svc, *streak, sent_at);
                            } else {
                                *streak = 0;
                            }
                        }
                    }
                    Err(e) if e.is_full() => {
                        shared.skipped_full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break SessionEnd::Failed("the session closed".into()),
                }
            }
            answer = inbound.message() => match answer {
                Ok(Some(pb::ControllerMessage { body: Some(pb::controller_message::Body::NotLeader(n)) })) => {
                    break if n.leader_addr.is_empty() {
                        SessionEnd::Failed("the leader stepped down".into())
                    } else {
                        SessionEnd::Redirect(n.leader_addr)
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => break SessionEnd::Failed("the invoker closed the session".into()),
                Err(e) => break SessionEnd::Failed(format!("{:?}: {}", e.code(), e.message())),
            },
        }
    };
    shared.open_sessions.fetch_sub(1, Ordering::Relaxed);
    end
}

/// Site a's share of each service as the leader's routing watch shows it, with the instant
/// each change arrived here.
struct RoutingView {
    rx: mpsc::UnboundedReceiver<(String, u32, Instant)>,
    share_a: HashMap<String, (u32, Instant)>,
    changes: u64,
}

impl RoutingView {
    fn apply(&mut self, (service, a, at): (String, u32, Instant)) {
        let changed = self.share_a.get(&service).is_none_or(|(old, _)| *old != a);
        if changed {
            self.changes += 1;
            self.share_a.insert(service, (a, at));
        }
    }

    /// Takes in changes until `done` holds or `deadline` passes; false on timeout.
    async fn wait_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&RoutingView) -> bool,
    ) -> Result<bool> {
        while let Ok(event) = self.rx.try_recv() {
            self.apply(event);
        }
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Err(_) => return Ok(false),
                Ok(None) => bail!("the routing watch ended"),
                Ok(Some(event)) => self.apply(event),
            }
        }
        Ok(true)
    }

    fn share(&self, service: &str) -> Option<(u32, Instant)> {
        self.share_a.get(service).copied()
    }
}

/// Streams the leader's routing watch into `tx`; reconnects to whoever leads if it breaks.
async fn watch_routing(endpoints: Vec<String>, tx: mpsc::UnboundedSender<(String, u32, Instant)>) {
    loop {
        if let Ok(leader) =
            InvokerClient::wait_for_leader(&endpoints, Duration::from_secs(10)).await
        {
            let request = pb::RoutingWatchRequest {
                services: Vec::new(),
            };
            if let Ok(response) = leader.routing_watch().watch(request).await {
                let mut stream = response.into_inner();
                while let Some(Ok(update)) = stream.next().await {
                    let at = Instant::now();
                    if let Some(pb::routing_update::Update::Routing(table)) = update.update {
                        let a: u32 = table
                            .runs
                            .iter()
                            .filter(|r| r.site == "a")
                            .map(|r| r.count)
                            .sum();
                        if tx.send((table.service, a, at)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        tracing::warn!("routing watch broke; reconnecting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .with_context(|| format!("{path}: field {i} missing"))?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / USER_HZ)
}

fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("{path}: no VmRSS"))?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Samples of a metric family: labels and value.
fn family(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The leader's counters that matter here.
#[derive(Debug, Clone, Default)]
struct LeaderCounters {
    /// (site, result) → reports.
    reports: BTreeMap<(String, String), f64>,
    /// (decision, result) → decisions.
    decisions: BTreeMap<(String, String), f64>,
    sessions: f64,
}

async fn leader_counters(http: &reqwest::Client, metrics_addr: &str) -> Result<LeaderCounters> {
    let text = http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let pair = |labels: &BTreeMap<String, String>, a: &str, b: &str| {
        (
            labels.get(a).cloned().unwrap_or_default(),
            labels.get(b).cloned().unwrap_or_default(),
        )
    };
    let mut out = LeaderCounters {
        sessions: gauge(&text, "invoker_agent_sessions").unwrap_or(0.0),
        ..LeaderCounters::default()
    };
    for (labels, value) in family(&text, "invoker_agent_reports_total") {
        *out.reports
            .entry(pair(&labels, "site", "result"))
            .or_default() += value;
    }
    for (labels, value) in family(&text, "invoker_policy_decisions_total") {
        *out.decisions
            .entry(pair(&labels, "decision", "result"))
            .or_default() += value;
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
struct NodeLoad {
    name: String,
    role: String,
    pid: u32,
    cpu_pct_of_one_core: f64,
    rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ReportRate {
    site: String,
    result: String,
    per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Phase {
    what: String,
    secs: f64,
    nodes: Vec<NodeLoad>,
    simulator_cpu_pct_of_one_core: f64,
    reports_sent_per_sec: f64,
    rounds_skipped_send_buffer_full: u64,
    leader_reports_per_sec: Vec<ReportRate>,
    /// Valid reports the policy loop took.
    leader_accepted_per_sec: f64,
    /// Valid reports dropped because the policy loop's inbox was full.
    leader_dropped_per_sec: f64,
    /// What the policy saw (= accepted).
    leader_to_policy_per_sec: f64,
    session_failures: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Setup {
    agents: usize,
    agents_a: usize,
    agents_b: usize,
    agents_witness: usize,
    services: usize,
    instances_per_agent_per_service: usize,
    report_interval_ms: u64,
    probes_per_site_report: usize,
    report_bytes_site_agent: usize,
    failures_to_trip: u32,
    hold_down_ms: u64,
    stable_period_ms: u64,
    policy_tick_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    includes: String,
    samples: usize,
    timeouts: usize,
    /// Report interval x failures_to_trip: the last site-a agent's first failing report
    /// leaves up to one interval after the first agent's, and its `failures_to_trip`-th
    /// (failures_to_trip - 1) intervals after that.
    detection_floor_ms: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    min_ms: f64,
    all_ms: Vec<f64>,
    /// The leader's own part: from the report that completed the evidence (the last site-a
    /// agent's `failures_to_trip`-th failing report leaving) to the committed shift seen.
    after_evidence_includes: String,
    after_evidence_samples: usize,
    after_evidence_p50_ms: f64,
    after_evidence_p90_ms: f64,
    after_evidence_p99_ms: f64,
    after_evidence_max_ms: f64,
    /// Samples in which not every site-a agent had tripped when the shift was seen.
    incomplete_evidence_samples: usize,
    failback_includes: String,
    failback_samples: usize,
    failback_p50_ms: f64,
    failback_p99_ms: f64,
    unexpected_routing_changes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: String,
    note: String,
    setup: Setup,
    steady: Phase,
    during_samples: Phase,
    latency: Latency,
    leader_decisions: BTreeMap<String, f64>,
}

/// `a - b` in milliseconds, negative if `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        a.duration_since(b).as_secs_f64() * 1000.0
    } else {
        -(b.duration_since(a).as_secs_f64() * 1000.0)
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Measures CPU and report rates from `start` to the end of `work`.
struct PhaseProbe {
    what: String,
    started: Instant,
    cpu: Vec<f64>,
    self_cpu: f64,
    sent: u64,
    skipped: u64,
    failures: u64,
    counters: LeaderCounters,
}

struct Cluster {
    /// (name, role, pid)
    nodes: Vec<(String, String, u32)>,
    leader_metrics: String,
}

impl PhaseProbe {
    async fn start(
        what: &str,
        cluster: &Cluster,
        shared: &Shared,
        http: &reqwest::Client,
    ) -> Result<PhaseProbe> {
        Ok(PhaseProbe {
            what: what.into(),
            started: Instant::now(),
            cpu: cluster
                .nodes
                .iter()
                .map(|(_, _, pid)| cpu_secs(*pid))
                .collect::<Result<_>>()?,
            self_cpu: cpu_secs(std::process::id())?,
            sent: shared.sent.load(Ordering::Relaxed),
            skipped: shared.skipped_full.load(Ordering::Relaxed),
            failures: shared.session_failures.load(Ordering::Relaxed),
            counters: leader_counters(http, &cluster.leader_metrics).await?,
        })
    }

    async fn finish(
        self,
        cluster: &Cluster,
        shared: &Shared,
        http: &reqwest::Client,
    ) -> Result<Phase> {
        let secs = self.started.elapsed().as_secs_f64();
        let pct = |cpu: f64| 100.0 * cpu / secs;
        let mut nodes = Vec::new();
        for ((name, role, pid), before) in cluster.nodes.iter().zip(&self.cpu) {
            nodes.push(NodeLoad {
                name: name.clone(),
                role: role.clone(),
                pid: *pid,
                cpu_pct_of_one_core: pct(cpu_secs(*pid)? - before),
                rss_mib: rss_mib(*pid)?,
            });
        }
        let counters = leader_counters(http, &cluster.leader_metrics).await?;
        let leader_reports_per_sec: Vec<ReportRate> = counters
            .reports
            .iter()
            .map(|((site, result), v)| ReportRate {
                site: site.clone(),
                result: result.clone(),
                per_sec: (v - self
                    .counters
                    .reports
                    .get(&(site.clone(), result.clone()))
                    .unwrap_or(&0.0))
                    / secs,
            })
            .filter(|r| r.per_sec > 0.0)
            .collect();
        let rate = |result: &str| -> f64 {
            leader_reports_per_sec
                .iter()
                .filter(|r| r.result == result)
                // fold from +0.0: an empty f64 `sum()` is -0.0, which prints as "-0.0".
                .fold(0.0, |sum, r| sum + r.per_sec)
        };
        let leader_accepted_per_sec = rate("accepted");
        let leader_dropped_per_sec = rate("dropped");
        Ok(Phase {
            what: self.what,
            secs,
            nodes,
            simulator_cpu_pct_of_one_core: pct(cpu_secs(std::process::id())? - self.self_cpu),
            reports_sent_per_sec: (shared.sent.load(Ordering::Relaxed) - self.sent) as f64 / secs,
            rounds_skipped_send_buffer_full: shared.skipped_full.load(Ordering::Relaxed)
                - self.skipped,
            leader_reports_per_sec,
            leader_accepted_per_sec,
            leader_dropped_per_sec,
            // The leader counts a valid report `accepted` when the policy loop took it, `dropped`
            // when its inbox was full.
            leader_to_policy_per_sec: leader_accepted_per_sec,
            session_failures: shared.session_failures.load(Ordering::Relaxed) - self.failures,
        })
    }
}

fn topology(services: usize) -> Topology {
    let even = BTreeMap::from([("a".to_string(), 50), ("b".to_string(), 50)]);
    Topology {
        sites: drills::lab::lab_sites(),
        services: (0..services)
            .map(|i| ServiceSpec {
                name: service_name(i),
                class: ServiceClass::Stateless,
                routing: even.clone(),
                writer: None,
            })
            .collect(),
    }
}

/// The invokers' `[policy]` table: every service probed at the agents' interval, with a short
/// hold-down and automatic failback so that rounds can follow each other.
fn policy_table(args: &Args) -> Result<toml::Table> {
    let mut services = toml::Table::new();
    for i in 0..args.services {
        let text = format!(
            "probe_interval_ms = {}\nfailures_to_trip = {}\nhold_down_ms = {}\nfailback = {{ automatic = {{ stable_period_ms = {} }} }}\n",
            args.report_interval_ms, args.failures_to_trip, args.hold_down_ms, args.stable_period_ms
        );
        services.insert(service_name(i), toml::Value::Table(toml::from_str(&text)?));
    }
    let mut policy = toml::Table::new();
    policy.insert("services".into(), toml::Value::Table(services));
    Ok(policy)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _guard = telemetry::init("bench-policy", "bench")?;
    if args.services == 0 || args.agents < args.witness_agents + 2 {
        bail!("need at least one service and one agent in each of a and b");
    }
    if args.report_interval_ms == 0 || args.failures_to_trip == 0 {
        bail!("--report-interval-ms and --failures-to-trip must be above 0");
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("bench-policy-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    eprintln!("machine: {}; dir {}", machine(), dir.display());

    let mut options = LabOptions::invokers_only(dir.join("lab"));
    options.apply_topology = false;
    options.invoker_policy = policy_table(&args)?;
    let lab = Lab::start(options).await?;
    let result = run(&args, &lab).await;
    lab.down().await?;
    let report = result?;
    print_table(&report);
    if let Some(parent) = args.json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

async fn run(args: &Args, lab: &Lab) -> Result<Report> {
    let endpoints = lab.invoker_endpoints();
    let leader = InvokerClient::wait_for_leader(&endpoints, Duration::from_secs(30)).await?;
    let topo = topology(args.services);
    topo.validate()?;
    leader
        .admin()
        .apply_topology(pb::ApplyTopologyRequest {
            topology: Some(invoker_api::convert::topology_to_pb(&topo)),
            actor: "bench".into(),
            reason: "bench-policy topology".into(),
        })
        .await
        .context("applying the topology")?;
    let (leader_id, leader_name) = lab.invoker_leader(Duration::from_secs(10)).await?;
    let mut nodes = Vec::new();
    let mut leader_metrics = String::new();
    for p in &lab.describe().processes {
        let role = if p.node_id == Some(leader_id) {
            leader_metrics = p.listen.get("metrics").cloned().unwrap_or_default();
            "leader"
        } else {
            "follower"
        };
        nodes.push((p.name.clone(), role.to_string(), p.pid));
    }
    // Leader first in every table.
    nodes.sort_by_key(|(_, role, _)| role != "leader");
    let cluster = Cluster {
        nodes,
        leader_metrics,
    };
    eprintln!("leader {leader_name} (pid {})", cluster.nodes[0].2);

    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch_routing(endpoints.clone(), watch_tx));
    let mut view = RoutingView {
        rx: watch_rx,
        share_a: HashMap::new(),
        changes: 0,
    };
    let names: Vec<String> = (0..args.services).map(service_name).collect();
    let all_even = |v: &RoutingView| {
        names
            .iter()
            .all(|s| v.share(s).is_some_and(|(a, _)| a == HALF))
    };
    if !view
        .wait_until(Instant::now() + Duration::from_secs(10), &all_even)
        .await?
    {
        bail!("the routing watch did not show every service at 50/50");
    }

    let specs = agent_specs(args);
    let setup = setup_of(args, &specs);
    let shared = Arc::new(Shared::new(args.services, args.failures_to_trip));
    let interval = Duration::from_millis(args.report_interval_ms);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut agents = Vec::new();
    for spec in specs {
        let phase = Duration::from_micros(rand::rng().random_range(0..interval.as_micros() as u64));
        agents.push(tokio::spawn(run_agent(
            spec,
            shared.clone(),
            leader.endpoint().to_string(),
            interval,
            t0 + phase,
        )));
    }
    let result = measure(args, &cluster, &shared, &mut view, &names, setup).await;
    for agent in agents {
        agent.abort();
    }
    watcher.abort();
    let mut report = result?;
    // The per-node figures name roles as they were at the start.
    let (now_id, now_name) = lab.invoker_leader(Duration::from_secs(10)).await?;
    if now_id != leader_id {
        eprintln!("warning: the leader changed during the run ({leader_name} -> {now_name})");
        report.note.push_str(&format!(
            "; WARNING: the leader changed during the run ({leader_name} -> {now_name}), so the roles in the node tables are those at the start"
        ));
    }
    Ok(report)
}

fn setup_of(args: &Args, specs: &[AgentSpec]) -> Setup {
    let count = |site: &str| specs.iter().filter(|s| s.site == site).count();
    let site_agent = specs.iter().find(|s| s.site == "a");
    let (probes, bytes) = site_agent.map_or((0, 0), |s| {
        let (report, _) = s.report(1, &Shared::new(args.services, args.failures_to_trip));
        (s.instances.len() + s.peers.len(), report.encoded_len())
    });
    Setup {
        agents: specs.len(),
        agents_a: count("a"),
        agents_b: count("b"),
        agents_witness: count("witness"),
        services: args.services,
        instances_per_agent_per_service: args.instances,
        report_interval_ms: args.report_interval_ms,
        probes_per_site_report: probes,
        report_bytes_site_agent: bytes,
        failures_to_trip: args.failures_to_trip,
        hold_down_ms: args.hold_down_ms,
        stable_period_ms: args.stable_period_ms,
        policy_tick_ms: POLICY_TICK_MS,
    }
}

async fn measure(
    args: &Args,
    cluster: &Cluster,
    shared: &Arc<Shared>,
    view: &mut RoutingView,
    names: &[String],
    setup: Setup,
) -> Result<Report> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let interval = Duration::from_millis(args.report_interval_ms);

    // Every session open on the leader, then settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = leader_counters(&http, &cluster.leader_metrics).await?;
        if c.sessions as usize >= setup.agents {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agent sessions open on the leader after 60 s ({} open here)",
                c.sessions,
                setup.agents,
                shared.open_sessions.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} sessions open; settling {} s",
        setup.agents, args.settle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let changes_before = view.changes;

    eprintln!("steady window: {} s", args.window_secs);
    let probe = PhaseProbe::start("steady, no faults", cluster, shared, &http).await?;
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let steady = probe.finish(cluster, shared, &http).await?;
    // Drain what arrived meanwhile: nothing should have moved.
    view.wait_until(Instant::now(), |_| true).await?;
    let steady_changes = view.changes - changes_before;
    let changes_before = view.changes;

    let probe = PhaseProbe::start("while taking samples", cluster, shared, &http).await?;
    let mut latencies = Vec::new();
    let mut failbacks: Vec<f64> = Vec::new();
    let mut restored_at: HashMap<usize, Instant> = HashMap::new();
    let mut timeouts = 0;
    let mut after_trip: Vec<f64> = Vec::new();
    let mut incomplete_trips = 0usize;
    let timeout = Duration::from_secs(args.sample_timeout_secs);
    let mut round = 0usize;
    while latencies.len() + timeouts < args.samples {
        let svc = round % args.services;
        round += 1;
        let name = &names[svc];
        // Back at 50/50 and out of its hold-down before it fails again.
        let hold = Duration::from_millis(args.hold_down_ms + 200);
        let ready = view
            .wait_until(Instant::now() + timeout * 2, |v| {
                v.share(name)
                    .is_some_and(|(a, at)| a == HALF && at.elapsed() >= hold)
            })
            .await?;
        if let Some(restored) = restored_at.remove(&svc) {
            if let Some((HALF, at)) = view.share(name).filter(|(_, at)| *at > restored) {
                failbacks.push(at.duration_since(restored).as_secs_f64() * 1000.0);
            }
        }
        if !ready {
            bail!("{name} did not fail back to 50/50 within {:?}", timeout * 2);
        }
        // Start at a random point of the report cycle.
        let pause = rand::rng().random_range(0..interval.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        *shared.marks(svc) = Marks::default();
        shared.failing[svc].store(true, Ordering::SeqCst);
        let moved = view
            .wait_until(Instant::now() + timeout, |v| {
                v.share(name).is_some_and(|(a, _)| a == 0)
            })
            .await?;
        shared.failing[svc].store(false, Ordering::SeqCst);
        restored_at.insert(svc, Instant::now());
        let marks = *shared.marks(svc);
        match (moved, marks.first_sent, view.share(name)) {
            (true, Some(first), Some((_, seen))) => {
                let ms = seen.saturating_duration_since(first).as_secs_f64() * 1000.0;
                // Signed: were the shift seen before the last agent tripped, that would show.
                let leader_ms = marks
                    .last_trip
                    .filter(|_| marks.tripped_agents == setup.agents_a)
                    .map(|t| signed_ms(seen, t));
                eprintln!(
                    "sample {:>3}: {name} failing in a -> shift committed {ms:.0} ms ({} of {} a-agents tripped; last trip -> committed {})",
                    latencies.len(),
                    marks.tripped_agents,
                    setup.agents_a,
                    leader_ms.map_or("n/a".into(), |v| format!("{v:.0} ms")),
                );
                latencies.push(ms);
                match leader_ms {
                    Some(v) => after_trip.push(v),
                    None => incomplete_trips += 1,
                }
            }
            _ => {
                timeouts += 1;
                eprintln!("sample: {name} not shifted within {timeout:?} (counted as a timeout)");
            }
        }
    }
    // The last services' failbacks.
    for (svc, restored) in restored_at {
        let name = &names[svc];
        if view
            .wait_until(Instant::now() + timeout, |v| {
                v.share(name).is_some_and(|(a, _)| a == HALF)
            })
            .await?
        {
            if let Some((_, at)) = view.share(name).filter(|(_, at)| *at > restored) {
                failbacks.push(at.duration_since(restored).as_secs_f64() * 1000.0);
            }
        }
    }
    let during = probe.finish(cluster, shared, &http).await?;
    // Each sample makes two changes (shift, failback); anything beyond is a surprise.
    let expected = 2 * (latencies.len() + timeouts) as u64;
    let unexpected = steady_changes + (view.changes - changes_before).saturating_sub(expected);

    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let mut fb = failbacks.clone();
    fb.sort_by(f64::total_cmp);
    let mut tail = after_trip;
    tail.sort_by(f64::total_cmp);
    let floor = args.report_interval_ms * u64::from(args.failures_to_trip);
    let latency = Latency {
        includes: format!(
            "from the first report carrying the failure leaving a simulated agent (T), until the leader's RoutingWatch stream shows the service's buckets all in b: \
             the report rounds until every site-a agent has sent {} failing reports in a row (up to the detection floor, {floor} ms: agents are spread over the interval), \
             then transport, the leader's checks, the policy inbox, up to one policy tick ({POLICY_TICK_MS} ms), the raft commit of SetRouting (quorum fsync), apply, and the watch stream",
            args.failures_to_trip
        ),
        after_evidence_includes: "from the last site-a agent's tripping report leaving the simulator to the shift seen on the leader's watch: transport, checks, inbox, policy tick wait (up to 100 ms), decision, raft commit, apply, watch".into(),
        after_evidence_samples: tail.len(),
        after_evidence_p50_ms: percentile(&tail, 0.50),
        after_evidence_p90_ms: percentile(&tail, 0.90),
        after_evidence_p99_ms: percentile(&tail, 0.99),
        after_evidence_max_ms: tail.last().copied().unwrap_or(0.0),
        incomplete_evidence_samples: incomplete_trips,
        samples: latencies.len(),
        timeouts,
        detection_floor_ms: floor,
        p50_ms: percentile(&sorted, 0.50),
        p90_ms: percentile(&sorted, 0.90),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        min_ms: sorted.first().copied().unwrap_or(0.0),
        all_ms: latencies,
        failback_includes: format!(
            "from the driver marking the service healthy again until the failback is seen: successes_to_clear report rounds, \
             the stable period ({} ms) and the commit",
            args.stable_period_ms
        ),
        failback_samples: fb.len(),
        failback_p50_ms: percentile(&fb, 0.50),
        failback_p99_ms: percentile(&fb, 0.99),
        unexpected_routing_changes: unexpected,
    };
    let decisions = leader_counters(&http, &cluster.leader_metrics)
        .await?
        .decisions
        .into_iter()
        .map(|((d, r), v)| (format!("{d}/{r}"), v))
        .collect();
    Ok(Report {
        machine: machine(),
        note: "one machine: the three invoker nodes and the agent simulator share its CPUs; loopback network".into(),
        setup,
        steady,
        during_samples: during,
        latency,
        leader_decisions: decisions,
    })
}

fn print_phase(p: &Phase) {
    println!("{} ({:.0} s):", p.what, p.secs);
    println!(
        "  {:<10} {:<9} {:>7} {:>10} {:>9}",
        "node", "role", "pid", "cpu % core", "rss MiB"
    );
    for n in &p.nodes {
        println!(
            "  {:<10} {:<9} {:>7} {:>10.1} {:>9.1}",
            n.name, n.role, n.pid, n.cpu_pct_of_one_core, n.rss_mib
        );
    }
    println!(
        "  simulator cpu: {:.1} % of one core",
        p.simulator_cpu_pct_of_one_core
    );
    println!(
        "  reports sent {:.0}/s; leader accepted {:.0}/s, dropped (policy inbox full) {:.1}/s, to the policy {:.0}/s; rounds skipped (send buffer full) {}; session failures {}",
        p.reports_sent_per_sec,
        p.leader_accepted_per_sec,
        p.leader_dropped_per_sec,
        p.leader_to_policy_per_sec,
        p.rounds_skipped_send_buffer_full,
        p.session_failures
    );
    for r in &p.leader_reports_per_sec {
        println!(
            "    leader: site {:<8} {:<12} {:>8.1}/s",
            r.site, r.result, r.per_sec
        );
    }
}

fn print_table(r: &Report) {
    let s = &r.setup;
    println!("machine: {} ({})", r.machine, r.note);
    println!(
        "agents {} (a {}, b {}, witness {}), services {}, {} instance(s) per agent per service, every {} ms; {} probes / {} bytes per site-agent report",
        s.agents, s.agents_a, s.agents_b, s.agents_witness, s.services, s.instances_per_agent_per_service,
        s.report_interval_ms, s.probes_per_site_report, s.report_bytes_site_agent
    );
    print_phase(&r.steady);
    print_phase(&r.during_samples);
    let l = &r.latency;
    println!(
        "observation -> committed decision over {} samples ({} timeouts): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms (min {:.0} ms)",
        l.samples, l.timeouts, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.min_ms
    );
    println!(
        "  detection floor (report interval x failures to trip): {} ms; includes {}",
        l.detection_floor_ms, l.includes
    );
    println!(
        "  of which the leader's part (last a-agent's tripping report sent -> committed, {} samples, {} incomplete): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        l.after_evidence_samples,
        l.incomplete_evidence_samples,
        l.after_evidence_p50_ms,
        l.after_evidence_p90_ms,
        l.after_evidence_p99_ms,
        l.after_evidence_max_ms
    );
    println!(
        "healthy again -> failback committed over {} samples: p50 {:.0} ms, p99 {:.0} ms",
        l.failback_samples, l.failback_p50_ms, l.failback_p99_ms
    );
    println!(
        "unexpected routing changes: {}",
        l.unexpected_routing_changes
    );
    for (k, v) in &r.leader_decisions {
        println!("  leader decisions {k}: {v}");
    }
}
