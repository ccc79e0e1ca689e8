//! The local two-site lab: every component of the deployment as a child process on one
//! machine, on per-site loopback ranges (site a = 127.0.1.x, site b = 127.0.2.x,
//! witness = 127.0.3.x) and free ports.
//!
//! | process      | site    | address        |
//! |--------------|---------|----------------|
//! | `invoker-1`  | a       | 127.0.1.1      |
//! | `invoker-2`  | b       | 127.0.2.1      |
//! | `invoker-3`  | witness | 127.0.3.1      |
//! | `etcd-a`     | a       | 127.0.1.2      |
//! | `etcd-b`     | b       | 127.0.2.2      |
//! | `postgres-a` | a       | 127.0.1.3 (primary)            |
//! | `postgres-b` | b       | 127.0.2.3 (streaming replica)  |
//! | `wallet-a`   | a       | 127.0.1.4 (writes to the primary) |
//! | `wallet-b`   | b       | 127.0.2.4 (writes to the primary) |
//! | `gift-api-a` | a       | 127.0.1.5 (HTTP; orders on the primary) |
//! | `gift-api-b` | b       | 127.0.2.5 (HTTP; reads from the replica) |
//! | `agent-a`, `agent-b`, `agent-witness` | a, b, witness | none (they report to the invoker leader) |
//! | `edge-router` | witness | 127.0.3.10 (HTTP proxy in front of both gift-apis; admin port) |
//!
//! Each child leads its own process group, logs to `DIR/logs/<name>.log`, and is recorded in
//! `DIR/pids/<name>.pid` the moment it is spawned and in `DIR/lab.json`, so that [`down_dir`]
//! (`lab down`) can stop everything even after the lab process itself crashed. A pid is only
//! ever signalled if its start time still matches the recorded one.

mod agents;
mod describe;
mod edge;
mod error;
mod etcd;
mod invoker;
mod paths;
mod postgres;
mod proc;
mod services;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use invoker_api::{pb, InvokerClient};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use describe::{
    Components, Endpoints, LabDescription, PidRecord, ProcessInfo, ProcessKind, LAB_JSON, LOGS_DIR,
    PIDS_DIR, TOPOLOGY_TOML,
};
pub use error::LabError;
pub use invoker::{lab_sites, lab_topology};
pub use paths::{bin_dir, etcd_bin, find_bin, pg_bin_dir, running_processes};
pub use postgres::{DATABASE, REPLICA_SLOT};
pub use proc::{pid_alive, process_state, tail, ProcState, LAB_DIR_ENV};

use etcd::EtcdPlan;
use invoker::InvokerPlan;
use postgres::{PgPlan, PgSetup};
use proc::{ProcId, SpawnSpec, Target};

/// Raft settings written into every invoker's config; `None` keeps the invoker's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_min_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_logs_since_last: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs_kept_after_snapshot: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_timeout_ms: Option<u64>,
}

/// How to start a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The lab directory: created if missing; a previous lab's leftovers in it are wiped; a
    /// non-empty directory that is not a lab's is refused.
    pub dir: PathBuf,
    pub components: Components,
    pub raft: RaftOverrides,
    /// Extra environment variables of every invoker (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub invoker_env: Vec<(String, String)>,
    /// Extra environment variables of both gift-api instances (`GIFT_API_EFFECT_URL`, ...).
    pub gift_api_env: Vec<(String, String)>,
    /// Start the site agents (a, b, witness) of a full lab; the invoker leader then runs the
    /// failover policy on their reports. `lab up` does; tests that bring their own agents,
    /// or want no automatic shifts, leave it off.
    pub agents: bool,
    /// The invokers' `[policy]` table: failover-policy settings per service over its
    /// defaults (see invoker/server/src/config.rs), e.g. a short hold-down for a benchmark.
    pub invoker_policy: toml::Table,
    /// Apply [`lab_topology`] through the admin API once the invokers have a leader.
    pub apply_topology: bool,
    /// How long [`Lab::start`] (and [`Lab::restart`]) wait for health.
    pub health_timeout: Duration,
}

impl LabOptions {
    /// A full lab in `dir`, default raft settings, topology applied, 60 s to become healthy.
    pub fn new(dir: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            dir: dir.into(),
            components: Components::Full,
            raft: RaftOverrides::default(),
            invoker_env: Vec::new(),
            gift_api_env: Vec::new(),
            agents: false,
            invoker_policy: toml::Table::new(),
            apply_topology: true,
            health_timeout: Duration::from_secs(60),
        }
    }

    /// Only the three invoker nodes.
    pub fn invokers_only(dir: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            components: Components::InvokersOnly,
            ..LabOptions::new(dir)
        }
    }
}

