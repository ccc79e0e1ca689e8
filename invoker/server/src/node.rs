//! One invoker node: raft, storage, the gRPC server and the metrics endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use invoker_api::pb;
use invoker_domain::{Command, DomainError, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::network::Network;
use crate::store::{self, SmView};
use crate::types::{Member, NodeId, Raft, RaftMetrics};
use crate::InvokerError;

/// How long adding a member may wait for the new node to catch up as a learner.
const ADD_LEARNER_TIMEOUT_MS: u64 = 30_000;

/// Why a write or a linearizable read did not happen here.
#[derive(Debug)]
pub enum ProposeError {
    /// This node is not the leader; the leader's address when known.
    NotLeader(Option<String>),
    /// The state machine refused the command; nothing changed.
    Refused(DomainError),
    /// Raft could not commit (no quorum, shutting down, ...). The outcome may be unknown.
    Raft(String),
}

/// A running node's shared parts.
pub struct Node {
    pub id: NodeId,
    pub site: String,
    pub addr: String,
    pub raft: Raft,
    pub sm: SmView,
    committed_index: Arc<AtomicU64>,
    /// openraft allows one membership change at a time; serialise them here.
    membership_lock: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    /// Where the leader's publication to each site's etcd stands.
    pub publications: crate::publisher::Progress,
    /// The leader's failover policy as the admin API shows it.
    pub policy_view: crate::policy_loop::ViewCell,
    /// The invoker config's `[policy]` table (checked at load).
    pub policy_overrides: toml::Table,
    /// Who may approve failovers, and how many distinct approvers a failover needs.
    pub authenticator: Box<dyn crate::auth::Authenticator>,
    pub approvals_required: u32,
    pub proposal_ttl_ms: u64,
    /// The site agents connected to this node, for failover commands.
    pub directory: crate::executor::Directory,
    pub writer_lease: crate::executor::LeaseConfig,
    /// What the writer sites' agents last said about their standbys (zero-loss mode).
    pub standbys: crate::replication::Standbys,
}

impl Node {
    /// Opens storage and starts raft. Serving is separate: see [`serve`].
    pub async fn start(config: &Config) -> Result<Arc<Node>, InvokerError> {
        let (log_store, state_machine) = store::open(&config.data_dir).await?;
        let committed_index = log_store.committed_index();
        let sm = state_machine.view();
        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "invoker".into(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            install_snapshot_timeout: r.rpc_timeout_ms.max(200) * 5,
            ..Default::default()
        }
        .validate()
        .map_err(|e| InvokerError::Config(format!("raft: {e}")))?;
        // Bind outgoing raft connections to our own address unless we listen on a wildcard.
        let local_ip = Some(config.listen_addr.ip()).filter(|ip| !ip.is_unspecified());
        let network = Network::new(Duration::from_millis(r.rpc_timeout_ms), local_ip);
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| InvokerError::Raft(e.to_string()))?;
        Ok(Arc::new(Node {
            id: config.node_id,
            site: config.site.clone(),
            addr: config.advertise_addr(),
            raft,
            sm,
            committed_index,
            membership_lock: tokio::sync::Mutex::new(()),
            metrics: Arc::new(Metrics::new()),
            publications: Default::default(),
            policy_view: Default::default(),
            policy_overrides: config.policy.clone(),
            authenticator: Box::new(crate::auth::TokenAuthenticator::new(&config.approvals)),
            approvals_required: config.approvals.required,
            proposal_ttl_ms: config.approvals.proposal_ttl_ms,
            directory: Default::default(),
            writer_lease: config.writer_lease.clone(),
            standbys: Default::default(),
        }))
    }

    /// Creates the cluster from the configured initial members if this node has never been
    /// part of one. Every initial member may call this with the same membership: raft lets
    /// only one such membership win, and a node with any log refuses it.
    pub async fn bootstrap(&self, config: &Config) -> Result<(), InvokerError> {
        if config.initial_members.is_empty() {
            return Ok(());
        }
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| InvokerError::Raft(e.to_string()))?;
        if initialized {
            tracing::info!("raft state found on disk; not bootstrapping");
            return Ok(());
        }
        let members: BTreeMap<NodeId, Member> = config
            .initial_members
            .iter()
            .map(|m| {
                (
                    m.id,
                    Member {
                        addr: m.addr.clone(),
                        site: m.site.clone(),
                    },
                )
            })
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => tracing::info!("bootstrapped a new cluster from initial_members"),
            // Another node's membership reached us first: fine.
            Err(RaftError::APIError(e)) => tracing::info!("not bootstrapping: {e}"),
            Err(e) => return Err(InvokerError::Raft(e.to_string())),
        }
        Ok(())
    }

    pub fn raft_metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    pub fn commit_index(&self) -> u64 {
        self.committed_index.load(Ordering::Relaxed)
    }

    /// Is this node the leader right now (as far as its raft core knows)?
    pub fn is_leader(&self) -> bool {
        self.raft_metrics().current_leader == Some(self.id)
    }

    /// The leader's id and address, when known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft_metrics();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())?;
        Some((leader, addr))
    }

    /// Commits a request through raft (on the leader) and returns its log index and result.
    #[tracing::instrument(name = "invoker.propose", skip_all, fields(command = request.command.name(), node = self.id))]
    pub async fn propose(&self, request: Request) -> Result<(u64, Response), ProposeError> {
        let command = request.command.name();
        let started = Instant::now();
        let result = self.raft.client_write(request).await;
        let outcome = match result {
            Ok(reply) => match reply.data {
                Response::Refused(e) => Err(ProposeError::Refused(e)),
                other => Ok((reply.log_id.index, other)),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader(f.leader_node.map(|n| n.addr)))
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        };
        self.metrics
            .record_write(command, &outcome, started.elapsed());
        outcome
    }

    /// Waits until this node is confirmed leader by a quorum and has applied everything
    /// committed before the call: a read after it is linearizable.
    #[tracing::instrument(name = "invoker.read_barrier", skip_all)]
    pub async fn linearizable_barrier(&self) -> Result<(), ProposeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader(f.leader_node.map(|n| n.addr)))
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// Adds a voter: first as a learner that catches up, then promoted.
    pub async fn add_member(&self, id: NodeId, member: Member) -> Result<u64, ProposeError> {
        let _guard = self.membership_lock.lock().await;
        let add = self.raft.add_learner(id, member, true);
        match tokio::time::timeout(Duration::from_millis(ADD_LEARNER_TIMEOUT_MS), add).await {
            Err(_) => {
                return Err(ProposeError::Raft(format!(
                    "node {id} did not catch up as a learner within {ADD_LEARNER_TIMEOUT_MS} ms; is it running and reachable?"
                )))
            }
            Ok(Err(e)) => return Err(membership_error(e)),
            Ok(Ok(_)) => {}
        }
        let voters = BTreeSet::from([id]);
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(membership_error)
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<u64, ProposeError> {
        let _guard = self.membership_lock.lock().await;
        let voters = BTreeSet::from([id]);
        let index = self
            .raft
            .change_membership(ChangeMembers::RemoveVoters(voters), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(membership_error)?;
        // A removed learner record would keep receiving logs: drop it too.
        let learners = BTreeSet::from([id]);
        let _ = self
            .raft
            .change_membership(ChangeMembers::RemoveNodes(learners), false)
            .await;
        Ok(index)
    }

    /// The members as the status API shows them.
    pub fn members(&self) -> Vec<pb::Member> {
        let m = self.raft_metrics();
        members_of(&m)
    }
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ProposeError::NotLeader(f.leader_node.map(|n| n.addr))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ProposeError::Raft(format!("membership change refused: {e}"))
        }
        other => ProposeError::Raft(other.to_string()),
    }
}

