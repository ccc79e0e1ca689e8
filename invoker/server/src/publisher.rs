//! Publication of routing tables and writer records to every site's etcd, by the leader.
//!
//! The data plane in a site reads its routing and its strong services' writers from the
//! site's own etcd, so it keeps working on the last-known values when the invoker or the
//! link to it is gone (static stability). Keys, one JSON document each:
//!
//! - `/invoker/routing/<service>`: `{"version", "runs", "throttle_max_rps", "revision"}`
//! - `/invoker/writers/<service>`: `{"site", "epoch", "dsn", "revision", "failover_pending"}`
//!   (`failover_pending`: `{"proposal", "until_ms"}` while a failover of the service is
//!   pending, approved or executing: the site's wallets and gift-apis refuse payments fast;
//!   `until_ms` is the proposal's expiry, `i64::MAX` once approved)
//!
//! Every write is a compare-and-swap: the document is replaced only if the one in etcd is
//! still the one just read (its mod revision) and is older (a lower table version, or a lower
//! epoch). So a deposed leader that is still running cannot roll a site back, two leaders
//! never interleave half-written tables, and a new leader simply resumes: it reads what each
//! site has and writes what is missing. A site that fails is retried until it acknowledges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use invoker_domain::{RoutingTable, State, Writer};
use serde::{Deserialize, Serialize};

use crate::config::{PublicationConfig, PublishSite};
use crate::node::Node;

pub const ROUTING_PREFIX: &str = "/invoker/routing/";
pub const WRITERS_PREFIX: &str = "/invoker/writers/";

/// The routing document in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedRouting {
    pub version: u64,
    pub runs: Vec<invoker_domain::BucketRun>,
    #[serde(default)]
    pub throttle_max_rps: BTreeMap<String, u64>,
    /// The domain revision it was published from (for humans and debugging).
    pub revision: u64,
}

/// The writer document in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedWriter {
    pub site: String,
    pub epoch: u64,
    pub dsn: String,
    pub revision: u64,
    #[serde(default)]
    pub failover_pending: Option<FailoverPending>,
}

/// Payments pause while this proposal is open (until `until_ms`, leader wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPending {
    pub proposal: u64,
    pub until_ms: i64,
}

impl PublishedWriter {
    /// Whether `self` supersedes `old`: a higher epoch, or the same writer with a newer
    /// pending state (an epoch names one writer: the same epoch with another DSN is not newer).
    pub fn supersedes(&self, old: &PublishedWriter) -> bool {
        old.epoch < self.epoch
            || (old.epoch == self.epoch
                && old.site == self.site
                && old.dsn == self.dsn
                && old.revision < self.revision
                && old.failover_pending != self.failover_pending)
    }
}

/// Where one site's publication stands, as `invokerctl status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteProgress {
    pub published_revision: u64,
    pub target_revision: u64,
    pub acked_at_ms: i64,
    pub error: String,
    pub published_versions: BTreeMap<String, u64>,
}

/// Shared between the publisher tasks and the admin API.
#[derive(Debug, Default)]
pub struct Progress {
    sites: Mutex<BTreeMap<String, SiteProgress>>,
}

impl Progress {
    pub fn snapshot(&self) -> BTreeMap<String, SiteProgress> {
        match self.sites.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn update(&self, site: &str, f: impl FnOnce(&mut SiteProgress)) {
        let mut sites = match self.sites.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(sites.entry(site.to_string()).or_default());
    }

    fn clear(&self) {
        let mut sites = match self.sites.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        sites.clear();
    }
}

/// What one pass wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassResult {
    pub written: usize,
    /// Keys left alone because etcd already had the same or a newer document.
    pub current: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("etcd {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    #[error("a document in etcd at {key} is not ours: {message}")]
    Foreign { key: String, message: String },
}

fn etcd_err(site: &PublishSite) -> impl Fn(etcd_client::Error) -> PublishError + '_ {
    move |e| PublishError::Etcd {
        endpoints: site.etcd_endpoints.join(","),
        message: e.to_string(),
    }
}

