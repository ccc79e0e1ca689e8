//! One probing round: every known instance and database, concurrently, each with its own
//! deadline.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::AgentConfig;
use crate::discovery::{discover, Instance};
use crate::AgentError;

/// How long an instance that left its registry is still probed (and reported failing).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The service a site's database backs (its ledger is what the probe reads).
pub const DATABASE_SERVICE: &str = "wallet";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceResult {
    pub service: String,
    pub instance: String,
    pub address: String,
    pub site: String,
    pub healthy: bool,
    pub latency_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed rounds in a row (0 when healthy).
    pub consecutive_failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseRole {
    Primary,
    Replica,
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseResult {
    pub site: String,
    pub service: String,
    pub role: DatabaseRole,
    /// Primary: `pg_current_wal_lsn()` as a byte position.
    pub current_wal_lsn: Option<u64>,
    /// Replica: what it has received and replayed.
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    /// Replica: age of the last replayed transaction when behind, 0 when caught up.
    pub replay_lag_ms: Option<u64>,
    /// The wallet ledger's latest sequence (what a failover may lose is the gap).
    pub ledger_sequence: Option<u64>,
    pub fencing_epoch: Option<u64>,
    pub read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerResult {
    pub target_site: String,
    /// `<service>/<instance>`.
    pub target: String,
    pub reachable: bool,
    pub latency_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What one round saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Round {
    pub agent_id: String,
    pub site: String,
    /// Strictly increasing, across restarts too (it starts from the clock).
    pub seq: u64,
    pub observed_at_ms: u64,
    /// This agent's own site, probed closely.
    pub instances: Vec<InstanceResult>,
    pub databases: Vec<DatabaseResult>,
    /// Other sites' instances: reachable from here or not.
    pub peers: Vec<PeerResult>,
    /// Sites whose registry could not be read this round (their last known instances were
    /// probed).
    pub discovery_errors: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Probes with state: the known instances, failure streaks, connections.
pub struct Prober {
    config: AgentConfig,
    http: reqwest::Client,
    grpc: BTreeMap<String, HealthClient<Channel>>,
    databases: BTreeMap<String, PgPool>,
    known: BTreeMap<String, BTreeMap<(String, String), Instance>>,
    /// Instances that left their registry (a dead process's lease ran out) and when: they are
    /// still probed, and fail, until `FORGET_AFTER`, so that a site whose instances all died
    /// reads as a failing service rather than as one with nothing to report.
    vanished: BTreeMap<(String, String, String), Instant>,
    last_discovery: Option<Instant>,
    failures: BTreeMap<(String, String, String), u32>,
    seq: u64,
}

/// The SQL of a database probe: one round trip. LSNs as byte positions (`lsn - '0/0'`).
const DATABASE_PROBE: &str = "SELECT pg_is_in_recovery() AS recovery, \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_lsn() - '0/0')::bigint END AS current_lsn, \
    (pg_last_wal_receive_lsn() - '0/0')::bigint AS receive_lsn, \
    (pg_last_wal_replay_lsn() - '0/0')::bigint AS replay_lsn, \
    CASE WHEN NOT pg_is_in_recovery() THEN NULL \
         WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::bigint \
         ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END AS lag_ms, \
    (SELECT coalesce(max(seq), 0) FROM wallet.ledger) AS ledger_seq, \
    (SELECT epoch FROM wallet.fencing) AS epoch, \
    current_setting('default_transaction_read_only') = 'on' AS read_only";

impl Prober {
    pub fn new(config: AgentConfig) -> Result<Prober, AgentError> {
        let timeout = Duration::from_millis(config.probe_timeout_ms);
        let http = reqwest::Client::builder()
            .local_address(config.bind_ip)
            .timeout(timeout)
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| AgentError::Config(format!("HTTP client: {e}")))?;
        let mut databases = BTreeMap::new();
        for site in &config.sites {
            if let Some(url) = &site.database_url {
                // Named like every agent connection, so that a fence leaves it alone.
                let options = PgConnectOptions::from_str(url)
                    .map_err(|e| {
                        AgentError::Config(format!("sites.{}.database_url: {e}", site.site))
                    })?
                    .application_name(&format!("{} probe", crate::db::APPLICATION_NAME));
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(options);
                databases.insert(site.site.clone(), pool);
            }
        }
        Ok(Prober {
            config,
            http,
            grpc: BTreeMap::new(),
            databases,
            known: BTreeMap::new(),
            vanished: BTreeMap::new(),
            last_discovery: None,
            failures: BTreeMap::new(),
            // Sequence numbers must keep growing across restarts of the agent (the leader
            // refuses anything not above the last it accepted): start from the clock, in
            // microseconds, and count up by one per round.
            seq: now_ms().saturating_mul(1000),
        })
    }

    async fn refresh(&mut self, errors: &mut Vec<String>) {
        let due = self.last_discovery.is_none_or(|at| {
            at.elapsed() >= Duration::from_millis(self.config.discovery_interval_ms)
        });
        if !due {
            return;
        }
        self.last_discovery = Some(Instant::now());
        let timeout = Duration::from_millis(self.config.probe_timeout_ms.max(500));
        let lookups = self.config.sites.iter().map(|s| async move {
            let found =
                tokio::time::timeout(timeout, discover(&s.site, &s.etcd_endpoints, timeout)).await;
            (s.site.clone(), found)
        });
        for (site, found) in futures::future::join_all(lookups).await {
            match found {
                Ok(Ok(mut instances)) => {
                    let previous = self.known.remove(&site).unwrap_or_default();
                    for (key, instance) in previous {
                        let id = (site.clone(), key.0.clone(), key.1.clone());
                        if instances.contains_key(&key) {
                            self.vanished.remove(&id);
                            continue;
                        }
                        let since = *self.vanished.entry(id.clone()).or_insert_with(Instant::now);
                        if since.elapsed() < FORGET_AFTER {
                            instances.insert(key, instance);
                        } else {
                            self.vanished.remove(&id);
                        }
                    }
                    self.known.insert(site, instances);
                }
                Ok(Err(e)) => errors.push(format!("{site}: {e}")),
                Err(_) => errors.push(format!("{site}: registry read timed out")),
            }
        }
    }

    fn health_client(&mut self, address: &str) -> Option<HealthClient<Channel>> {
        if let Some(c) = self.grpc.get(address) {
            return Some(c.clone());
        }
        let timeout = Duration::from_millis(self.config.probe_timeout_ms);
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(timeout)
            .timeout(timeout)
            .local_address(self.config.bind_ip)
            .connect_lazy();
        let client = HealthClient::new(channel);
        self.grpc.insert(address.to_string(), client.clone());
        Some(client)
    }

    /// One round: refreshes the instance lists when due, then probes everything at once.
    pub async fn round(&mut self) -> Round {
        let mut discovery_errors = Vec::new();
        self.refresh(&mut discovery_errors).await;
        let timeout = Duration::from_millis(self.config.probe_timeout_ms);
        let targets: Vec<Instance> = self
            .known
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        let mut probes = Vec::new();
        for instance in targets {
            let grpc = if instance.address.starts_with("http") {
                None
            } else {
                self.health_client(&instance.address)
            };
            let http = self.http.clone();
            probes.push(async move {
                let started = Instant::now();
                let result =
                    tokio::time::timeout(timeout, probe_instance(&http, grpc, &instance.address))
                        .await;
                let error = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some(format!("no answer within {} ms", timeout.as_millis())),
                };
                (instance, micros(started.elapsed()), error)
            });
        }
        let database_probes = self.databases.iter().map(|(site, pool)| async move {
            let result =
                tokio::time::timeout(timeout, sqlx::query(DATABASE_PROBE).fetch_one(pool)).await;
            database_result(
                site,
                result.map_err(|_| format!("no answer within {} ms", timeout.as_millis())),
            )
        });
        let (probed, databases) = futures::future::join(
            futures::future::join_all(probes),
            futures::future::join_all(database_probes),
        )
        .await;
        self.seq += 1;
        let mut instances = Vec::new();
        let mut peers = Vec::new();
        for (instance, latency_us, error) in probed {
            if self.config.is_local(&instance.site) {
                let key = (
                    instance.site.clone(),
                    instance.service.clone(),
                    instance.instance.clone(),
                );
                let streak = self.failures.entry(key).or_insert(0);
                *streak = if error.is_none() {
                    0
                } else {
                    streak.saturating_add(1)
                };
                instances.push(InstanceResult {
                    service: instance.service,
                    instance: instance.instance,
                    address: instance.address,
                    site: instance.site,
                    healthy: error.is_none(),
                    latency_us,
                    error,
                    consecutive_failures: *streak,
                });
            } else {
                peers.push(PeerResult {
                    target_site: instance.site,
                    target: format!("{}/{}", instance.service, instance.instance),
                    reachable: error.is_none(),
                    latency_us,
                    error,
                });
            }
        }
        Round {
            agent_id: self.config.agent_id(),
            site: self.config.site.clone(),
            seq: self.seq,
            observed_at_ms: now_ms(),
            instances,
            databases,
            peers,
            discovery_errors,
        }
    }
}

async fn probe_instance(
    http: &reqwest::Client,
    grpc: Option<HealthClient<Channel>>,
    address: &str,
) -> Result<(), String> {
    match grpc {
        None => {
            let response = http
                .get(format!("{address}/readyz"))
                .send()
                .await
                .map_err(|e| format!("GET /readyz: {e}"))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET /readyz: {}", response.status()))
            }
        }
        Some(mut client) => {
            let reply = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|e| format!("grpc.health.v1: {}", e.message()))?;
            match reply.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("grpc.health.v1: {other:?}")),
            }
        }
    }
}

