//! The admin / console API.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use invoker_api::pb::admin_client::AdminClient;
use invoker_api::{convert, pb, FORWARDED_HEADER};
use invoker_domain::{
    validate_id, validate_text, Command, Outcome, Response as DomainResponse, BUCKETS,
};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{domain_status, propose_status};
use crate::node::{domain_request, members_of, node_state, Node, ProposeError};
use crate::store::SmEvent;
use crate::types::Member;

/// Most audit entries returned by one call.
const MAX_AUDIT_PAGE: usize = 10_000;
/// Buffered watch events per watcher before the watcher counts as slow.
const WATCH_CHANNEL: usize = 1_024;

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }

    /// A client of the leader for forwarding, unless this request was already forwarded once
    /// (then the caller gets the error: no forwarding loops while leadership moves).
    fn leader_client<T>(
        &self,
        request: &Request<T>,
        error: ProposeError,
    ) -> Result<AdminClient<Channel>, Status> {
        let ProposeError::NotLeader(Some(addr)) = &error else {
            return Err(propose_status(error));
        };
        if request.metadata().contains_key(FORWARDED_HEADER) || *addr == self.node.addr {
            return Err(propose_status(error));
        }
        self.node.metrics.forwarded.inc();
        tracing::debug!(leader = %addr, "forwarding to the leader");
        let channel = invoker_api::client::channel(addr)
            .map_err(|e| Status::unavailable(format!("cannot reach the leader {addr}: {e}")))?;
        Ok(AdminClient::new(channel))
    }

    async fn barrier_or_forward<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<AdminClient<Channel>>, Status> {
        match self.node.linearizable_barrier().await {
            Ok(()) => Ok(None),
            Err(e) => self.leader_client(request, e).map(Some),
        }
    }
}

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    request
}

/// The answer to a committed routing or throttle change; a failed proposal comes back for the
/// caller to forward to the leader.
fn routing_reply(
    service: &str,
    result: Result<(u64, DomainResponse), ProposeError>,
) -> Result<Result<Response<pb::SetRoutingResponse>, Status>, ProposeError> {
    match result? {
        (log_index, DomainResponse::Applied(Outcome::Routing { table, changed })) => {
            tracing::info!(changed, version = table.version, "routing table set");
            Ok(Ok(Response::new(pb::SetRoutingResponse {
                table: Some(convert::routing_to_pb(service, &table)),
                changed,
                log_index,
            })))
        }
        (_, other) => Ok(Err(Status::internal(format!(
            "unexpected result {other:?}"
        )))),
    }
}

