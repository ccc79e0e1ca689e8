//! A small simulated world: two sites and a witness, their agents, the edge, and a leader
//! (at the witness) that reports to the policy, ticks it and applies what it decides.

use std::collections::{BTreeMap, BTreeSet};

use failover_policy::{
    Action, AgentReport, Classification, Current, CurrentWriter, DatabaseProbe, DatabaseRole,
    Decision, EdgeReport, EdgeSample, InstanceProbe, Observation, Observer, Policy, PolicyConfig,
    PolicyError, SiteProbes, TickOutput,
};
use invoker_domain::{BucketRun, RoutingTable};

pub const SITES: [&str; 2] = ["a", "b"];
pub const GIFT: &str = "gift-api";
pub const WALLET: &str = "wallet";
pub const SERVICES: [&str; 2] = [GIFT, WALLET];

pub const CONFIG: &str = r#"
observer_silence_ms = 750
gray_failure_window_ms = 2000

[services.gift-api]
class = "stateless"
hold_down_ms = 10000
capacity_rps = { a = 1000, b = 1000 }

[services.wallet]
class = "strong"
"#;

pub const AUTO_FAILBACK: &str = r#"
observer_silence_ms = 750
gray_failure_window_ms = 2000

[services.gift-api]
class = "stateless"
hold_down_ms = 5000
failback = { automatic = { stable_period_ms = 3000 } }

[services.wallet]
class = "strong"
"#;

/// What is true in the world, as opposed to what the policy has been told.
#[derive(Debug, Clone, PartialEq)]
pub struct Net {
    /// The site's hosts run.
    pub up: [bool; 2],
    pub agent_up: [bool; 2],
    /// Neither the peer nor the witness can reach the site (users still can).
    pub isolated: [bool; 2],
    /// The site's agent's reports do not reach the leader.
    pub reports_lost: [bool; 2],
    /// The link between a and b is down.
    pub partition: bool,
    pub witness_up: bool,
    pub edge_up: bool,
    /// Services whose readiness fails in a site.
    pub failing: BTreeSet<(usize, &'static str)>,
    pub edge_error_pct: [u64; 2],
    pub load_rps: u64,
}

impl Default for Net {
    fn default() -> Net {
        Net {
            up: [true; 2],
            agent_up: [true; 2],
            isolated: [false; 2],
            reports_lost: [false; 2],
            partition: false,
            witness_up: true,
            edge_up: true,
            failing: BTreeSet::new(),
            edge_error_pct: [0; 2],
            load_rps: 800,
        }
    }
}

pub struct Sim {
    pub policy: Policy,
    pub now_ms: u64,
    pub current: Current,
    pub net: Net,
    /// Act on decisions as the leader would (apply routing, record it applied).
    pub apply: bool,
    /// The wallet primary's WAL position; frozen while its site is down.
    wal_lsn: u64,
    seqs: BTreeMap<Observer, u64>,
}

pub fn table(version: u64, runs: &[(&str, u32)]) -> RoutingTable {
    RoutingTable {
        version,
        runs: runs.iter().map(|(s, n)| BucketRun::new(*s, *n)).collect(),
        throttle_max_rps: Default::default(),
    }
}

impl Sim {
    pub fn new(config: &str) -> Sim {
        let policy = Policy::new(PolicyConfig::from_toml_str(config).unwrap()).unwrap();
        let mut current = Current::default();
        for service in SERVICES {
            let t = table(1, &[("a", 512), ("b", 512)]);
            current.routing.insert(service.to_string(), t);
        }
        let writer = CurrentWriter {
            site: "a".into(),
            epoch: 1,
            primary_lsn: 0,
            ledger_sequence: 0,
            positions_at_ms: 0,
        };
        current.writers.insert(WALLET.to_string(), writer);
        Sim {
            policy,
            now_ms: 1_000,
            current,
            net: Net::default(),
            apply: true,
            wal_lsn: 0,
            seqs: BTreeMap::new(),
        }
    }

    /// `from`: a site index, or `None` for the witness.
    fn reaches(&self, from: Option<usize>, to: usize) -> bool {
        let n = &self.net;
        n.up[to]
            && match from {
                Some(f) if f == to => true,
                Some(f) => !n.partition && !n.isolated[to] && !n.isolated[f],
                None => !n.isolated[to],
            }
    }

    fn probes(&self, from: Option<usize>, to: usize) -> SiteProbes {
        let reach = self.reaches(from, to);
        let now = self.now_ms;
        let instances = SERVICES
            .iter()
            .map(|svc| InstanceProbe {
                service: svc.to_string(),
                instance: format!("{}-{svc}-1", SITES[to]),
                ok: reach && !self.net.failing.contains(&(to, *svc)),
                probed_at_ms: now,
            })
            .collect();
        let writer = self.current.writers[WALLET].site == SITES[to];
        let role = match (reach, writer) {
            (false, _) => DatabaseRole::Unreachable,
            (true, true) => DatabaseRole::Primary,
            (true, false) => DatabaseRole::Replica,
        };
        let database = DatabaseProbe {
            service: WALLET.into(),
            role,
            current_wal_lsn: self.wal_lsn,
            receive_lsn: self.wal_lsn.saturating_sub(500),
            replay_lsn: self.wal_lsn.saturating_sub(800),
            ledger_sequence: if writer {
                self.wal_lsn
            } else {
                self.wal_lsn.saturating_sub(500)
            } / 100,
            probed_at_ms: now,
        };
        SiteProbes {
            site: SITES[to].into(),
            instances,
            databases: vec![database],
        }
    }