/// Writes `value` at `key` if etcd has nothing there or an older document (`is_newer` says
/// whether ours supersedes what is there). Compare-and-swap on the key's mod revision, so a
/// concurrent writer makes the transaction fail and the next pass re-reads.
async fn cas_put<T: Serialize + for<'de> Deserialize<'de>>(
    client: &mut Client,
    site: &PublishSite,
    key: &str,
    value: &T,
    is_newer: impl Fn(&T) -> bool,
) -> Result<bool, PublishError> {
    let current = client.get(key, None).await.map_err(etcd_err(site))?;
    let compare = match current.kvs().first() {
        Some(kv) => {
            let existing: T =
                serde_json::from_slice(kv.value()).map_err(|e| PublishError::Foreign {
                    key: key.to_string(),
                    message: e.to_string(),
                })?;
            if !is_newer(&existing) {
                return Ok(false);
            }
            Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision())
        }
        // Absent: create only if still absent.
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    };
    let text = serde_json::to_vec(value).map_err(|e| PublishError::Foreign {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    let txn = Txn::new()
        .when([compare])
        .and_then([TxnOp::put(key, text, None)]);
    let response = client.txn(txn).await.map_err(etcd_err(site))?;
    if !response.succeeded() {
        return Err(PublishError::Etcd {
            endpoints: site.etcd_endpoints.join(","),
            message: format!("{key} changed while publishing; retrying"),
        });
    }
    Ok(true)
}

/// Publishes every routing table and writer of `state` to one site's etcd.
pub async fn publish_state(
    client: &mut Client,
    site: &PublishSite,
    state: &State,
) -> Result<PassResult, PublishError> {
    let mut result = PassResult::default();
    for (service, table) in &state.routing {
        let doc = routing_doc(table, state.revision);
        let key = format!("{ROUTING_PREFIX}{service}");
        if cas_put(client, site, &key, &doc, |old: &PublishedRouting| {
            old.version < doc.version
        })
        .await?
        {
            result.written += 1;
        } else {
            result.current += 1;
        }
    }
    for (service, writer) in &state.writers {
        let mut doc = writer_doc(writer, state.revision);
        doc.failover_pending = state
            .failover_pending(service)
            .map(|(proposal, until_ms)| FailoverPending { proposal, until_ms });
        let key = format!("{WRITERS_PREFIX}{service}");
        if cas_put(client, site, &key, &doc, |old: &PublishedWriter| {
            doc.supersedes(old)
        })
        .await?
        {
            result.written += 1;
        } else {
            result.current += 1;
        }
    }
    Ok(result)
}

fn routing_doc(table: &RoutingTable, revision: u64) -> PublishedRouting {
    PublishedRouting {
        version: table.version,
        runs: table.runs.clone(),
        throttle_max_rps: table.throttle_max_rps.clone(),
        revision,
    }
}

fn writer_doc(writer: &Writer, revision: u64) -> PublishedWriter {
    PublishedWriter {
        site: writer.site.clone(),
        epoch: writer.epoch,
        dsn: writer.dsn.clone(),
        revision,
        failover_pending: None,
    }
}

async fn connect(site: &PublishSite, timeout: Duration) -> Result<Client, PublishError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    Client::connect(&site.etcd_endpoints, Some(options))
        .await
        .map_err(etcd_err(site))
}

/// Publishes to every configured site while this node leads; one task per site, so a dead
/// site's etcd never holds back the others. Runs for the life of the node.
pub async fn run(node: Arc<Node>, config: PublicationConfig) {
    if config.sites.is_empty() {
        tracing::info!("no publication.sites configured: routing is not published to etcd");
        return;
    }
    let tasks: Vec<_> = config
        .sites
        .iter()
        .cloned()
        .map(|site| tokio::spawn(run_site(node.clone(), site, config.clone())))
        .collect();
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!("publisher task ended: {e}");
        }
    }
}