fn check_actor_reason(actor: &str, reason: &str) -> Result<(), Status> {
    validate_text("actor", actor, true).map_err(|e| domain_status(&e))?;
    validate_text("reason", reason, true).map_err(|e| domain_status(&e))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let m = self.node.raft_metrics();
        let (leader_id, leader_addr) = self.node.leader().unwrap_or((0, String::new()));
        let data = self.node.sm.read().await;
        let state = &data.state;
        let routing = state
            .routing
            .iter()
            .map(|(service, table)| pb::RoutingShare {
                service: service.clone(),
                class: state
                    .services
                    .get(service)
                    .map(|s| convert::class_to_pb(s.class) as i32)
                    .unwrap_or(0),
                version: table.version,
                buckets_per_site: table
                    .share()
                    .into_iter()
                    .map(|(site, n)| (site, n as u32))
                    .collect(),
                writer: state
                    .writers
                    .get(service)
                    .map(|w| convert::writer_to_pb(service, w)),
                lease: state.leases.get(service).map(convert::lease_to_pb),
                synchronous_replication: state
                    .sync_replication
                    .get(service)
                    .is_some_and(|s| s.enabled),
                synchronous_relaxed: state
                    .sync_replication
                    .get(service)
                    .is_some_and(|s| s.enabled && s.relaxed),
                synchronous_reason: state
                    .sync_replication
                    .get(service)
                    .map(|s| s.reason.clone())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ClusterStatus {
            node_id: self.node.id,
            node_site: self.node.site.clone(),
            state: node_state(m.state) as i32,
            leader_id,
            leader_addr,
            term: m.current_term,
            commit_index: self.node.commit_index(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members: members_of(&m),
            routing,
            revision: state.revision,
            publications: self
                .node
                .publications
                .snapshot()
                .into_iter()
                .map(|(site, p)| pb::SitePublication {
                    site,
                    published_revision: p.published_revision,
                    target_revision: p.target_revision,
                    acked_at_ms: p.acked_at_ms,
                    error: p.error,
                    published_versions: p.published_versions.into_iter().collect(),
                })
                .collect(),
            policy_paused: state.policy_paused,
        }))
    }

    #[tracing::instrument(name = "admin.set_throttle", skip_all, fields(service = %request.get_ref().service, site = %request.get_ref().site))]
    async fn set_throttle(
        &self,
        request: Request<pb::SetThrottleRequest>,
    ) -> Result<Response<pb::SetRoutingResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        validate_id("service name", &msg.service).map_err(|e| domain_status(&e))?;
        validate_id("site", &msg.site).map_err(|e| domain_status(&e))?;
        let command = Command::SetThrottle {
            service: msg.service.clone(),
            site: msg.site.clone(),
            max_rps: (msg.max_rps != 0).then_some(msg.max_rps),
        };
        let result = self
            .node
            .propose(domain_request(&msg.actor, &msg.reason, command))
            .await;
        match routing_reply(&msg.service, result) {
            Ok(reply) => reply,
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader.set_throttle(forwarded(request.into_inner())).await
            }
        }
    }

    #[tracing::instrument(name = "admin.set_policy_mode", skip_all, fields(paused = request.get_ref().paused))]
    async fn set_policy_mode(
        &self,
        request: Request<pb::SetPolicyModeRequest>,
    ) -> Result<Response<pb::SetPolicyModeResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        let command = Command::SetPolicyPaused { paused: msg.paused };
        match self
            .node
            .propose(domain_request(&msg.actor, &msg.reason, command))
            .await
        {
            Ok((log_index, DomainResponse::Applied(Outcome::PolicyMode { paused, changed }))) => {
                tracing::warn!(paused, changed, actor = %msg.actor, "failover policy mode set");
                Ok(Response::new(pb::SetPolicyModeResponse {
                    paused,
                    changed,
                    log_index,
                }))
            }
            Ok((_, other)) => Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader
                    .set_policy_mode(forwarded(request.into_inner()))
                    .await
            }
        }
    }

    async fn set_replication_mode(
        &self,
        request: Request<pb::SetReplicationModeRequest>,
    ) -> Result<Response<pb::SetReplicationModeResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        validate_id("service name", &msg.service).map_err(|e| domain_status(&e))?;
        let command = Command::SetSyncReplication {
            service: msg.service.clone(),
            enabled: msg.synchronous,
        };
        match self
            .node
            .propose(domain_request(&msg.actor, &msg.reason, command))
            .await
        {
            Ok((
                log_index,
                DomainResponse::Applied(Outcome::Replication {
                    enabled,
                    relaxed,
                    changed,
                }),
            )) => {
                tracing::warn!(service = %msg.service, enabled, changed, actor = %msg.actor, "zero-loss mode set");
                Ok(Response::new(pb::SetReplicationModeResponse {
                    synchronous: enabled,
                    relaxed,
                    changed,
                    log_index,
                }))
            }
            Ok((_, other)) => Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(ProposeError::Refused(e)) => Err(domain_status(&e)),
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader
                    .set_replication_mode(forwarded(request.into_inner()))
                    .await
            }
        }
    }

    async fn get_policy_view(
        &self,
        request: Request<pb::GetPolicyViewRequest>,
    ) -> Result<Response<pb::PolicyView>, Status> {
        // Only the leader runs the policy; anyone else forwards.
        if !self.node.is_leader() {
            let error = ProposeError::NotLeader(self.node.leader().map(|(_, addr)| addr));
            let mut leader = self.leader_client(&request, error)?;
            return leader
                .get_policy_view(forwarded(request.into_inner()))
                .await;
        }
        let view = self.node.policy_view.get();
        let record = |r: &crate::policy_loop::DecisionRecord| pb::PolicyDecisionView {
            service: r.service.clone(),
            label: r.label.clone(),
            classification: r.classification.clone(),
            decided_at_ms: i64::try_from(r.decided_at_ms).unwrap_or(i64::MAX),
            detail: r.detail.clone(),
            status: r.status.clone(),
            log_index: r.log_index,
            evidence: r.evidence.iter().map(convert::evidence_to_pb).collect(),
        };
        Ok(Response::new(pb::PolicyView {
            leader_id: self.node.id,
            paused: view.paused,
            running: view.running,
            evaluated_at_ms: i64::try_from(view.evaluated_at_ms).unwrap_or(i64::MAX),
            sites: view
                .sites
                .iter()
                .map(|(site, a)| pb::SiteView {
                    site: site.clone(),
                    classification: a.class.as_str().to_string(),
                    services: a
                        .services
                        .iter()
                        .map(|(s, c)| (s.clone(), c.as_str().to_string()))
                        .collect(),
                    evidence: a.evidence.iter().map(convert::evidence_to_pb).collect(),
                })
                .collect(),
            pending: view.pending.iter().map(record).collect(),
            recent: view.recent.iter().map(record).collect(),
            observers_last_seen_ms: view.observers_last_seen_ms.into_iter().collect(),
        }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::DomainState>, Status> {
        if request.get_ref().consistency() == pb::ReadConsistency::Linearizable {
            if let Some(mut leader) = self.barrier_or_forward(&request).await? {
                return leader.get_state(forwarded(request.into_inner())).await;
            }
        }
        let data = self.node.sm.read().await;
        Ok(Response::new(convert::state_to_pb(&data.state)))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_CHANNEL);
        let sm = self.node.sm.clone();
        tokio::spawn(async move {
            // Subscribe before the first read: no change can fall between them.
            let mut events = sm.subscribe();
            let mut revision = {
                let data = sm.read().await;
                let snapshot = convert::state_to_pb(&data.state);
                let revision = snapshot.revision;
                if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
                    return;
                }
                revision
            };
            loop {
                let resync = match events.recv().await {
                    Ok(SmEvent::Changes {
                        revision: r,
                        changes,
                    }) => {
                        if r <= revision {
                            continue; // already in the snapshot sent
                        }
                        revision = r;
                        for change in changes.iter() {
                            let event = pb::WatchEvent {
                                revision: r,
                                event: Some(convert::change_to_pb(change)),
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        false
                    }
                    Ok(SmEvent::Reset) | Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return,
                };
                if resync {
                    let data = sm.read().await;
                    let snapshot = convert::state_to_pb(&data.state);
                    revision = snapshot.revision;
                    if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_routing(
        &self,
        request: Request<pb::GetRoutingRequest>,
    ) -> Result<Response<pb::RoutingTable>, Status> {
        validate_id("service name", &request.get_ref().service).map_err(|e| domain_status(&e))?;
        if request.get_ref().consistency() == pb::ReadConsistency::Linearizable {
            if let Some(mut leader) = self.barrier_or_forward(&request).await? {
                return leader.get_routing(forwarded(request.into_inner())).await;
            }
        }
        let service = &request.get_ref().service;
        let data = self.node.sm.read().await;
        let table = data
            .state
            .routing
            .get(service)
            .ok_or_else(|| Status::not_found(format!("unknown service {service:?}")))?;
        Ok(Response::new(convert::routing_to_pb(service, table)))
    }

    #[tracing::instrument(name = "admin.set_routing", skip_all, fields(service = %request.get_ref().service))]
    async fn set_routing(
        &self,
        request: Request<pb::SetRoutingRequest>,
    ) -> Result<Response<pb::SetRoutingResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        validate_id("service name", &msg.service).map_err(|e| domain_status(&e))?;
        // Bounded before anything else: a table has at most one run per bucket.
        if msg.runs.len() > BUCKETS {
            return Err(Status::invalid_argument(format!(
                "routing table has {} runs; a table has at most {BUCKETS}",
                msg.runs.len()
            )));
        }
        let got = invoker_domain::runs_len(&convert::runs_from_pb(&msg.runs));
        if got != BUCKETS as u64 {
            return Err(Status::invalid_argument(format!(
                "routing table has {got} buckets; it must have exactly {BUCKETS}"
            )));
        }
        let command = Command::SetRouting {
            service: msg.service.clone(),
            runs: convert::runs_from_pb(&msg.runs),
            expected_version: (msg.expected_version != 0).then_some(msg.expected_version),
        };
        let result = self
            .node
            .propose(domain_request(&msg.actor, &msg.reason, command))
            .await;
        match routing_reply(&msg.service, result) {
            Ok(reply) => reply,
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader.set_routing(forwarded(request.into_inner())).await
            }
        }
    }

    #[tracing::instrument(name = "admin.apply_topology", skip_all)]
    async fn apply_topology(
        &self,
        request: Request<pb::ApplyTopologyRequest>,
    ) -> Result<Response<pb::ApplyTopologyResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        let topology = msg
            .topology
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("topology is missing"))?;
        let topology = convert::topology_from_pb(topology)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        topology.validate().map_err(|e| domain_status(&e))?;
        let command = Command::ApplyTopology(topology);
        match self
            .node
            .propose(domain_request(&msg.actor, &msg.reason, command))
            .await
        {
            Ok((log_index, DomainResponse::Applied(Outcome::Topology { changes, notes }))) => {
                Ok(Response::new(pb::ApplyTopologyResponse {
                    changes,
                    notes,
                    log_index,
                }))
            }
            Ok((_, other)) => Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader.apply_topology(forwarded(request.into_inner())).await
            }
        }
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        if let Some(mut leader) = self.barrier_or_forward(&request).await? {
            return leader.list_audit(forwarded(request.into_inner())).await;
        }
        let msg = request.get_ref();
        let limit = match msg.limit {
            0 => 100,
            n => (n as usize).min(MAX_AUDIT_PAGE),
        };
        let data = self.node.sm.read().await;
        let entries = data
            .state
            .audit
            .iter()
            .rev()
            .filter(|a| msg.before_seq == 0 || a.seq < msg.before_seq)
            .take(limit)
            .map(convert::audit_to_pb)
            .collect();
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    #[tracing::instrument(name = "admin.add_member", skip_all, fields(id = request.get_ref().id))]
    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        if msg.id == 0 {
            return Err(Status::invalid_argument("member id must be at least 1"));
        }
        if msg.addr.trim().is_empty()
            || msg.addr.parse::<std::net::SocketAddr>().is_err() && !msg.addr.contains(':')
        {
            return Err(Status::invalid_argument(format!(
                "member addr {:?} is not host:port",
                msg.addr
            )));
        }
        validate_id("site", &msg.site).map_err(|e| domain_status(&e))?;
        if self
            .node
            .members()
            .iter()
            .any(|m| m.id == msg.id && m.voter)
        {
            return Err(Status::already_exists(format!(
                "node {} is already a voter",
                msg.id
            )));
        }
        let member = Member {
            addr: msg.addr.clone(),
            site: msg.site.clone(),
        };
        match self.node.add_member(msg.id, member).await {
            Ok(log_index) => {
                self.audit_membership(
                    &msg.actor,
                    &msg.reason,
                    format!("membership.add {}", msg.id),
                    format!("{} at {} (site {})", msg.id, msg.addr, msg.site),
                )
                .await;
                Ok(Response::new(pb::MembershipResponse {
                    members: self.node.members(),
                    log_index,
                }))
            }
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader.add_member(forwarded(request.into_inner())).await
            }
        }
    }

    #[tracing::instrument(name = "admin.remove_member", skip_all, fields(id = request.get_ref().id))]
    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let msg = request.get_ref();
        check_actor_reason(&msg.actor, &msg.reason)?;
        let members = self.node.members();
        if !members.iter().any(|m| m.id == msg.id) {
            return Err(Status::not_found(format!(
                "node {} is not a member",
                msg.id
            )));
        }
        let voters = members.iter().filter(|m| m.voter).count();
        if voters <= 1 {
            return Err(Status::failed_precondition(
                "refusing to remove the last voter: the cluster would have no quorum",
            ));
        }
        match self.node.remove_member(msg.id).await {
            Ok(log_index) => {
                self.audit_membership(
                    &msg.actor,
                    &msg.reason,
                    format!("membership.remove {}", msg.id),
                    "-".into(),
                )
                .await;
                Ok(Response::new(pb::MembershipResponse {
                    members: self.node.members(),
                    log_index,
                }))
            }
            Err(e) => {
                let mut leader = self.leader_client(&request, e)?;
                leader.remove_member(forwarded(request.into_inner())).await
            }
        }
    }

    async fn list_proposals(
        &self,
        request: Request<pb::ListProposalsRequest>,
    ) -> Result<Response<pb::ListProposalsResponse>, Status> {
        if let Some(mut leader) = self.barrier_or_forward(&request).await? {
            return leader.list_proposals(forwarded(request.into_inner())).await;
        }
        let pending_only = request.get_ref().pending_only;
        let data = self.node.sm.read().await;
        let proposals = data
            .state
            .proposals
            .values()
            .filter(|p| {
                // "Open": waiting for a decision or being executed.
                !pending_only
                    || matches!(
                        p.status,
                        invoker_domain::ProposalStatus::Pending
                            | invoker_domain::ProposalStatus::Approved
                            | invoker_domain::ProposalStatus::Executing
                    )
            })
            .map(convert::proposal_to_pb)
            .collect();
        Ok(Response::new(pb::ListProposalsResponse {
            proposals,
            term: self.node.raft_metrics().current_term,
        }))
    }

    #[tracing::instrument(name = "admin.approve_proposal", skip_all, fields(id = request.get_ref().id, approver = %request.get_ref().approver))]
    async fn approve_proposal(
        &self,
        request: Request<pb::ApproveProposalRequest>,
    ) -> Result<Response<pb::ProposalResponse>, Status> {
        let msg = request.get_ref();
        validate_id("approver", &msg.approver).map_err(|e| domain_status(&e))?;
        if !self.node.is_leader() {
            let error = ProposeError::NotLeader(self.node.leader().map(|(_, addr)| addr));
            let mut leader = self.leader_client(&request, error)?;
            return leader
                .approve_proposal(forwarded(request.into_inner()))
                .await;
        }
        let what = format!("proposal.approve #{}", msg.id);
        let approver = self
            .authenticated(&msg.approver, &msg.credential, &what)
            .await?;
        let command = Command::ApproveProposal {
            id: msg.id,
            approver: approver.clone(),
            digest: msg.digest.clone(),
            term_shown: msg.term,
            term: self.node.raft_metrics().current_term,
            required: self.node.approvals_required,
        };
        self.decide(
            &approver,
            &format!("approval of proposal #{}", msg.id),
            command,
            &what,
        )
        .await
    }

    #[tracing::instrument(name = "admin.reject_proposal", skip_all, fields(id = request.get_ref().id, approver = %request.get_ref().approver))]
    async fn reject_proposal(
        &self,
        request: Request<pb::RejectProposalRequest>,
    ) -> Result<Response<pb::ProposalResponse>, Status> {
        let msg = request.get_ref();
        validate_id("approver", &msg.approver).map_err(|e| domain_status(&e))?;
        validate_text("reason", &msg.reason, true).map_err(|e| domain_status(&e))?;
        if !self.node.is_leader() {
            let error = ProposeError::NotLeader(self.node.leader().map(|(_, addr)| addr));
            let mut leader = self.leader_client(&request, error)?;
            return leader
                .reject_proposal(forwarded(request.into_inner()))
                .await;
        }
        let what = format!("proposal.reject #{}", msg.id);
        let approver = self
            .authenticated(&msg.approver, &msg.credential, &what)
            .await?;
        let command = Command::RejectProposal {
            id: msg.id,
            approver: approver.clone(),
        };
        self.decide(&approver, &msg.reason, command, &what).await
    }

    #[tracing::instrument(name = "admin.audit_operator_action", skip_all, fields(action = %request.get_ref().action, operator = %request.get_ref().operator))]
    async fn audit_operator_action(
        &self,
        request: Request<pb::AuditOperatorActionRequest>,
    ) -> Result<Response<pb::AuditOperatorActionResponse>, Status> {
        let msg = request.get_ref();
        validate_id("operator", &msg.operator).map_err(|e| domain_status(&e))?;
        let action = msg.action.replace('.', "-");
        validate_id("action", &action).map_err(|e| domain_status(&e))?;
        validate_text("detail", &msg.detail, true).map_err(|e| domain_status(&e))?;
        validate_text("reason", &msg.reason, true).map_err(|e| domain_status(&e))?;
        if !self.node.is_leader() {
            let error = ProposeError::NotLeader(self.node.leader().map(|(_, addr)| addr));
            let mut leader = self.leader_client(&request, error)?;
            return leader
                .audit_operator_action(forwarded(request.into_inner()))
                .await;
        }
        let operator = self
            .authenticated(&msg.operator, &msg.credential, &msg.action)
            .await?;
        let command = Command::RecordAudit {
            action: msg.action.clone(),
            before: String::new(),
            after: msg.detail.clone(),
        };
        match self
            .node
            .propose(domain_request(&operator, &msg.reason, command))
            .await
        {
            Ok((log_index, _)) => Ok(Response::new(pb::AuditOperatorActionResponse { log_index })),
            Err(e) => Err(propose_status(e)),
        }
    }

    #[tracing::instrument(name = "admin.open_switchover", skip_all, fields(service = %request.get_ref().service, to = %request.get_ref().to_site, operator = %request.get_ref().operator))]
    async fn open_switchover(
        &self,
        request: Request<pb::OpenSwitchoverRequest>,
    ) -> Result<Response<pb::ProposalResponse>, Status> {
        let msg = request.get_ref();
        validate_id("operator", &msg.operator).map_err(|e| domain_status(&e))?;
        validate_id("service name", &msg.service).map_err(|e| domain_status(&e))?;
        validate_id("site", &msg.to_site).map_err(|e| domain_status(&e))?;
        validate_text("reason", &msg.reason, true).map_err(|e| domain_status(&e))?;
        if !self.node.is_leader() {
            let error = ProposeError::NotLeader(self.node.leader().map(|(_, addr)| addr));
            let mut leader = self.leader_client(&request, error)?;
            return leader
                .open_switchover(forwarded(request.into_inner()))
                .await;
        }
        let kind = if msg.planned {
            "switchover"
        } else {
            "failover"
        };
        let what = format!("proposal.open {kind} {} -> {}", msg.service, msg.to_site);
        let operator = self
            .authenticated(&msg.operator, &msg.credential, &what)
            .await?;
        let writer = self
            .node
            .sm
            .read()
            .await
            .state
            .writers
            .get(&msg.service)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("{:?} has no writer", msg.service)))?;
        let now = crate::now_ms();
        let command = Command::ProposeFailover {
            service: msg.service.clone(),
            from_site: writer.site.clone(),
            to_site: msg.to_site.clone(),
            writer_epoch: writer.epoch,
            evidence: vec![invoker_domain::Evidence {
                observer: operator.clone(),
                probe: format!("manual {kind}"),
                detail: msg.reason.clone(),
                observed_at_ms: now,
            }],
            // A planned switchover loses nothing by construction (fence, then catch up); a
            // forced failover's gap is unknown here: the proposal says so by its kind.
            data_loss: invoker_domain::DataLossEstimate::default(),
            term: self.node.raft_metrics().current_term,
            ttl_ms: self.node.proposal_ttl_ms,
            planned: msg.planned,
        };
        match self
            .node
            .propose(domain_request(&operator, &msg.reason, command))
            .await
        {
            Ok((_, DomainResponse::Applied(Outcome::Proposal { id, created }))) => {
                if !created {
                    return Err(Status::already_exists(format!(
                        "proposal #{id} for {:?} is already open: decide it first",
                        msg.service
                    )));
                }
                let proposal = self.node.sm.read().await.state.proposals.get(&id).cloned();
                tracing::warn!(id, "{what}");
                Ok(Response::new(pb::ProposalResponse {
                    proposal: proposal.as_ref().map(convert::proposal_to_pb),
                }))
            }
            Ok((_, other)) => Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(ProposeError::Refused(e)) => {
                self.audit_refusal(&operator, &what, &e.to_string()).await;
                Err(domain_status(&e))
            }
            Err(e) => Err(propose_status(e)),
        }
    }
}