/// What [`down_dir`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    /// Exited after SIGTERM (SIGINT for postgres).
    pub stopped: Vec<String>,
    /// Needed SIGKILL.
    pub killed: Vec<String>,
    /// Were not running any more (or their pid belongs to another process now).
    pub not_running: Vec<String>,
}

/// Grace period of [`down_dir`] and [`Lab::down`] before SIGKILL.
pub const DOWN_GRACE: Duration = Duration::from_secs(5);
/// Grace period of [`Lab::stop`] before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops every process of the lab in `dir` from its pid files and `lab.json` (no running lab
/// needed): SIGTERM to each process tree (SIGINT to a postmaster: fast shutdown), up to 5 s,
/// then SIGKILL. A pid is signalled only if its start time matches the recorded one.
pub fn down_dir(dir: &Path) -> Result<DownReport, LabError> {
    let records = PidRecord::load_all(dir);
    if records.is_empty() && !dir.join(LAB_JSON).exists() && !dir.join(describe::MARKER).exists() {
        return Err(LabError::NoLab(dir.to_path_buf()));
    }
    let targets: Vec<Target> = records.iter().map(Target::from).collect();
    let out = proc::terminate(&targets, DOWN_GRACE);
    if !out.remaining.is_empty() {
        return Err(LabError::StillRunning(out.remaining));
    }
    for rec in &records {
        PidRecord::remove(dir, &rec.name);
    }
    Ok(DownReport {
        stopped: out.graceful,
        killed: out.killed,
        not_running: out.not_running,
    })
}