async fn run_site(node: Arc<Node>, site: PublishSite, config: PublicationConfig) {
    let retry = Duration::from_millis(config.retry_interval_ms);
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut events = node.sm.subscribe();
    let mut client: Option<Client> = None;
    // The revision this leader term has seen acknowledged; a new term starts from zero, so a
    // new leader re-reads every key once (cheap) and writes what the old one left undone.
    let mut acked: Option<u64> = None;
    let mut was_leader = false;
    loop {
        let leader = node.is_leader();
        if leader != was_leader {
            acked = None;
            was_leader = leader;
            if !leader {
                node.publications.clear();
            }
        }
        if leader {
            let behind = acked != Some(node.sm.read().await.state.revision);
            if behind {
                let state = node.sm.read().await.state.clone();
                node.publications
                    .update(&site.site, |p| p.target_revision = state.revision);
                let pass = async {
                    let c = match client.as_mut() {
                        Some(c) => c,
                        None => client.insert(connect(&site, timeout).await?),
                    };
                    publish_state(c, &site, &state).await
                };
                match tokio::time::timeout(timeout * 4, pass).await {
                    Ok(Ok(result)) => {
                        acked = Some(state.revision);
                        if result.written > 0 {
                            tracing::info!(site = %site.site, revision = state.revision, written = result.written, "routing published");
                        }
                        node.metrics.published_revision(&site.site, state.revision);
                        node.publications.update(&site.site, |p| {
                            p.published_revision = state.revision;
                            p.acked_at_ms = crate::now_ms();
                            p.error.clear();
                            p.published_versions = state
                                .routing
                                .iter()
                                .map(|(s, t)| (s.clone(), t.version))
                                .collect();
                        });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(site = %site.site, "publication failed: {e}; retrying");
                        node.metrics.publication_failed(&site.site);
                        node.publications
                            .update(&site.site, |p| p.error = e.to_string());
                        client = None;
                    }
                    Err(_) => {
                        tracing::warn!(site = %site.site, "publication timed out; retrying");
                        node.metrics.publication_failed(&site.site);
                        node.publications.update(&site.site, |p| {
                            p.error = format!("timed out after {} ms", timeout.as_millis() * 4)
                        });
                        client = None;
                    }
                }
            }
        }
        // Wake on the next applied change, or retry after the interval (a failed pass, a
        // leadership change, which no state machine event announces).
        tokio::select! {
            _ = events.recv() => {}
            () = tokio::time::sleep(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_as_json() {
        let doc = PublishedRouting {
            version: 3,
            runs: vec![invoker_domain::BucketRun::new("b", 1024)],
            throttle_max_rps: BTreeMap::from([("b".to_string(), 500)]),
            revision: 42,
        };
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(
            serde_json::from_str::<PublishedRouting>(&text).unwrap(),
            doc
        );
        assert!(text.contains("\"version\":3"));
    }

    #[test]
    fn a_writer_document_moves_forward_only() {
        let old = PublishedWriter {
            site: "a".into(),
            epoch: 1,
            dsn: "postgres://a".into(),
            revision: 10,
            failover_pending: None,
        };
        let pending = PublishedWriter {
            revision: 12,
            failover_pending: Some(FailoverPending {
                proposal: 1,
                until_ms: 99,
            }),
            ..old.clone()
        };
        assert!(pending.supersedes(&old));
        // The same content at a later revision is not rewritten.
        let same = PublishedWriter {
            revision: 20,
            ..old.clone()
        };
        assert!(!same.supersedes(&old));
        // An older revision never rolls the pending state back.
        assert!(!old.supersedes(&pending));
        let moved = PublishedWriter {
            site: "b".into(),
            epoch: 2,
            dsn: "postgres://b".into(),
            revision: 15,
            failover_pending: None,
        };
        assert!(moved.supersedes(&pending));
        assert!(!pending.supersedes(&moved));
        // Same epoch, another DSN: not newer.
        let other_dsn = PublishedWriter {
            dsn: "postgres://z".into(),
            revision: 30,
            ..moved.clone()
        };
        assert!(!other_dsn.supersedes(&moved));
        let text = serde_json::to_string(&pending).unwrap();
        assert!(
            text.contains("\"failover_pending\":{\"proposal\":1,\"until_ms\":99}"),
            "{text}"
        );
    }
}