fn database_result(
    site: &str,
    result: Result<Result<sqlx::postgres::PgRow, sqlx::Error>, String>,
) -> DatabaseResult {
    let unreachable = |error: String| DatabaseResult {
        site: site.to_string(),
        service: DATABASE_SERVICE.to_string(),
        role: DatabaseRole::Unreachable,
        current_wal_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        replay_lag_ms: None,
        ledger_sequence: None,
        fencing_epoch: None,
        read_only: None,
        error: Some(error),
    };
    let row = match result {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(e) => return unreachable(e),
    };
    let get = |name: &str| {
        row.try_get::<Option<i64>, _>(name)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
    };
    let recovery: bool = row.try_get("recovery").unwrap_or(false);
    DatabaseResult {
        site: site.to_string(),
        service: DATABASE_SERVICE.to_string(),
        role: if recovery {
            DatabaseRole::Replica
        } else {
            DatabaseRole::Primary
        },
        current_wal_lsn: get("current_lsn"),
        receive_lsn: get("receive_lsn"),
        replay_lsn: get("replay_lsn"),
        replay_lag_ms: get("lag_ms"),
        ledger_sequence: get("ledger_seq"),
        fencing_epoch: get("epoch"),
        read_only: row.try_get("read_only").ok(),
        error: None,
    }
}