impl AdminService {
    /// The authenticated operator, or UNAUTHENTICATED; a refusal is audited.
    async fn authenticated(
        &self,
        claimed: &str,
        credential: &str,
        what: &str,
    ) -> Result<String, Status> {
        match self.node.authenticator.authenticate(claimed, credential) {
            Ok(name) => Ok(name),
            Err(e) => {
                tracing::warn!(operator = %claimed, "{what} refused: {e}");
                self.audit_refusal(claimed, what, &format!("unauthenticated: {e}"))
                    .await;
                Err(Status::unauthenticated(e.to_string()))
            }
        }
    }

    /// Commits an approval or rejection; a refusal is audited and returned.
    async fn decide(
        &self,
        actor: &str,
        reason: &str,
        command: Command,
        what: &str,
    ) -> Result<Response<pb::ProposalResponse>, Status> {
        match self
            .node
            .propose(domain_request(actor, reason, command))
            .await
        {
            Ok((_, DomainResponse::Applied(Outcome::ProposalDecided(p)))) => {
                tracing::warn!(id = p.id, status = ?p.status, approvals = p.approvals.len(), "{what}");
                Ok(Response::new(pb::ProposalResponse {
                    proposal: Some(convert::proposal_to_pb(&p)),
                }))
            }
            Ok((_, other)) => Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(ProposeError::Refused(e)) => {
                tracing::warn!(operator = %actor, "{what} refused: {e}");
                self.audit_refusal(actor, what, &e.to_string()).await;
                Err(domain_status(&e))
            }
            Err(e) => Err(propose_status(e)),
        }
    }

