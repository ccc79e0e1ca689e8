use std::collections::{BTreeMap, BTreeSet};

use invoker_domain::{
    normalize_runs, runs_len, BucketRun, DataLossEstimate, Evidence, RoutingTable, ServiceClass,
    BUCKETS,
};
use serde::{Deserialize, Serialize};

use crate::classify::{evidence, ms_i64, Classification, SiteAssessment};
use crate::config::{Failback, PolicyConfig};
use crate::observation::{AgentReport, DatabaseRole, EdgeReport, Observation, Observer};
use crate::PolicyError;

/// What the invoker's replicated state holds now, as far as the policy needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// Per service. Services the policy is not configured for are ignored.
    pub routing: BTreeMap<String, RoutingTable>,
    /// Per strong service.
    pub writers: BTreeMap<String, CurrentWriter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentWriter {
    pub site: String,
    pub epoch: u64,
    /// The writer's WAL position and ledger sequence as its site reported them with its
    /// last lease renewal (replicated: a new leader has them before it hears any agent), and
    /// when (ms; 0: unknown). The data-loss estimate falls back on them.
    #[serde(default)]
    pub primary_lsn: u64,
    #[serde(default)]
    pub ledger_sequence: u64,
    #[serde(default)]
    pub positions_at_ms: i64,
}

/// One thing the policy wants done (or, if `dry_run`, would have wanted done), with the
/// observations that justify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub service: String,
    pub action: Action,
    /// Produced while paused: to be shown and recorded, never acted upon.
    pub dry_run: bool,
    pub decided_at_ms: u64,
    /// The class of the site the action is about (the one left, or the one returned to).
    pub classification: Classification,
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Moves every bucket of a stateless service served by `from_site` to `to_site`.
    ShiftBuckets {
        from_site: String,
        to_site: String,
        new_runs: Vec<BucketRun>,
    },
    /// The site taking over cannot absorb the estimated load; goes with a shift.
    EnableThrottle {
        site: String,
        max_rps: u64,
        estimated_rps: u64,
    },
    /// Lifts a throttle set by a shift that a failback undoes.
    DisableThrottle { site: String },
    /// A strong service's writer should move: a human approves, never the policy.
    ProposeFailover {
        from_site: String,
        to_site: String,
        writer_epoch: u64,
        data_loss: DataLossEstimate,
    },
    /// Restores the routing from before the shift, bringing `site` back.
    Failback {
        site: String,
        new_runs: Vec<BucketRun>,
    },
    /// A guardrail blocked an action: an alert for a human.
    Refused { reason: String },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::ShiftBuckets { .. } => "shift_buckets",
            Action::EnableThrottle { .. } => "enable_throttle",
            Action::DisableThrottle { .. } => "disable_throttle",
            Action::ProposeFailover { .. } => "propose_failover",
            Action::Failback { .. } => "failback",
            Action::Refused { .. } => "refused",
        }
    }

    /// Identifies a notice across ticks; leaves out what changes from tick to tick while the
    /// condition holds (evidence, database positions).
    fn signature(&self) -> String {
        match self {
            Action::ShiftBuckets {
                from_site, to_site, ..
            }
            | Action::ProposeFailover {
                from_site, to_site, ..
            } => format!("{} {from_site}->{to_site}", self.kind()),
            Action::EnableThrottle { site, .. }
            | Action::DisableThrottle { site }
            | Action::Failback { site, .. } => format!("{} {site}", self.kind()),
            Action::Refused { reason } => format!("refused {reason}"),
        }
    }
}