/// The lab's on-call operator: a fresh random token in `DIR/oncall.token` (owner-only), and
/// its SHA-256 for the invokers' configuration.
fn oncall_operator(dir: &Path) -> Result<(describe::Oncall, String), LabError> {
    use sha2::Digest;
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let path = dir.join("oncall.token");
    std::fs::write(&path, format!("{token}\n"))
        .map_err(|e| LabError::io(format!("writing {}", path.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| LabError::io(format!("restricting {}", path.display()), e))?;
    }
    let digest: String = sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((
        describe::Oncall {
            operator: "oncall".into(),
            token_file: path,
        },
        digest,
    ))
}

/// SIGKILLs every process of `site` in the lab in `dir` (from `lab.json` and the pid files;
/// no running lab needed), PostgreSQL too unless `keep_postgres`: a drill's "site down", or
/// with `keep_postgres` its "application tier hard down". Returns the names killed.
pub fn kill_site_dir(dir: &Path, site: &str, keep_postgres: bool) -> Result<Vec<String>, LabError> {
    let desc = LabDescription::load(dir)?;
    let records = PidRecord::load_all(dir);
    let mut killed = Vec::new();
    let mut survivors = Vec::new();
    for p in desc
        .processes
        .iter()
        .filter(|p| p.site == site && !(keep_postgres && p.kind == ProcessKind::Postgres))
    {
        let Some(record) = records.iter().find(|r| r.name == p.name) else {
            continue;
        };
        let target = Target::from(record);
        if !target.leader.alive() {
            continue;
        }
        if proc::kill_tree(target.leader, target.pgid) {
            killed.push(p.name.clone());
        } else {
            survivors.push(p.name.clone());
        }
    }
    if !survivors.is_empty() {
        return Err(LabError::StillRunning(survivors));
    }
    Ok(killed)
}

pub(crate) fn lock(reg: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // A panic while holding the lock leaves the registry usable: it is plain data.
    reg.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The children of a lab and their description. Dropping it kills every child still held.
pub(crate) struct Registry {
    desc: LabDescription,
    children: BTreeMap<String, tokio::process::Child>,
    specs: BTreeMap<String, SpawnSpec>,
}

impl Registry {
    fn new(desc: LabDescription) -> Registry {
        Registry {
            desc,
            children: BTreeMap::new(),
            specs: BTreeMap::new(),
        }
    }

    /// Spawns a child and records it at once (pid file, then lab.json).
    pub(crate) fn spawn(&mut self, spec: SpawnSpec, mut info: ProcessInfo) -> Result<(), LabError> {
        let (child, id) = spec.spawn()?;
        info.pid = id.pid;
        // process_group(0): the child leads a group whose id is its pid.
        info.pgid = id.pid;
        info.start_ticks = id.start_ticks;
        let record = info.pid_record();
        self.children.insert(info.name.clone(), child);
        self.specs.insert(info.name.clone(), spec);
        self.desc.upsert(info);
        record.save(&self.desc.dir)?;
        self.desc.save()
    }

    /// Fails if a child (or only the one named) exited: while starting, every child must
    /// stay up.
    pub(crate) fn check_exited(&mut self, only: Option<&str>) -> Result<(), LabError> {
        let exited = self.poll_exits(only);
        match exited.into_iter().next() {
            None => Ok(()),
            Some((name, status)) => {
                let log = self
                    .desc
                    .process(&name)
                    .map(|p| p.log.clone())
                    .unwrap_or_default();
                Err(LabError::ProcessExited {
                    name,
                    status,
                    tail: tail(&log, 30),
                    log,
                })
            }
        }
    }

    /// Reaps children (or only the one named) that exited; returns names and exit statuses.
    fn poll_exits(&mut self, only: Option<&str>) -> Vec<(String, String)> {
        let mut exited = Vec::new();
        for (name, child) in &mut self.children {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => exited.push((name.clone(), status.to_string())),
                Ok(None) => {}
                Err(e) => exited.push((name.clone(), format!("unknown status: {e}"))),
            }
        }
        for (name, _) in &exited {
            self.children.remove(name);
            PidRecord::remove(&self.desc.dir, name);
        }
        exited
    }

    fn proc_id(&self, name: &str) -> Result<(ProcId, u32), LabError> {
        let info = self
            .desc
            .process(name)
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        Ok((
            ProcId {
                pid: info.pid,
                start_ticks: info.start_ticks,
            },
            info.pgid,
        ))
    }

    fn target(&self, name: &str) -> Result<Target, LabError> {
        let info = self
            .desc
            .process(name)
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        Ok(Target::from(&info.pid_record()))
    }

    /// Reaps a child known to be dead or dying (waits up to 2 s) and forgets it.
    fn reap_sync(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        PidRecord::remove(&self.desc.dir, name);
    }

    /// SIGKILL to every child's tree, then reap (synchronous, best effort).
    fn kill_all(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let names: Vec<String> = self.children.keys().cloned().collect();
        let mut trees = BTreeMap::new();
        for name in &names {
            if let Ok((leader, pgid)) = self.proc_id(name) {
                let procs = proc::tree(leader, pgid);
                proc::signal_all(&procs, Signal::SIGKILL);
                trees.insert(name.clone(), procs);
            }
        }
        proc::wait_trees_gone(&trees, Duration::from_secs(5));
        for name in &names {
            if let Some(child) = self.children.get_mut(name) {
                // In case the tree walk missed it (it must not outlive us).
                let _ = child.start_kill();
            }
            self.reap_sync(name);
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Polls `attempt` every 50 ms until it succeeds, `check` fails (a child exited), or
/// `deadline` passes.
pub(crate) async fn poll_until<C, F, Fut>(
    mut check: C,
    started: Instant,
    deadline: Instant,
    what: &str,
    mut attempt: F,
) -> Result<(), LabError>
where
    C: FnMut() -> Result<(), LabError>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    loop {
        check()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(left.max(Duration::from_millis(100)), attempt()).await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => "the last attempt timed out".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: what.to_string(),
                after: started.elapsed(),
                detail: last,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Milliseconds since `started` (for progress logs).
pub(crate) fn ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The loopback address of `host` in `site` (a = 127.0.1.x, b = 127.0.2.x, else 127.0.3.x).
pub fn site_ip(site: &str, host: u8) -> Ipv4Addr {
    let third = match site {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    Ipv4Addr::new(127, 0, third, host)
}

/// Every address and port of one lab, picked before anything starts.
struct Plan {
    invokers: Vec<InvokerPlan>,
    etcds: Vec<EtcdPlan>,
    primary: PgPlan,
    replica: PgPlan,
}

impl Plan {
    fn new() -> Result<Plan, LabError> {
        let inv_sites = ["a", "b", "witness"];
        let mut ips = Vec::new();
        for site in inv_sites {
            ips.push(site_ip(site, 1)); // grpc
            ips.push(site_ip(site, 1)); // metrics
        }
        for site in ["a", "b"] {
            ips.push(site_ip(site, 2)); // etcd client
            ips.push(site_ip(site, 2)); // etcd peer
        }
        ips.push(site_ip("a", 3));
        ips.push(site_ip("b", 3));
        let ports = paths::free_ports(&ips)?;
        let addr = |i: usize| format!("{}:{}", ips[i], ports[i]);
        let invokers = inv_sites
            .iter()
            .enumerate()
            .map(|(i, site)| InvokerPlan {
                id: u64::try_from(i).unwrap_or(0) + 1,
                site: (*site).to_string(),
                grpc: addr(2 * i),
                metrics: addr(2 * i + 1),
            })
            .collect();
        let etcds = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, site)| EtcdPlan {
                site: (*site).to_string(),
                client: addr(6 + 2 * i),
                peer: addr(7 + 2 * i),
            })
            .collect();
        let pg = |i: usize, site: &str| PgPlan {
            site: site.to_string(),
            host: ips[i].to_string(),
            port: ports[i],
        };
        Ok(Plan {
            invokers,
            etcds,
            primary: pg(10, "a"),
            replica: pg(11, "b"),
        })
    }
}

/// A running lab. Dropping it kills every child (so a failing test leaves nothing behind);
/// [`Lab::down`] stops them gracefully; [`Lab::detach`] leaves them running.
pub struct Lab {
    reg: Registry,
    pg: Option<PgSetup>,
    health_timeout: Duration,
}

impl Lab {
    /// Starts the lab and waits until it is healthy: the invokers have a leader (and the
    /// topology is applied, if asked), each etcd takes a write, and the replica streams.
    /// Invokers and etcd start at once; PostgreSQL's initdb runs meanwhile.
    pub async fn start(opts: LabOptions) -> Result<Lab, LabError> {
        let started = Instant::now();
        if opts.health_timeout.is_zero() {
            return Err(LabError::Options(
                "health_timeout must be above zero".into(),
            ));
        }
        let deadline = started + opts.health_timeout;
        let full = opts.components == Components::Full;
        let invoker_bin = find_bin("invoker")?;
        let (etcd_bin, pg) = if full {
            (Some(etcd_bin()?), Some(PgSetup::detect()?))
        } else {
            (None, None)
        };
        let dir = paths::prepare_dir(&opts.dir)?;
        if let Some((uid, gid)) = pg.as_ref().and_then(|p| p.run_as) {
            paths::check_traversable(&dir, uid, gid)?;
        }
        let plan = Plan::new()?;

        let mut desc = LabDescription::new(&dir, opts.components);
        desc.endpoints.invokers = plan.invokers.iter().map(|n| n.grpc.clone()).collect();
        if full {
            for e in &plan.etcds {
                desc.endpoints.etcd.insert(e.site.clone(), e.client_url());
            }
            for p in [&plan.primary, &plan.replica] {
                desc.endpoints.postgres.insert(p.site.clone(), p.url());
            }
        }
        // Without PostgreSQL (invokers only) the wallet's DSN names where it would run.
        let topology = lab_topology(&plan.primary.url(), &plan.replica.url());
        topology.validate()?;
        let topology_path = dir.join(TOPOLOGY_TOML);
        describe::write_atomic(&topology_path, &toml::to_string(&topology)?)?;
        desc.topology = Some(topology_path);
        desc.save()?;

        let reg = Mutex::new(Registry::new(desc));
        let env: BTreeMap<String, String> = opts.invoker_env.iter().cloned().collect();
        let publish_to: Vec<(String, String)> = if full {
            plan.etcds
                .iter()
                .map(|e| (e.site.clone(), e.client_url()))
                .collect()
        } else {
            Vec::new()
        };
        let (oncall, token_sha256) = oncall_operator(&dir)?;
        let shared = invoker::InvokerShared {
            all: &plan.invokers,
            raft: &opts.raft,
            publish_to: &publish_to,
            policy: &opts.invoker_policy,
            oncall: Some((&oncall.operator, &token_sha256)),
        };
        lock(&reg).desc.oncall = Some(oncall.clone());
        for node in &plan.invokers {
            let (config, data_dir) = invoker::write_config(&dir, node, &shared)?;
            let name = node.name();
            let log = dir.join(LOGS_DIR).join(format!("{name}.log"));
            let spec = SpawnSpec {
                name: name.clone(),
                program: invoker_bin.clone(),
                args: vec!["--config".into(), config.display().to_string()],
                env: env.clone(),
                run_as: None,
                cwd: dir.clone(),
                log: log.clone(),
                lab_dir: dir.clone(),
            };
            let listen = BTreeMap::from([
                ("grpc".to_string(), node.grpc.clone()),
                ("metrics".to_string(), node.metrics.clone()),
            ]);
            let info = ProcessInfo {
                node_id: Some(node.id),
                config: Some(config),
                ..ProcessInfo::planned(&spec, ProcessKind::Invoker, &node.site, listen, data_dir)
            };
            lock(&reg).spawn(spec, info)?;
        }
        if let Some(bin) = &etcd_bin {
            for e in &plan.etcds {
                let (spec, info) = e.spec(&dir, bin);
                lock(&reg).spawn(spec, info)?;
            }
        }

        let endpoints: Vec<String> = plan.invokers.iter().map(|n| n.grpc.clone()).collect();
        let invokers = async {
            poll_until(
                || lock(&reg).check_exited(None),
                started,
                deadline,
                "an invoker leader",
                || async {
                    InvokerClient::connect_leader(&endpoints)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                },
            )
            .await?;
            tracing::info!(elapsed_ms = ms(started), "lab: the invokers have a leader");
            if opts.apply_topology {
                let request = pb::ApplyTopologyRequest {
                    topology: Some(invoker_api::convert::topology_to_pb(&topology)),
                    actor: "lab".into(),
                    reason: "lab up".into(),
                };
                poll_until(
                    || lock(&reg).check_exited(None),
                    started,
                    deadline,
                    "the topology to apply",
                    || async {
                        let client = InvokerClient::connect_leader(&endpoints)
                            .await
                            .map_err(|e| e.to_string())?;
                        let response = client
                            .admin()
                            .apply_topology(request.clone())
                            .await
                            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
                            .into_inner();
                        tracing::info!(
                            log_index = response.log_index,
                            changes = ?response.changes,
                            notes = ?response.notes,
                            "lab topology applied"
                        );
                        Ok(())
                    },
                )
                .await?;
            }
            Ok::<(), LabError>(())
        };
        let etcds = async {
            if !full {
                return Ok(());
            }
            let checks = plan.etcds.iter().map(|e| {
                let url = e.client_url();
                let what = format!("{} to take a write", e.name());
                let reg = &reg;
                async move {
                    let check = || lock(reg).check_exited(None);
                    poll_until(check, started, deadline, &what, || etcd::check(&url)).await
                }
            });
            futures::future::try_join_all(checks).await?;
            tracing::info!(elapsed_ms = ms(started), "lab: etcd healthy");
            Ok::<(), LabError>(())
        };
        let postgres = async {
            let Some(pg) = &pg else {
                return Ok(());
            };
            let (primary, replica) = (&plan.primary, &plan.replica);
            postgres::start(&reg, &dir, pg, primary, replica, started, deadline).await?;
            tracing::info!(elapsed_ms = ms(started), "lab: the replica streams");
            Ok::<(), LabError>(())
        };
        tokio::try_join!(invokers, etcds, postgres)?;

        // The gift services need the primary (they apply the schema) and their site's etcd.
        if full {
            let wallet_bin = find_bin("wallet")?;
            let api_bin = find_bin("gift-api")?;
            let sites = ["a", "b"];
            let wallets = sites
                .iter()
                .map(|site| services::ServicePlan::wallet(site))
                .collect::<Result<Vec<_>, _>>()?;
            let mut planned = Vec::new();
            for (i, site) in sites.iter().enumerate() {
                let etcd = plan
                    .etcds
                    .iter()
                    .find(|e| e.site == *site)
                    .map(|e| e.client_url());
                // This site's wallet first, then the other's.
                let mut wallet_addrs = vec![wallets[i].addr.clone()];
                wallet_addrs.extend(
                    wallets
                        .iter()
                        .filter(|w| w.site != *site)
                        .map(|w| w.addr.clone()),
                );
                let deps = services::SiteDeps {
                    primary_url: plan.primary.url(),
                    replica_url: (plan.replica.site == *site).then(|| plan.replica.url()),
                    etcd,
                    wallets: wallet_addrs,
                };
                let api = services::ServicePlan::gift_api(site)?;
                for (service, bin) in [(&wallets[i], &wallet_bin), (&api, &api_bin)] {
                    let (mut spec, info) = service.spec(&dir, bin, &deps)?;
                    if service.kind == ProcessKind::GiftApi {
                        spec.env.extend(opts.gift_api_env.iter().cloned());
                    }
                    let mut reg = lock(&reg);
                    let endpoints = &mut reg.desc.endpoints;
                    match service.kind {
                        ProcessKind::GiftApi => {
                            endpoints.gift_api.insert(site.to_string(), service.url())
                        }
                        _ => endpoints
                            .wallet
                            .insert(site.to_string(), service.addr.clone()),
                    };
                    reg.spawn(spec, info)?;
                }
                planned.push((wallets[i].clone(), deps.etcd.clone()));
                planned.push((api, deps.etcd));
            }
            let checks = planned.iter().map(|(service, etcd)| {
                let what = format!("{} to serve and register", service.name());
                let reg = &reg;
                async move {
                    let check = || lock(reg).check_exited(None);
                    poll_until(check, started, deadline, &what, || {
                        service.check(etcd.as_deref())
                    })
                    .await
                }
            });
            futures::future::try_join_all(checks).await?;
            tracing::info!(
                elapsed_ms = ms(started),
                "lab: gift services serve in both sites"
            );

            // The edge router in front of both gift-apis.
            let edge_bin = find_bin(edge::NAME)?;
            let plan_edge = edge::EdgePlan::new()?;
            let etcds: Vec<(String, String)> = plan
                .etcds
                .iter()
                .map(|e| (e.site.clone(), e.client_url()))
                .collect();
            let (spec, info) = plan_edge.spec(&dir, &edge_bin, &endpoints, &etcds)?;
            {
                let mut reg = lock(&reg);
                reg.desc.endpoints.edge = Some(plan_edge.url());
                reg.desc.endpoints.edge_admin = Some(format!("http://{}", plan_edge.admin));
                reg.spawn(spec, info)?;
            }
            // Without the topology there is no routing table to wait for.
            let need_table = opts.apply_topology;
            poll_until(
                || lock(&reg).check_exited(None),
                started,
                deadline,
                "the edge router to know the routing and instances in a and b",
                || edge::check(&plan_edge.admin, &sites, need_table),
            )
            .await?;
            tracing::info!(
                elapsed_ms = ms(started),
                "lab: the edge router routes to both sites"
            );
        }

        if full && opts.agents {
            let agent_bin = find_bin("site-agent")?;
            let sites: Vec<agents::SiteRef> = [&plan.primary, &plan.replica]
                .iter()
                .map(|p| agents::SiteRef {
                    site: p.site.clone(),
                    etcd: plan
                        .etcds
                        .iter()
                        .find(|e| e.site == p.site)
                        .map(|e| e.client_url())
                        .unwrap_or_default(),
                    database_url: p.url(),
                })
                .collect();
            let invoker_metrics: Vec<String> =
                plan.invokers.iter().map(|n| n.metrics.clone()).collect();
            for site in ["a", "b", "witness"] {
                let agent = agents::AgentPlan {
                    site: site.to_string(),
                };
                let (spec, info) = agent.spec(&dir, &agent_bin, &endpoints, &sites)?;
                lock(&reg).spawn(spec, info)?;
            }
            let checks = ["a", "b", "witness"].map(|site| {
                let what = format!("agent-{site} to report to the invoker leader");
                let reg = &reg;
                let invoker_metrics = &invoker_metrics;
                async move {
                    let check = || lock(reg).check_exited(None);
                    poll_until(check, started, deadline, &what, || {
                        agents::reported(site, invoker_metrics)
                    })
                    .await
                }
            });
            futures::future::try_join_all(checks).await?;
            tracing::info!(
                elapsed_ms = ms(started),
                "lab: agents report in a, b and the witness"
            );
        }

        let mut reg = reg.into_inner().unwrap_or_else(PoisonError::into_inner);
        reg.desc.healthy_after_ms = Some(ms(started));
        reg.desc.save()?;
        Ok(Lab {
            reg,
            pg,
            health_timeout: opts.health_timeout,
        })
    }

    /// The content of `lab.json`.
    pub fn describe(&self) -> &LabDescription {
        &self.reg.desc
    }

    pub fn dir(&self) -> &Path {
        &self.reg.desc.dir
    }

    /// Invoker gRPC endpoints (`host:port`), node 1 first.
    pub fn invoker_endpoints(&self) -> Vec<String> {
        self.reg.desc.endpoints.invokers.clone()
    }

    pub fn process(&self, name: &str) -> Option<&ProcessInfo> {
        self.reg.desc.process(name)
    }

    /// True if the process runs (a paused one counts as running).
    pub fn is_running(&self, name: &str) -> bool {
        self.reg
            .proc_id(name)
            .is_ok_and(|(leader, _)| leader.alive())
    }

    /// SIGKILL to the process and its whole tree; waits until it is gone and reaps it.
    pub fn kill(&mut self, name: &str) -> Result<(), LabError> {
        let (leader, pgid) = self.reg.proc_id(name)?;
        if !leader.alive() {
            self.reg.reap_sync(name);
            return Err(LabError::NotRunning(name.to_string()));
        }
        let gone = proc::kill_tree(leader, pgid);
        self.reg.reap_sync(name);
        if gone {
            Ok(())
        } else {
            Err(LabError::StillRunning(vec![name.to_string()]))
        }
    }

    /// SIGSTOP to the whole tree: the process freezes (a gray failure).
    pub fn pause(&self, name: &str) -> Result<(), LabError> {
        let (leader, pgid) = self.reg.proc_id(name)?;
        proc::signal_tree(name, leader, pgid, Signal::SIGSTOP)
    }

    /// SIGCONT to the whole tree.
    pub fn resume(&self, name: &str) -> Result<(), LabError> {
        let (leader, pgid) = self.reg.proc_id(name)?;
        proc::signal_tree(name, leader, pgid, Signal::SIGCONT)
    }

    /// Graceful stop: SIGTERM (SIGINT for postgres), up to 10 s, then SIGKILL.
    pub async fn stop(&mut self, name: &str) -> Result<(), LabError> {
        let target = self.reg.target(name)?;
        if !target.leader.alive() {
            self.reg.reap_sync(name);
            return Err(LabError::NotRunning(name.to_string()));
        }
        let out = tokio::task::spawn_blocking(move || proc::terminate(&[target], STOP_GRACE))
            .await
            .map_err(|e| LabError::io("stopping", std::io::Error::other(e)))?;
        self.reap(name).await;
        if out.remaining.is_empty() {
            Ok(())
        } else {
            Err(LabError::StillRunning(out.remaining))
        }
    }

    /// Respawns the process with the same command, config and data directory (stopping it
    /// gracefully first if it still runs), records the new pid, and waits until it serves
    /// again (invoker: gRPC port open; etcd: takes a write; postgres: answers `select 1`).
    pub async fn restart(&mut self, name: &str) -> Result<(), LabError> {
        let spec = self
            .reg
            .specs
            .get(name)
            .cloned()
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        if self.is_running(name) {
            self.stop(name).await?;
        }
        let mut info = self
            .reg
            .desc
            .process(name)
            .cloned()
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        info.restarts += 1;
        self.reg.spawn(spec, info.clone())?;
        self.wait_ready(&info).await
    }

    /// Rebuilds `site`'s PostgreSQL as a streaming replica of `from_site`'s (after a failover
    /// promoted `from_site`): stops it, takes a fresh base backup, starts it, and waits until
    /// it streams. Whatever the old data directory held beyond the promotion point is gone:
    /// run the lost-transaction report first.
    pub async fn rebuild_replica(&mut self, site: &str, from_site: &str) -> Result<(), LabError> {
        let pg = self
            .pg
            .clone()
            .ok_or_else(|| LabError::Options("this lab runs no PostgreSQL".into()))?;
        let plan = |name: &str| -> Result<postgres::PgPlan, LabError> {
            let info = self
                .reg
                .desc
                .process(name)
                .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
            let addr = info.main_addr().unwrap_or_default();
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
            Ok(postgres::PgPlan {
                site: info.site.clone(),
                host: host.to_string(),
                port: port.parse().unwrap_or(0),
            })
        };
        let target = plan(&format!("postgres-{site}"))?;
        let source = plan(&format!("postgres-{from_site}"))?;
        let name = target.name();
        if self.is_running(&name) {
            // A fenced or frozen old primary: SIGCONT first so that it can be stopped.
            let _ = self.resume(&name);
            self.stop(&name).await?;
        }
        let dir = self.reg.desc.dir.clone();
        postgres::base_backup(&dir, &pg, &target, &source, self.health_timeout).await?;
        self.restart(&name).await?;
        let started = Instant::now();
        let deadline = started + self.health_timeout;
        let what = format!("{name} to stream from {}", source.name());
        let reg = &mut self.reg;
        poll_until(
            || reg.check_exited(Some(&name)),
            started,
            deadline,
            &what,
            || async {
                let n = postgres::psql(
                    &pg.bin,
                    &source.host,
                    source.port,
                    "postgres",
                    "select count(*) from pg_stat_replication where state = 'streaming'",
                )
                .await?;
                if n == "0" {
                    Err("no streaming replica yet".to_string())
                } else {
                    Ok(())
                }
            },
        )
        .await
    }

    async fn wait_ready(&mut self, info: &ProcessInfo) -> Result<(), LabError> {
        let started = Instant::now();
        let deadline = started + self.health_timeout;
        let addr = info.main_addr().unwrap_or_default().to_string();
        let admin = info.listen.get("admin").cloned().unwrap_or_default();
        let what = format!("{} to serve on {addr}", info.name);
        let pg = self.pg.clone();
        let reg = &mut self.reg;
        let check = || reg.check_exited(Some(&info.name));
        poll_until(check, started, deadline, &what, || {
            let addr = addr.clone();
            let admin = admin.clone();
            let pg = pg.clone();
            let kind = info.kind;
            async move {
                match (kind, pg) {
                    (ProcessKind::GiftApi, _) => services::http_ready(&addr).await,
                    // The proxy forwards every path; readiness is on the admin port.
                    (ProcessKind::Edge, _) => edge::ready(&admin).await,
                    // An agent serves nothing; running is all there is to check.
                    (ProcessKind::Agent, _) => Ok(()),
                    (ProcessKind::Invoker | ProcessKind::Wallet, _) => {
                        tokio::net::TcpStream::connect(&addr)
                            .await
                            .map(|_| ())
                            .map_err(|e| format!("{addr}: {e}"))
                    }
                    (ProcessKind::Etcd, _) => etcd::check(&format!("http://{addr}")).await,
                    (ProcessKind::Postgres, Some(pg)) => {
                        let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "0"));
                        let port = port.parse().unwrap_or(0);
                        postgres::psql(&pg.bin, host, port, "postgres", "select 1")
                            .await
                            .map(|_| ())
                    }
                    (ProcessKind::Postgres, None) => Err("no PostgreSQL set-up".into()),
                }
            }
        })
        .await
    }

    /// Stops everything gracefully (SIGTERM / SIGINT for postgres, up to 5 s, then SIGKILL)
    /// and reaps the children. Afterwards nothing of the lab runs.
    pub async fn down(mut self) -> Result<(), LabError> {
        let targets: Vec<Target> = self
            .reg
            .desc
            .processes
            .iter()
            .map(|p| Target::from(&p.pid_record()))
            .collect();
        let out = tokio::task::spawn_blocking(move || proc::terminate(&targets, DOWN_GRACE))
            .await
            .map_err(|e| LabError::io("stopping the lab", std::io::Error::other(e)))?;
        let names: Vec<String> = self.reg.children.keys().cloned().collect();
        for name in names {
            self.reap(&name).await;
        }
        if out.remaining.is_empty() {
            Ok(())
        } else {
            Err(LabError::StillRunning(out.remaining))
        }
    }

    /// Reaps a child that was told to exit (waits up to 5 s) and forgets it.
    async fn reap(&mut self, name: &str) {
        if let Some(mut child) = self.reg.children.remove(name) {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            }
        }
        PidRecord::remove(&self.reg.desc.dir, name);
    }

    /// Leaves every child running and returns the description (for `lab up --detach`);
    /// `lab down` / [`down_dir`] stop them later.
    pub fn detach(mut self) -> LabDescription {
        // Dropping a tokio Child neither kills nor waits for it.
        self.reg.children.clear();
        self.reg.desc.clone()
    }

    /// Reaps children that exited since the last call (foreground `lab up` reports them).
    pub fn poll_exits(&mut self) -> Vec<(String, String)> {
        self.reg.poll_exits(None)
    }

    /// Runs one SQL statement with `psql` against a postgres process of the lab (`postgres-a`,
    /// `postgres-b`) and returns the unaligned, tuples-only output.
    pub async fn psql(&self, name: &str, db: &str, sql: &str) -> Result<String, LabError> {
        let info = self
            .process(name)
            .filter(|p| p.kind == ProcessKind::Postgres)
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        let pg = self
            .pg
            .as_ref()
            .ok_or_else(|| LabError::UnknownProcess(name.to_string()))?;
        let addr = info.main_addr().unwrap_or_default();
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        postgres::psql(&pg.bin, host, port.parse().unwrap_or(0), db, sql)
            .await
            .map_err(|detail| LabError::CommandFailed {
                command: format!("psql -c {sql:?}"),
                status: "failed".into(),
                log: info.log.clone(),
                tail: detail,
            })
    }

    /// The current invoker leader: its node id and process name (`invoker-<id>`).
    pub async fn invoker_leader(&self, timeout: Duration) -> Result<(u64, String), LabError> {
        let client = InvokerClient::wait_for_leader(&self.invoker_endpoints(), timeout).await?;
        let status = client.status().await?;
        let id = status.leader_id;
        let name = self
            .reg
            .desc
            .processes
            .iter()
            .find(|p| p.node_id == Some(id))
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("invoker-{id}"));
        Ok((id, name))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Best effort and synchronous: a failing test must leave nothing running.
        self.reg.kill_all();
    }
}