pub(crate) fn members_of(m: &RaftMetrics) -> Vec<pb::Member> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let matched: BTreeMap<NodeId, u64> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, log)| (*id, log.map(|l| l.index).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    membership
        .nodes()
        .map(|(id, node)| pb::Member {
            id: *id,
            addr: node.addr.clone(),
            site: node.site.clone(),
            voter: voters.contains(id),
            matched_index: matched.get(id).copied().unwrap_or(0),
        })
        .collect()
}

pub(crate) fn node_state(state: ServerState) -> pb::NodeState {
    match state {
        ServerState::Leader => pb::NodeState::Leader,
        ServerState::Follower => pb::NodeState::Follower,
        ServerState::Candidate => pb::NodeState::Candidate,
        ServerState::Learner => pb::NodeState::Learner,
        ServerState::Shutdown => pb::NodeState::Shutdown,
    }
}

/// Builds the request the state machine applies, stamped with this node's clock.
pub fn domain_request(actor: &str, reason: &str, command: Command) -> Request {
    Request {
        actor: actor.to_string(),
        reason: reason.to_string(),
        at_ms: crate::now_ms(),
        command,
    }
}

/// Serves gRPC (and /metrics when configured) until `shutdown` resolves, then shuts raft down.
pub async fn serve(
    node: Arc<Node>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), InvokerError> {
    let listener =
        TcpListener::bind(config.listen_addr)
            .await
            .map_err(|e| InvokerError::Listen {
                addr: config.listen_addr.to_string(),
                reason: e.to_string(),
            })?;
    let metrics_listener = match config.metrics_addr {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| InvokerError::Listen {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?,
        ),
    };
    tracing::info!(
        node = node.id,
        site = %node.site,
        grpc = %config.listen_addr,
        metrics = ?config.metrics_addr,
        "invoker listening"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    if let Some(listener) = metrics_listener {
        let node = node.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, node, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            {
                tracing::error!("metrics endpoint stopped: {e}");
            }
        });
    }
    tokio::spawn(crate::metrics::follow_raft(node.clone()));
    tokio::spawn(crate::executor::run(
        node.clone(),
        config.writer_lease.clone(),
    ));
    tokio::spawn(crate::replication::run(
        node.clone(),
        config.writer_lease.clone(),
    ));
    tokio::spawn(crate::publisher::run(
        node.clone(),
        config.publication.clone(),
    ));

    let mut stop = stop_rx.clone();
    let grpc = crate::grpc::router(node.clone())?;
    // Nagle off on every accepted connection: the server builder's tcp_nodelay applies only
    // to listeners tonic binds itself, and with Nagle on, each small gRPC reply waits for the
    // peer's delayed ACK (~40 ms per request).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = grpc
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    tracing::info!("gRPC server stopped; shutting raft down");
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    served.map_err(|e| InvokerError::Serve(e.to_string()))
}