    /// Records a refused approval or rejection in the audit log (best effort: the caller
    /// gets the refusal either way).
    async fn audit_refusal(&self, actor: &str, what: &str, why: &str) {
        let command = Command::RecordAudit {
            action: format!("{what} refused"),
            before: String::new(),
            after: why.chars().take(invoker_domain::MAX_TEXT_LEN).collect(),
        };
        let actor = if validate_id("actor", actor).is_ok() {
            actor
        } else {
            "unknown"
        };
        if let Err(e) = self
            .node
            .propose(domain_request(actor, "refused", command))
            .await
        {
            tracing::warn!("could not audit a refused {what}: {e:?}");
        }
    }
}

impl AdminService {
    /// Records a membership change in the audit log. The change itself is already committed;
    /// a failure here is logged, not returned, so the caller is not told a done change failed.
    async fn audit_membership(&self, actor: &str, reason: &str, action: String, after: String) {
        let before = String::new();
        let command = Command::RecordAudit {
            action,
            before,
            after,
        };
        if let Err(e) = self
            .node
            .propose(domain_request(actor, reason, command))
            .await
        {
            tracing::warn!("membership change done but not audited: {e:?}");
        }
    }
}

fn snapshot_event(snapshot: pb::DomainState) -> pb::WatchEvent {
    pb::WatchEvent {
        revision: snapshot.revision,
        event: Some(pb::watch_event::Event::Snapshot(snapshot)),
    }
}