impl Decision {
    /// `shift_buckets`, or `would_shift_buckets` for a dry run.
    pub fn label(&self) -> String {
        let would = if self.dry_run { "would_" } else { "" };
        format!("{would}{}", self.action.kind())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickOutput {
    pub now_ms: u64,
    pub paused: bool,
    pub sites: BTreeMap<String, SiteAssessment>,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Target {
    Instance(String),
    Database,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ObserverState {
    last_seq: u64,
    pub(crate) last_at_ms: u64,
    /// Start of the current run of reports without a silence in between.
    pub(crate) since_ms: u64,
}

/// One observer's reachability verdict on one site, from its latest report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) reachable: bool,
    pub(crate) since_ms: u64,
    pub(crate) at_ms: u64,
    pub(crate) ok: usize,
    pub(crate) total: usize,
    /// Service instances probed in the site, and how many answered: a site whose database
    /// answers but whose instances all fail has lost its application tier.
    pub(crate) instances_ok: usize,
    pub(crate) instances_total: usize,
}

/// Consecutive results of one local probe target, with hysteresis: down after
/// `failures_to_trip` failures in a row, up again after `successes_to_clear` successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Streak {
    pub(crate) up: bool,
    pub(crate) last_ok: bool,
    pub(crate) run: u32,
    pub(crate) last_probed_at_ms: u64,
    pub(crate) seen_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DbSeen {
    pub(crate) probe: crate::observation::DatabaseProbe,
    pub(crate) observer: Observer,
    pub(crate) at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EdgeSeen {
    pub(crate) sample: crate::observation::EdgeSample,
    pub(crate) at_ms: u64,
    pub(crate) above_since_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ShiftRecord {
    from_site: String,
    to_site: String,
    restore_runs: Vec<BucketRun>,
    shifted_runs: Vec<BucketRun>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ServiceState {
    /// The last automatic change (emitted, or applied if later): hold-down runs from here.
    last_change_ms: Option<u64>,
    shift: Option<ShiftRecord>,
    throttled: BTreeSet<String>,
    /// Notices already emitted while their condition holds, so that each is said once and
    /// the raft log does not fill with repeats.
    said: BTreeSet<String>,
}

enum Candidate {
    Shift {
        shift: Box<Decision>,
        throttle: Option<Box<Decision>>,
        record: ShiftRecord,
    },
    Failback(Vec<Decision>),
    Notice(Decision),
}

/// The failover policy's state machine. See the crate documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub(crate) config: PolicyConfig,
    paused: bool,
    last_tick_ms: Option<u64>,
    pub(crate) observers: BTreeMap<Observer, ObserverState>,
    pub(crate) views: BTreeMap<(Observer, String), View>,
    /// The local agents' probes, per (site, service, target).
    pub(crate) probes: BTreeMap<(String, String, Target), Streak>,
    /// Last reachable database probe per (site, service), from any observer.
    pub(crate) databases: BTreeMap<(String, String), DbSeen>,
    /// When a remote observer (not the site's own agent) last failed to reach the site's
    /// database, per (site, service); cleared when a remote observer reaches it.
    pub(crate) databases_lost: BTreeMap<(String, String), u64>,
    pub(crate) edge: BTreeMap<(String, String), EdgeSeen>,
    healthy_since_ms: BTreeMap<(String, String), u64>,
    services: BTreeMap<String, ServiceState>,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Result<Policy, PolicyError> {
        config.validate()?;
        Ok(Policy {
            config,
            paused: false,
            last_tick_ms: None,
            observers: BTreeMap::new(),
            views: BTreeMap::new(),
            probes: BTreeMap::new(),
            databases: BTreeMap::new(),
            databases_lost: BTreeMap::new(),
            edge: BTreeMap::new(),
            healthy_since_ms: BTreeMap::new(),
            services: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Dry-run: decisions keep coming, marked `dry_run`, and nothing counts as acted upon.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.paused = false;
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Takes in one report. A refused report leaves the state unchanged.
    pub fn observe(&mut self, observation: &Observation) -> Result<(), PolicyError> {
        self.check_observation(observation)?;
        let observer = observation.observer();
        let at_ms = observation.received_at_ms();
        let silence_ms = self.config.effective_silence_ms();
        let since_ms = match self.observers.get(&observer) {
            Some(o) if at_ms.saturating_sub(o.last_at_ms) <= silence_ms => o.since_ms,
            _ => at_ms,
        };
        self.observers.insert(
            observer.clone(),
            ObserverState {
                last_seq: observation.seq(),
                last_at_ms: at_ms,
                since_ms,
            },
        );
        match observation {
            Observation::Agent(report) => self.apply_agent(&observer, report),
            Observation::Edge(report) => self.apply_edge(report),
        }
        Ok(())
    }

    fn check_observation(&self, observation: &Observation) -> Result<(), PolicyError> {
        let observer = observation.observer();
        let name = observer.to_string();
        if let Observer::Agent(site) = &observer {
            if !self.config.is_site(site) && *site != self.config.witness {
                return Err(PolicyError::UnknownObserver(name));
            }
        }
        if let Some(last) = self.observers.get(&observer) {
            if observation.seq() <= last.last_seq {
                return Err(PolicyError::StaleSequence {
                    observer: name,
                    seq: observation.seq(),
                    last_seq: last.last_seq,
                });
            }
            if observation.received_at_ms() < last.last_at_ms {
                return Err(PolicyError::OutOfOrder {
                    observer: name,
                    received_at_ms: observation.received_at_ms(),
                    last_ms: last.last_at_ms,
                });
            }
        }
        let invalid = |reason: String| PolicyError::InvalidObservation {
            observer: name.clone(),
            reason,
        };
        let check_site = |site: &str| {
            if *site == self.config.witness {
                Err(invalid(format!(
                    "{site:?} is the witness: it runs no services"
                )))
            } else if !self.config.is_site(site) {
                Err(PolicyError::UnknownSite {
                    observer: name.clone(),
                    site: site.to_string(),
                })
            } else {
                Ok(())
            }
        };
        let check_service = |service: &str| {
            self.config
                .services
                .get(service)
                .ok_or_else(|| PolicyError::UnknownService {
                    observer: name.clone(),
                    service: service.to_string(),
                })
        };
        match observation {
            Observation::Agent(report) => {
                let mut sites = BTreeSet::new();
                for target in &report.targets {
                    check_site(&target.site)?;
                    if !sites.insert(&target.site) {
                        return Err(invalid(format!("site {:?} appears twice", target.site)));
                    }
                    let mut instances = BTreeSet::new();
                    for p in &target.instances {
                        check_service(&p.service)?;
                        if p.instance.is_empty() || !instances.insert((&p.service, &p.instance)) {
                            return Err(invalid(format!(
                                "instance {:?} of {} in {} is empty or appears twice",
                                p.instance, p.service, target.site
                            )));
                        }
                    }
                    let mut databases = BTreeSet::new();
                    for d in &target.databases {
                        if check_service(&d.service)?.class != ServiceClass::Strong {
                            return Err(invalid(format!(
                                "database probe for {}, which is not a strong service",
                                d.service
                            )));
                        }
                        if !databases.insert(&d.service) {
                            return Err(invalid(format!(
                                "database of {} in {} appears twice",
                                d.service, target.site
                            )));
                        }
                    }
                }
            }
            Observation::Edge(report) => {
                let mut seen = BTreeSet::new();
                for s in &report.samples {
                    check_site(&s.site)?;
                    check_service(&s.service)?;
                    if s.error_rps > s.request_rps || !seen.insert((&s.site, &s.service)) {
                        return Err(invalid(format!(
                            "sample for {} at {} has more errors than requests or appears twice",
                            s.service, s.site
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_agent(&mut self, observer: &Observer, report: &AgentReport) {
        let at_ms = report.received_at_ms;
        for target in &report.targets {
            let total = target.instances.len() + target.databases.len();
            if total > 0 {
                let ok = target.instances.iter().filter(|p| p.ok).count()
                    + target
                        .databases
                        .iter()
                        .filter(|d| d.role != DatabaseRole::Unreachable)
                        .count();
                let reachable = ok > 0;
                let key = (observer.clone(), target.site.clone());
                let since_ms = match self.views.get(&key) {
                    Some(v) if v.reachable == reachable => v.since_ms,
                    _ => at_ms,
                };
                let view = View {
                    reachable,
                    since_ms,
                    at_ms,
                    ok,
                    total,
                    instances_ok: target.instances.iter().filter(|p| p.ok).count(),
                    instances_total: target.instances.len(),
                };
                self.views.insert(key, view);
            }
            // Only a site's own agent judges its services: cross-site probes also fail when
            // the path between sites does, so they serve for reachability only.
            let local = report.agent_site == target.site;
            for p in target.instances.iter().filter(|_| local) {
                let key = (
                    target.site.clone(),
                    p.service.clone(),
                    Target::Instance(p.instance.clone()),
                );
                self.record_probe(key, p.ok, p.probed_at_ms, at_ms);
            }
            for d in &target.databases {
                let reachable = d.role != DatabaseRole::Unreachable;
                if local {
                    let key = (target.site.clone(), d.service.clone(), Target::Database);
                    self.record_probe(key, reachable, d.probed_at_ms, at_ms);
                }
                if !local {
                    let key = (target.site.clone(), d.service.clone());
                    if reachable {
                        self.databases_lost.remove(&key);
                    } else {
                        self.databases_lost.insert(key, at_ms);
                    }
                }
                if reachable {
                    let seen = DbSeen {
                        probe: d.clone(),
                        observer: observer.clone(),
                        at_ms,
                    };
                    self.databases
                        .insert((target.site.clone(), d.service.clone()), seen);
                }
            }
        }
    }

    fn record_probe(
        &mut self,
        key: (String, String, Target),
        ok: bool,
        probed_at_ms: u64,
        seen_at_ms: u64,
    ) {
        let Some(cfg) = self.config.services.get(&key.1) else {
            return;
        };
        let (trip, clear) = (cfg.failures_to_trip, cfg.successes_to_clear);
        let streak = self.probes.entry(key).or_insert(Streak {
            up: true,
            last_ok: true,
            run: 0,
            last_probed_at_ms: 0,
            seen_at_ms,
        });
        streak.seen_at_ms = seen_at_ms;
        // The same probe may ride in two reports; counting it twice would trip early.
        if streak.run > 0 && probed_at_ms <= streak.last_probed_at_ms {
            return;
        }
        streak.run = if streak.run > 0 && streak.last_ok == ok {
            streak.run.saturating_add(1)
        } else {
            1
        };
        streak.last_ok = ok;
        streak.last_probed_at_ms = probed_at_ms;
        if streak.up && !ok && streak.run >= trip {
            streak.up = false;
        } else if !streak.up && ok && streak.run >= clear {
            streak.up = true;
        }
    }

    fn apply_edge(&mut self, report: &EdgeReport) {
        for s in &report.samples {
            let above = self.error_rate_above(s.error_rps, s.request_rps);
            let enough = s.request_rps >= self.config.edge_min_request_rps;
            let seen = self
                .edge
                .entry((s.site.clone(), s.service.clone()))
                .or_insert(EdgeSeen {
                    sample: s.clone(),
                    at_ms: report.received_at_ms,
                    above_since_ms: None,
                });
            seen.sample = s.clone();
            seen.at_ms = report.received_at_ms;
            // Too little traffic says nothing either way, so the verdict stands: a site
            // drained for gray failure stays gray until an operator fails it back.
            if enough {
                seen.above_since_ms = if above {
                    Some(seen.above_since_ms.unwrap_or(report.received_at_ms))
                } else {
                    None
                };
            }
        }
    }

    /// Classifies, then decides. A refused call leaves the state unchanged.
    pub fn tick(&mut self, now_ms: u64, current: &Current) -> Result<TickOutput, PolicyError> {
        if let Some(last_ms) = self.last_tick_ms.filter(|last| now_ms < *last) {
            return Err(PolicyError::TimeWentBackwards { now_ms, last_ms });
        }
        self.check_current(current)?;
        self.last_tick_ms = Some(now_ms);
        let sites = self.assess(now_ms);
        for (site, assessment) in &sites {
            for (service, class) in &assessment.services {
                let key = (site.clone(), service.clone());
                if *class == Classification::Healthy {
                    self.healthy_since_ms.entry(key.clone()).or_insert(now_ms);
                } else {
                    self.healthy_since_ms.remove(&key);
                }
                // A known failure explains the edge's errors; were they still counted once the
                // site is drained (no traffic, no new verdict), it would stay gray for good.
                if *class != Classification::Healthy && *class != Classification::GrayFailure {
                    if let Some(seen) = self.edge.get_mut(&key) {
                        seen.above_since_ms = None;
                    }
                }
            }
        }
        let mut decisions = Vec::new();
        let services: Vec<String> = self.config.services.keys().cloned().collect();
        for service in &services {
            let candidates = self.candidates(service, now_ms, current, &sites);
            self.gate(service, candidates, now_ms, &mut decisions);
        }
        Ok(TickOutput {
            now_ms,
            paused: self.paused,
            sites,
            decisions,
        })
    }

    fn check_current(&self, current: &Current) -> Result<(), PolicyError> {
        let managed = |service: &String| self.config.services.contains_key(service);
        for (service, table) in current.routing.iter().filter(|(s, _)| managed(s)) {
            let total = runs_len(&table.runs);
            if total != BUCKETS as u64 {
                return Err(PolicyError::InvalidCurrent(format!(
                    "routing of {service} covers {total} buckets, not {BUCKETS}"
                )));
            }
            if let Some(run) = table.runs.iter().find(|r| !self.config.is_site(&r.site)) {
                return Err(PolicyError::InvalidCurrent(format!(
                    "routing of {service} names {:?}, which is not a serving site",
                    run.site
                )));
            }
        }
        for (service, writer) in current.writers.iter().filter(|(s, _)| managed(s)) {
            if !self.config.is_site(&writer.site) {
                return Err(PolicyError::InvalidCurrent(format!(
                    "writer of {service} is in {:?}, which is not a serving site",
                    writer.site
                )));
            }
        }
        Ok(())
    }

    fn decision(
        &self,
        service: &str,
        action: Action,
        classification: Classification,
        now_ms: u64,
        evidence: Vec<Evidence>,
    ) -> Decision {
        Decision {
            service: service.to_string(),
            action,
            dry_run: false,
            decided_at_ms: now_ms,
            classification,
            evidence,
        }
    }

    fn evidence_for(
        &self,
        sites: &BTreeMap<String, SiteAssessment>,
        service: &str,
        from: &str,
        to: &str,
        now_ms: u64,
    ) -> Vec<Evidence> {
        let mut out = Vec::new();
        for site in [from, to] {
            if let Some(a) = sites.get(site) {
                out.extend(a.evidence.iter().cloned());
            }
            out.extend(self.service_evidence(site, service, now_ms));
        }
        out
    }

    /// What the situation calls for, before the hold-down, pause and say-once gates.
    fn candidates(
        &self,
        service: &str,
        now_ms: u64,
        current: &Current,
        sites: &BTreeMap<String, SiteAssessment>,
    ) -> Vec<Candidate> {
        let Some(cfg) = self.config.services.get(service) else {
            return Vec::new();
        };
        let class_of = |site: &str| class_in(sites, site, service);
        let refusal = |from: &str, to: &str| Action::Refused {
            reason: format!(
                "{service} would have zero healthy sites: {from} is {}, {to} is {}",
                class_of(from),
                class_of(to)
            ),
        };
        match cfg.class {
            ServiceClass::Stateless => {
                let Some(table) = current.routing.get(service) else {
                    return Vec::new();
                };
                let share = table.share();
                let failed: Vec<&str> = self
                    .config
                    .sites
                    .iter()
                    .map(String::as_str)
                    .filter(|s| share.get(*s).is_some_and(|n| *n > 0) && class_of(s).is_failed())
                    .collect();
                if failed.is_empty() {
                    return self
                        .failback_candidate(service, now_ms, table, sites)
                        .into_iter()
                        .collect();
                }
                let mut out = Vec::new();
                for from in failed {
                    let Some(to) = self.config.peer_of(from) else {
                        continue;
                    };
                    let evidence = self.evidence_for(sites, service, from, to, now_ms);
                    if class_of(to) != Classification::Healthy {
                        let refused = refusal(from, to);
                        let d = self.decision(service, refused, class_of(from), now_ms, evidence);
                        out.push(Candidate::Notice(d));
                        continue;
                    }
                    let moved: Vec<BucketRun> = table
                        .runs
                        .iter()
                        .map(|r| {
                            let site = if r.site == from { to } else { r.site.as_str() };
                            BucketRun::new(site, r.count)
                        })
                        .collect();
                    let new_runs = normalize_runs(&moved);
                    // Shifting back after an earlier shift: failback should still restore
                    // the routing from before any of them, not the drained intermediate.
                    let runs_now = normalize_runs(&table.runs);
                    let restore_runs = self
                        .services
                        .get(service)
                        .and_then(|s| s.shift.as_ref())
                        .filter(|r| r.shifted_runs == runs_now)
                        .map_or(runs_now.clone(), |r| r.restore_runs.clone());
                    let record = ShiftRecord {
                        from_site: from.to_string(),
                        to_site: to.to_string(),
                        restore_runs,
                        shifted_runs: new_runs.clone(),
                    };
                    let action = Action::ShiftBuckets {
                        from_site: from.to_string(),
                        to_site: to.to_string(),
                        new_runs,
                    };
                    let shift = self.decision(service, action, class_of(from), now_ms, evidence);
                    let throttle = self.throttle(service, to).map(|(action, evidence)| {
                        Box::new(self.decision(service, action, class_of(from), now_ms, evidence))
                    });
                    out.push(Candidate::Shift {
                        shift: Box::new(shift),
                        throttle,
                        record,
                    });
                }
                out
            }
            ServiceClass::Strong => {
                let Some(writer) = current.writers.get(service) else {
                    return Vec::new();
                };
                let from = writer.site.as_str();
                let Some(to) = self.config.peer_of(from) else {
                    return Vec::new();
                };
                if !class_of(from).is_failed() {
                    return Vec::new();
                }
                // The writer's database itself still answers a remote observer as primary:
                // only the site's instances are down, and the peer's instances serve the
                // service against it. Moving the writer would only risk losing data. And
                // absence of evidence is not enough (a new leader that has not heard from the
                // witness yet): a remote observer must have failed to reach it, lately.
                if self.writer_database_answers(service, from, now_ms)
                    || !self.writer_database_lost(service, from, now_ms)
                {
                    return Vec::new();
                }
                let action = if class_of(to) == Classification::Healthy {
                    Action::ProposeFailover {
                        from_site: from.to_string(),
                        to_site: to.to_string(),
                        writer_epoch: writer.epoch,
                        data_loss: self.data_loss(service, from, to, writer),
                    }
                } else {
                    refusal(from, to)
                };
                let evidence = self.evidence_for(sites, service, from, to, now_ms);
                vec![Candidate::Notice(self.decision(
                    service,
                    action,
                    class_of(from),
                    now_ms,
                    evidence,
                ))]
            }
        }
    }

    /// Load estimate: the edge's latest request rates for the service, summed over both
    /// sites, because after the shift one site takes all of it. No edge data, no estimate.
    fn throttle(&self, service: &str, to: &str) -> Option<(Action, Vec<Evidence>)> {
        let max_rps = *self.config.services.get(service)?.capacity_rps.get(to)?;
        let mut estimated_rps = 0u64;
        let mut evidence_list = Vec::new();
        for site in &self.config.sites {
            if let Some(seen) = self.edge.get(&(site.clone(), service.to_string())) {
                estimated_rps = estimated_rps.saturating_add(seen.sample.request_rps);
                let detail = format!("{} rps", seen.sample.request_rps);
                let probe = format!("{service} load at {site}");
                evidence_list.push(evidence(&Observer::Edge, probe, detail, seen.at_ms));
            }
        }
        if evidence_list.is_empty() || estimated_rps <= max_rps {
            return None;
        }
        let action = Action::EnableThrottle {
            site: to.to_string(),
            max_rps,
            estimated_rps,
        };
        Some((action, evidence_list))
    }

    /// A remote observer (not the site's own agent) saw the site's database for the service
    /// answering as primary within the silence window.
    fn writer_database_answers(&self, service: &str, site: &str, now_ms: u64) -> bool {
        let silence_ms = self.config.effective_silence_ms();
        self.databases
            .get(&(site.to_string(), service.to_string()))
            .is_some_and(|seen| {
                seen.observer.site() != site
                    && seen.probe.role == DatabaseRole::Primary
                    && now_ms.saturating_sub(seen.at_ms) <= silence_ms
            })
    }

    /// A remote observer failed to reach the site's database for the service within the
    /// silence window, and none reached it since.
    fn writer_database_lost(&self, service: &str, site: &str, now_ms: u64) -> bool {
        let silence_ms = self.config.effective_silence_ms();
        self.databases_lost
            .get(&(site.to_string(), service.to_string()))
            .is_some_and(|at_ms| now_ms.saturating_sub(*at_ms) <= silence_ms)
    }

    /// From the last positions seen: what the old primary had that the replica had not yet
    /// received. An estimate: the primary may have written more after it was last seen.
    fn data_loss(
        &self,
        service: &str,
        from: &str,
        to: &str,
        writer: &CurrentWriter,
    ) -> DataLossEstimate {
        let primary = self.databases.get(&(from.to_string(), service.to_string()));
        let replica = self.databases.get(&(to.to_string(), service.to_string()));
        // The newer of what an observer saw and what came with the last lease renewal (all a
        // new leader has of a primary that died before it heard from anyone).
        let observed = primary.map(|d| {
            (
                d.probe.current_wal_lsn,
                d.probe.ledger_sequence,
                ms_i64(d.at_ms),
            )
        });
        let leased = (writer.primary_lsn > 0).then_some((
            writer.primary_lsn,
            writer.ledger_sequence,
            writer.positions_at_ms,
        ));
        let (primary_last_lsn, primary_ledger, primary_last_seen_ms) = match (observed, leased) {
            (Some(o), Some(l)) if l.0 > o.0 => l,
            (Some(o), _) => o,
            (None, Some(l)) => l,
            (None, None) => (0, 0, 0),
        };
        let (receive, replay, ledger) = replica.map_or((0, 0, 0), |d| {
            (
                d.probe.receive_lsn,
                d.probe.replay_lsn,
                d.probe.ledger_sequence,
            )
        });
        DataLossEstimate {
            primary_last_lsn,
            replica_receive_lsn: receive,
            replica_replay_lsn: replay,
            gap_bytes: primary_last_lsn.saturating_sub(receive),
            primary_last_seen_ms,
            ledger_sequence_gap: primary_ledger.saturating_sub(ledger),
        }
    }

    fn failback_candidate(
        &self,
        service: &str,
        now_ms: u64,
        table: &RoutingTable,
        sites: &BTreeMap<String, SiteAssessment>,
    ) -> Option<Candidate> {
        let cfg = self.config.services.get(service)?;
        let Failback::Automatic { stable_period_ms } = cfg.failback else {
            return None;
        };
        let state = self.services.get(service)?;
        let record = state.shift.as_ref()?;
        let held = state
            .last_change_ms
            .is_some_and(|at_ms| now_ms < at_ms.saturating_add(cfg.hold_down_ms));
        // A different table means an operator changed the routing since: theirs to undo.
        if held || normalize_runs(&table.runs) != record.shifted_runs {
            return None;
        }
        let all_healthy = record
            .restore_runs
            .iter()
            .all(|r| class_in(sites, &r.site, service) == Classification::Healthy);
        let key = (record.from_site.clone(), service.to_string());
        let stable = self
            .healthy_since_ms
            .get(&key)
            .is_some_and(|since| now_ms.saturating_sub(*since) >= stable_period_ms);
        (all_healthy && stable)
            .then(|| Candidate::Failback(self.failback_decisions(service, state, now_ms, sites)))
    }

    fn failback_decisions(
        &self,
        service: &str,
        state: &ServiceState,
        now_ms: u64,
        sites: &BTreeMap<String, SiteAssessment>,
    ) -> Vec<Decision> {
        let Some(record) = &state.shift else {
            return Vec::new();
        };
        let (from, to) = (&record.from_site, &record.to_site);
        let class = class_in(sites, from, service);
        let evidence = self.evidence_for(sites, service, from, to, now_ms);
        let action = Action::Failback {
            site: from.clone(),
            new_runs: record.restore_runs.clone(),
        };
        let mut out = vec![self.decision(service, action, class, now_ms, evidence)];
        for site in &state.throttled {
            let action = Action::DisableThrottle { site: site.clone() };
            out.push(self.decision(service, action, class, now_ms, Vec::new()));
        }
        out
    }

    /// Applies the guardrails that need memory: hold-down, pause (dry-run) and say-once.
    fn gate(
        &mut self,
        service: &str,
        candidates: Vec<Candidate>,
        now_ms: u64,
        out: &mut Vec<Decision>,
    ) {
        let hold_down_ms = self
            .config
            .services
            .get(service)
            .map_or(0, |c| c.hold_down_ms);
        let paused = self.paused;
        let state = self.services.entry(service.to_string()).or_default();
        let mut said = BTreeSet::new();
        for candidate in candidates {
            let (mut batch, acting) = match candidate {
                Candidate::Shift {
                    mut shift,
                    throttle,
                    record,
                } => match state.last_change_ms {
                    Some(at_ms) if now_ms < at_ms.saturating_add(hold_down_ms) => {
                        let reason = format!(
                            "hold-down: {service} changed automatically at {at_ms} ms; no automatic shift for {hold_down_ms} ms after"
                        );
                        shift.action = Action::Refused { reason };
                        (vec![*shift], false)
                    }
                    _ => {
                        if !paused {
                            state.last_change_ms = Some(now_ms);
                            state.shift = Some(record);
                            if let Some(Action::EnableThrottle { site, .. }) =
                                throttle.as_ref().map(|t| &t.action)
                            {
                                state.throttled.insert(site.clone());
                            }
                        }
                        let batch = std::iter::once(*shift).chain(throttle.map(|t| *t));
                        (batch.collect(), !paused)
                    }
                },
                Candidate::Failback(batch) => {
                    if !paused {
                        state.last_change_ms = Some(now_ms);
                        state.shift = None;
                        state.throttled.clear();
                    }
                    (batch, !paused)
                }
                Candidate::Notice(d) => (vec![d], false),
            };
            for d in &mut batch {
                d.dry_run = paused;
            }
            if acting {
                out.extend(batch);
                continue;
            }
            let signature: Vec<String> = batch
                .iter()
                .map(|d| {
                    format!(
                        "{}{}",
                        d.action.signature(),
                        if paused { " (dry)" } else { "" }
                    )
                })
                .collect();
            let signature = signature.join("; ");
            if !state.said.contains(&signature) {
                out.extend(batch);
            }
            said.insert(signature);
        }
        state.said = said;
    }

    /// Tells the policy that a shift or failback was committed and applied at
    /// `applied_at_ms`: the hold-down then runs from there if that is later than the decision.
    pub fn record_applied(
        &mut self,
        decision: &Decision,
        applied_at_ms: u64,
    ) -> Result<(), PolicyError> {
        if decision.dry_run {
            return Err(PolicyError::DryRunApplied);
        }
        if !self.config.services.contains_key(&decision.service) {
            return Err(PolicyError::NoSuchService(decision.service.clone()));
        }
        if matches!(
            decision.action,
            Action::ShiftBuckets { .. } | Action::Failback { .. }
        ) {
            let state = self.services.entry(decision.service.clone()).or_default();
            state.last_change_ms = Some(state.last_change_ms.unwrap_or(0).max(applied_at_ms));
        }
        Ok(())
    }

    /// An operator asks to undo the last automatic shift of a stateless service. Allowed at
    /// any time (no stable period: the operator judges), but only to healthy sites; a site
    /// drained for gray failure counts as healthy here, as the operator overrides the
    /// edge's verdict. Starts a hold-down like any change.
    pub fn request_failback(
        &mut self,
        service: &str,
        now_ms: u64,
        current: &Current,
    ) -> Result<Vec<Decision>, PolicyError> {
        let refused = |reason: &str| PolicyError::FailbackRefused {
            service: service.to_string(),
            reason: reason.to_string(),
        };
        let cfg = self
            .config
            .services
            .get(service)
            .ok_or_else(|| PolicyError::NoSuchService(service.to_string()))?;
        if cfg.class == ServiceClass::Strong {
            return Err(refused(
                "a strong service moves only by an approved failover proposal",
            ));
        }
        self.check_current(current)?;
        let state = self.services.get(service).cloned().unwrap_or_default();
        let Some(record) = &state.shift else {
            return Err(refused("no automatic shift to undo"));
        };
        let table = current
            .routing
            .get(service)
            .ok_or_else(|| refused("no current routing"))?;
        if normalize_runs(&table.runs) != record.shifted_runs {
            return Err(refused(
                "the routing changed since the shift; an operator owns it now",
            ));
        }
        let sites = self.assess(now_ms);
        for run in &record.restore_runs {
            let class = class_in(&sites, &run.site, service);
            let overridable = class == Classification::GrayFailure && run.site == record.from_site;
            if class != Classification::Healthy && !overridable {
                return Err(refused(&format!("{} is {class}", run.site)));
            }
        }
        let mut decisions = self.failback_decisions(service, &state, now_ms, &sites);
        for d in &mut decisions {
            d.dry_run = self.paused;
        }
        if !self.paused {
            let from_key = (record.from_site.clone(), service.to_string());
            if let Some(seen) = self.edge.get_mut(&from_key) {
                seen.above_since_ms = None;
            }
            let state = self.services.entry(service.to_string()).or_default();
            state.last_change_ms = Some(now_ms);
            state.shift = None;
            state.throttled.clear();
        }
        Ok(decisions)
    }
}

fn class_in(sites: &BTreeMap<String, SiteAssessment>, site: &str, service: &str) -> Classification {
    sites
        .get(site)
        .and_then(|a| a.services.get(service))
        .copied()
        .unwrap_or(Classification::Unknown)
}