    fn next_seq(&mut self, observer: Observer) -> u64 {
        let seq = self.seqs.entry(observer).or_insert(0);
        *seq += 1;
        *seq
    }

    pub fn last_seq(&self, observer: &Observer) -> u64 {
        self.seqs.get(observer).copied().unwrap_or(0)
    }

    pub fn agent_report(&mut self, site: usize) -> Observation {
        let observer = Observer::Agent(SITES[site].into());
        Observation::Agent(AgentReport {
            agent_site: SITES[site].into(),
            seq: self.next_seq(observer),
            received_at_ms: self.now_ms,
            targets: vec![
                self.probes(Some(site), site),
                self.probes(Some(site), 1 - site),
            ],
        })
    }

    pub fn witness_report(&mut self) -> Observation {
        Observation::Agent(AgentReport {
            agent_site: "witness".into(),
            seq: self.next_seq(Observer::Agent("witness".into())),
            received_at_ms: self.now_ms,
            targets: vec![self.probes(None, 0), self.probes(None, 1)],
        })
    }

    pub fn edge_report(&mut self) -> Observation {
        let share = self.current.routing[GIFT].share();
        let samples = (0..2)
            .map(|i| {
                let request_rps =
                    self.net.load_rps * share.get(SITES[i]).copied().unwrap_or(0) as u64 / 1024;
                let broken = !self.net.up[i] || self.net.failing.contains(&(i, GIFT));
                let pct = if broken {
                    100
                } else {
                    self.net.edge_error_pct[i]
                };
                EdgeSample {
                    site: SITES[i].into(),
                    service: GIFT.into(),
                    request_rps,
                    error_rps: request_rps * pct / 100,
                }
            })
            .collect();
        Observation::Edge(EdgeReport {
            seq: self.next_seq(Observer::Edge),
            received_at_ms: self.now_ms,
            samples,
        })
    }

    /// Sends the reports that reach the leader, except from observers `skip` names.
    pub fn send_reports_except(&mut self, skip: impl Fn(&Observer) -> bool) {
        let writer = SITES
            .iter()
            .position(|s| *s == self.current.writers[WALLET].site);
        if writer.is_some_and(|i| self.net.up[i]) {
            self.wal_lsn = self.now_ms * 10;
        }
        let mut reports = Vec::new();
        for i in 0..2 {
            let n = &self.net;
            if n.up[i] && n.agent_up[i] && !n.reports_lost[i] {
                reports.push(self.agent_report(i));
            }
        }
        if self.net.witness_up {
            reports.push(self.witness_report());
        }
        if self.net.edge_up {
            reports.push(self.edge_report());
        }
        for r in reports.into_iter().filter(|r| !skip(&r.observer())) {
            self.policy.observe(&r).unwrap();
        }
    }

    pub fn observe(&mut self, observation: &Observation) -> Result<(), PolicyError> {
        self.policy.observe(observation)
    }

    pub fn tick(&mut self) -> TickOutput {
        let out = self.policy.tick(self.now_ms, &self.current).unwrap();
        if self.apply {
            for d in out.decisions.iter().filter(|d| !d.dry_run) {
                self.apply_decision(d);
            }
        }
        out
    }

    pub fn apply_decision(&mut self, d: &Decision) {
        if let Action::ShiftBuckets { new_runs, .. } | Action::Failback { new_runs, .. } = &d.action
        {
            let t = self.current.routing.get_mut(&d.service).unwrap();
            t.version += 1;
            t.runs = new_runs.clone();
            self.policy.record_applied(d, self.now_ms).unwrap();
        }
    }

    /// Reports and ticks every `step_ms` for `for_ms`; returns every tick's output.
    pub fn run(&mut self, for_ms: u64, step_ms: u64) -> Vec<TickOutput> {
        let end = self.now_ms + for_ms;
        let mut outs = Vec::new();
        while self.now_ms < end {
            self.now_ms += step_ms;
            self.send_reports_except(|_| false);
            outs.push(self.tick());
        }
        outs
    }

    pub fn share(&self, service: &str) -> BTreeMap<String, usize> {
        self.current.routing[service].share()
    }
}

pub fn class(out: &TickOutput, site: &str, service: &str) -> Classification {
    out.sites[site].services[service]
}

pub fn decisions(outs: &[TickOutput]) -> Vec<Decision> {
    outs.iter()
        .flat_map(|o| o.decisions.iter().cloned())
        .collect()
}

pub fn labels(outs: &[TickOutput]) -> Vec<String> {
    decisions(outs)
        .iter()
        .map(|d| format!("{} {}", d.label(), d.service))
        .collect()
}
