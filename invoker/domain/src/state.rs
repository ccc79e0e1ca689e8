use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    validate_id, validate_text, AuditEntry, BucketRun, DomainError, Proposal, RoutingTable,
    Service, ServiceClass, Site, SiteRole, Topology, Writer, BUCKETS,
};

/// How many audit entries the replicated state keeps; older ones are dropped (oldest first).
/// A bound keeps snapshots small; ship the audit stream elsewhere for longer retention.
pub const AUDIT_RETAINED: usize = 10_000;

/// A command with who asked, why, and when. `at_ms` is stamped by the node that accepted the
/// request (wall clock, milliseconds since the Unix epoch) so that applying stays
/// deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub actor: String,
    pub reason: String,
    pub at_ms: i64,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create missing sites and services (with initial routing and writers).
    ApplyTopology(Topology),
    /// Replace a service's routing table (a manual or automatic shift).
    SetRouting {
        service: String,
        /// Runs of buckets; their counts must add up to [`BUCKETS`].
        runs: Vec<BucketRun>,
        /// Compare-and-swap: refuse unless the live table is at this version.
        expected_version: Option<u64>,
    },
    /// Admit a site's requests to a service only up to `max_rps` at the edge (`None` lifts
    /// the throttle). Bumps the routing table's version: the throttle travels with it.
    SetThrottle {
        service: String,
        site: String,
        max_rps: Option<u64>,
    },
    /// Pause (dry-run: decide, record "would ...", act on nothing) or resume the failover
    /// policy. Replicated, so a new leader keeps the mode.
    SetPolicyPaused { paused: bool },
    /// Open a failover proposal for a strong service: its writer should move from
    /// `from_site` to `to_site`. Only a human approval executes it. Refused unless the writer
    /// is still at `from_site` with `writer_epoch` (a stale proposal changes nothing); while
    /// an unexpired proposal for the service is pending, a new one is not opened.
    ProposeFailover {
        service: String,
        from_site: String,
        to_site: String,
        writer_epoch: u64,
        evidence: Vec<crate::Evidence>,
        data_loss: crate::DataLossEstimate,
        /// Raft term of the leader that proposes (approvals are bound to it).
        term: u64,
        ttl_ms: u64,
        /// A planned switchover opened by an operator (fence first, wait for catch-up, lose
        /// nothing) rather than a failover of a lost writer.
        planned: bool,
    },
    /// An authenticated operator approves a pending proposal. Bound to what they were shown:
    /// refused unless `digest` is the proposal's and `term_shown` is `term`, the term of the
    /// leader proposing this command; refused when expired, decided, or already approved by
    /// them, and (with two or more approvers required) when they opened it themselves.
    /// With `required` distinct approvals the proposal is approved.
    ApproveProposal {
        id: u64,
        approver: String,
        digest: String,
        term_shown: u64,
        term: u64,
        required: u32,
    },
    /// An authenticated operator rejects a pending proposal (the request's reason says why).
    RejectProposal { id: u64, approver: String },
    /// The writer site's agent renews its lease (committed before it is granted). Refused
    /// unless `(site, epoch)` is the writer and no failover of the service is approved.
    RenewLease {
        service: String,
        site: String,
        epoch: u64,
        duration_ms: u64,
        /// The primary's WAL position and ledger sequence as the agent saw them (0: unknown).
        primary_lsn: u64,
        ledger_sequence: u64,
    },
    /// An operator turns a strong service's zero-loss mode (synchronous replication to a
    /// standby in another site) on or off.
    SetSyncReplication { service: String, enabled: bool },
    /// The controller relaxes zero-loss mode (no standby streams: the primary would wait
    /// forever) or restores it (a standby streams again). The request's reason says why.
    RelaxSyncReplication { service: String, relaxed: bool },
    /// The leader starts executing approved proposal `id` (renewals stop from here).
    BeginFailover { id: u64, term: u64 },
    /// The leader records one execution step of proposal `id`.
    RecordFailoverStep { id: u64, step: crate::FailoverStep },
    /// The target is promoted: the writer moves, and the new site holds a lease of
    /// `lease_ms`.
    CompleteFailover { id: u64, lease_ms: u64 },
    /// Record an action taken outside the state machine (a membership change) in the audit log.
    RecordAudit {
        action: String,
        before: String,
        after: String,
    },
}

impl Command {
    /// A short name for logs, spans and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ApplyTopology(_) => "apply_topology",
            Command::SetRouting { .. } => "set_routing",
            Command::SetThrottle { .. } => "set_throttle",
            Command::SetPolicyPaused { .. } => "set_policy_paused",
            Command::ProposeFailover { .. } => "propose_failover",
            Command::ApproveProposal { .. } => "approve_proposal",
            Command::RejectProposal { .. } => "reject_proposal",
            Command::RecordAudit { .. } => "record_audit",
            Command::RenewLease { .. } => "renew_lease",
            Command::SetSyncReplication { .. } => "set_sync_replication",
            Command::RelaxSyncReplication { .. } => "relax_sync_replication",
            Command::BeginFailover { .. } => "begin_failover",
            Command::RecordFailoverStep { .. } => "record_failover_step",
            Command::CompleteFailover { .. } => "complete_failover",
        }
    }
}

/// The result of applying one request: committed (with what changed) or refused (and nothing
/// changed). Both are final: a refused command is in the log but has no effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Applied(Outcome),
    Refused(DomainError),
    /// A raft-internal entry (blank or membership) with no domain meaning.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Topology {
        changes: Vec<String>,
        notes: Vec<String>,
    },
    Routing {
        table: RoutingTable,
        changed: bool,
    },
    Audited,
    PolicyMode {
        paused: bool,
        changed: bool,
    },
    /// The proposal now pending for the service; `created` is false when it was already open.
    Proposal {
        id: u64,
        created: bool,
    },
    /// A proposal after an approval, a rejection or an execution step.
    ProposalDecided(Box<Proposal>),
    /// A writer lease renewed until then (leader wall clock).
    Lease {
        expires_at_ms: i64,
    },
    /// A strong service's zero-loss mode after the command.
    Replication {
        enabled: bool,
        relaxed: bool,
        changed: bool,
    },
}

/// One change of the replicated state, published to watchers after it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Site(Site),
    Service(Service),
    Routing {
        service: String,
        table: RoutingTable,
    },
    Writer {
        service: String,
        writer: Writer,
    },
    Proposal(Box<Proposal>),
    Audit(AuditEntry),
    PolicyMode {
        paused: bool,
    },
}

/// The replicated domain state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub sites: BTreeMap<String, Site>,
    pub services: BTreeMap<String, Service>,
    pub routing: BTreeMap<String, RoutingTable>,
    pub writers: BTreeMap<String, Writer>,
    pub proposals: BTreeMap<u64, Proposal>,
    pub audit: VecDeque<AuditEntry>,
    pub next_audit_seq: u64,
    /// The failover policy runs in dry-run: it records what it would do and does nothing.
    #[serde(default)]
    pub policy_paused: bool,
    /// Each strong service's writer lease.
    #[serde(default)]
    pub leases: BTreeMap<String, crate::Lease>,
    /// Each strong service's database per site (the writer's and its replicas'): where a
    /// failover can move the writer.
    #[serde(default)]
    pub databases: BTreeMap<String, BTreeMap<String, String>>,
    /// Each strong service's zero-loss mode, when ever set.
    #[serde(default)]
    pub sync_replication: BTreeMap<String, crate::SyncReplication>,
    /// Log index of the last request that changed something.
    pub revision: u64,
}

impl State {
    /// Applies one request at raft log index `log_index`. On refusal the state is unchanged.
    pub fn apply(&mut self, log_index: u64, request: &Request) -> (Response, Vec<Change>) {
        if let Err(err) = validate_request(request) {
            return (Response::Refused(err), Vec::new());
        }
        let result = match &request.command {
            Command::ApplyTopology(topology) => self.apply_topology(topology),
            Command::SetRouting {
                service,
                runs,
                expected_version,
            } => self.set_routing(service, runs, *expected_version),
            Command::SetThrottle {
                service,
                site,
                max_rps,
            } => self.set_throttle(service, site, *max_rps),
            Command::SetPolicyPaused { paused } => Ok(self.set_policy_paused(*paused)),
            Command::ProposeFailover {
                service,
                from_site,
                to_site,
                writer_epoch,
                evidence,
                data_loss,
                term,
                ttl_ms,
                planned,
            } => self.propose_failover(
                request,
                FailoverProposal {
                    service,
                    from_site,
                    to_site,
                    writer_epoch: *writer_epoch,
                    evidence,
                    data_loss,
                    term: *term,
                    ttl_ms: *ttl_ms,
                    planned: *planned,
                },
            ),
            Command::ApproveProposal {
                id,
                approver,
                digest,
                term_shown,
                term,
                required,
            } => self.approve(
                request,
                *id,
                approver,
                digest,
                (*term_shown, *term),
                *required,
            ),
            Command::RejectProposal { id, approver } => self.reject(request, *id, approver),
            Command::RenewLease {
                service,
                site,
                epoch,
                duration_ms,
                primary_lsn,
                ledger_sequence,
            } => self.renew_lease(
                request,
                service,
                site,
                *epoch,
                *duration_ms,
                (*primary_lsn, *ledger_sequence),
            ),
            Command::SetSyncReplication { service, enabled } => {
                self.set_sync_replication(request, service, *enabled)
            }
            Command::RelaxSyncReplication { service, relaxed } => {
                self.relax_sync_replication(request, service, *relaxed)
            }
            Command::BeginFailover { id, term } => self.begin_failover(request, *id, *term),
            Command::RecordFailoverStep { id, step } => {
                self.record_failover_step(request, *id, step)
            }
            Command::CompleteFailover { id, lease_ms } => {
                self.complete_failover(request, *id, *lease_ms)
            }
            Command::RecordAudit {
                action,
                before,
                after,
            } => Ok(Applied {
                outcome: Outcome::Audited,
                changes: Vec::new(),
                audit: vec![(action.clone(), before.clone(), after.clone())],
            }),
        };
        match result {
            Err(err) => (Response::Refused(err), Vec::new()),
            Ok(applied) => {
                let mut changes = applied.changes;
                for (action, before, after) in applied.audit {
                    changes.push(Change::Audit(
                        self.push_audit(log_index, request, action, before, after),
                    ));
                }
                if !changes.is_empty() {
                    self.revision = log_index;
                }
                (Response::Applied(applied.outcome), changes)
            }
        }
    }

    fn push_audit(
        &mut self,
        log_index: u64,
        request: &Request,
        action: String,
        before: String,
        after: String,
    ) -> AuditEntry {
        self.next_audit_seq += 1;
        let entry = AuditEntry {
            seq: self.next_audit_seq,
            log_index,
            at_ms: request.at_ms,
            actor: request.actor.clone(),
            reason: request.reason.clone(),
            action,
            before,
            after,
        };
        self.audit.push_back(entry.clone());
        while self.audit.len() > AUDIT_RETAINED {
            self.audit.pop_front();
        }
        entry
    }

    fn check_traffic_site(&self, site: &str) -> Result<(), DomainError> {
        match self.sites.get(site) {
            None => Err(DomainError::UnknownSite(site.to_string())),
            Some(s) if s.role == SiteRole::Witness => Err(DomainError::WitnessSite(site.into())),
            Some(_) => Ok(()),
        }
    }

    fn set_routing(
        &mut self,
        service: &str,
        runs: &[BucketRun],
        expected_version: Option<u64>,
    ) -> Result<Applied, DomainError> {
        let current = self
            .routing
            .get(service)
            .ok_or_else(|| DomainError::UnknownService(service.to_string()))?;
        let got = crate::runs_len(runs);
        if got != BUCKETS as u64 {
            return Err(DomainError::WrongBucketCount {
                got,
                expected: BUCKETS,
            });
        }
        if let Some(expected) = expected_version {
            if expected != current.version {
                return Err(DomainError::VersionConflict {
                    service: service.to_string(),
                    expected,
                    actual: current.version,
                });
            }
        }
        for run in runs.iter().filter(|r| r.count > 0) {
            self.check_traffic_site(&run.site)?;
        }
        let runs = crate::normalize_runs(runs);
        let mut table = current.clone();
        table.runs = runs;
        Ok(self.replace_table(service, table, format!("routing.set {service}")))
    }

    /// Stores `table` as the service's routing with the next version, audited under `action`;
    /// a table equal to the live one changes nothing (no version bump, no audit).
    fn replace_table(&mut self, service: &str, mut table: RoutingTable, action: String) -> Applied {
        let Some(current) = self.routing.get(service) else {
            // Callers look the service up first; a missing one changes nothing.
            return Applied::outcome(Outcome::Audited);
        };
        if current.runs == table.runs && current.throttle_max_rps == table.throttle_max_rps {
            return Applied::outcome(Outcome::Routing {
                table: current.clone(),
                changed: false,
            });
        }
        let before = current.summary();
        table.version = current.version + 1;
        let after = table.summary();
        self.routing.insert(service.to_string(), table.clone());
        Applied {
            outcome: Outcome::Routing {
                table: table.clone(),
                changed: true,
            },
            changes: vec![Change::Routing {
                service: service.to_string(),
                table,
            }],
            audit: vec![(action, before, after)],
        }
    }

    fn set_throttle(
        &mut self,
        service: &str,
        site: &str,
        max_rps: Option<u64>,
    ) -> Result<Applied, DomainError> {
        self.check_traffic_site(site)?;
        if max_rps == Some(0) {
            return Err(DomainError::ZeroThrottle {
                site: site.to_string(),
            });
        }
        let current = self
            .routing
            .get(service)
            .ok_or_else(|| DomainError::UnknownService(service.to_string()))?;
        let mut table = current.clone();
        match max_rps {
            Some(rps) => table.throttle_max_rps.insert(site.to_string(), rps),
            None => table.throttle_max_rps.remove(site),
        };
        Ok(self.replace_table(service, table, format!("throttle.set {service} {site}")))
    }

    fn propose_failover(
        &mut self,
        request: &Request,
        p: FailoverProposal<'_>,
    ) -> Result<Applied, DomainError> {
        let service = self
            .services
            .get(p.service)
            .ok_or_else(|| DomainError::UnknownService(p.service.to_string()))?;
        if service.class != crate::ServiceClass::Strong {
            return Err(DomainError::NotStrong(p.service.to_string()));
        }
        self.check_traffic_site(p.to_site)?;
        if p.from_site == p.to_site {
            return Err(DomainError::StaleProposal(format!(
                "the writer cannot move from {:?} to itself",
                p.to_site
            )));
        }
        let writer = self
            .writers
            .get(p.service)
            .ok_or_else(|| DomainError::StrongWithoutWriter(p.service.to_string()))?;
        if writer.site != p.from_site || writer.epoch != p.writer_epoch {
            return Err(DomainError::StaleProposal(format!(
                "the writer of {:?} is at {:?} epoch {}, not {:?} epoch {}",
                p.service, writer.site, writer.epoch, p.from_site, p.writer_epoch
            )));
        }
        if p.ttl_ms == 0 {
            return Err(DomainError::StaleProposal("ttl_ms must be above 0".into()));
        }
        let to_dsn = self
            .databases
            .get(p.service)
            .and_then(|d| d.get(p.to_site))
            .ok_or_else(|| {
                DomainError::StaleProposal(format!(
                    "no database of {:?} is known in site {:?} (the topology's writer.replicas)",
                    p.service, p.to_site
                ))
            })?
            .clone();
        let plan = crate::FailoverPlan {
            planned: p.planned,
            from_site: writer.site.clone(),
            from_epoch: writer.epoch,
            from_dsn: writer.dsn.clone(),
            to_site: p.to_site.to_string(),
            to_dsn,
            new_epoch: writer.epoch + 1,
        };
        let open = self.proposals.values().find(|q| {
            q.service == p.service
                && match q.status {
                    crate::ProposalStatus::Pending => q.expires_at_ms > request.at_ms,
                    crate::ProposalStatus::Approved | crate::ProposalStatus::Executing => true,
                    _ => false,
                }
        });
        if let Some(open) = open {
            return Ok(Applied::outcome(Outcome::Proposal {
                id: open.id,
                created: false,
            }));
        }
        let id = self.proposals.keys().next_back().copied().unwrap_or(0) + 1;
        let kind = format!(
            "{} {} -> {}",
            if p.planned { "switchover" } else { "failover" },
            p.from_site,
            p.to_site
        );
        let expires_at_ms = request
            .at_ms
            .saturating_add(i64::try_from(p.ttl_ms).unwrap_or(i64::MAX));
        let mut proposal = Proposal {
            id,
            kind,
            service: p.service.to_string(),
            status: crate::ProposalStatus::Pending,
            created_at_ms: request.at_ms,
            expires_at_ms,
            evidence: p.evidence.to_vec(),
            data_loss: Some(p.data_loss.clone()),
            approvals: Vec::new(),
            digest: String::new(),
            term: p.term,
            actor: request.actor.clone(),
            reason: request.reason.clone(),
            plan: Some(plan),
            execution: None,
        };
        proposal.digest = proposal_digest(&proposal, p.writer_epoch);
        self.proposals.insert(id, proposal.clone());
        let after = format!(
            "#{id} {} epoch {} (gap {} bytes, {} ledger entries)",
            proposal.kind, p.writer_epoch, p.data_loss.gap_bytes, p.data_loss.ledger_sequence_gap
        );
        Ok(Applied {
            outcome: Outcome::Proposal { id, created: true },
            changes: vec![Change::Proposal(Box::new(proposal))],
            audit: vec![(format!("proposal.create {}", p.service), "-".into(), after)],
        })
    }

    /// The pending, unexpired proposal `id`, or why it cannot be decided.
    fn open_proposal(&self, id: u64, at_ms: i64) -> Result<&Proposal, DomainError> {
        let p = self
            .proposals
            .get(&id)
            .ok_or(DomainError::UnknownProposal(id))?;
        if p.status != crate::ProposalStatus::Pending {
            return Err(DomainError::ApprovalRefused(format!(
                "proposal #{id} is {:?}, not pending",
                p.status
            )));
        }
        if at_ms >= p.expires_at_ms {
            return Err(DomainError::ApprovalRefused(format!(
                "proposal #{id} expired at {}",
                crate::format_utc_ms(p.expires_at_ms)
            )));
        }
        Ok(p)
    }

    fn approve(
        &mut self,
        request: &Request,
        id: u64,
        approver: &str,
        digest: &str,
        (term_shown, term): (u64, u64),
        required: u32,
    ) -> Result<Applied, DomainError> {
        let p = self.open_proposal(id, request.at_ms)?;
        let refuse = |why: String| Err(DomainError::ApprovalRefused(why));
        if p.digest != digest {
            return refuse(format!(
                "proposal #{id} is not what was shown (digest {digest:?}, now {:?}): list it again",
                p.digest
            ));
        }
        if term_shown != term {
            return refuse(format!(
                "proposal #{id} was shown in term {term_shown}; the leader changed since (term {term}): list it again"
            ));
        }
        if p.approvals.iter().any(|a| a.approver == approver) {
            return refuse(format!("{approver:?} already approved proposal #{id}"));
        }
        if required >= 2 && p.actor == approver {
            return refuse(format!(
                "{approver:?} opened proposal #{id} and cannot approve it: {required} approvers are required"
            ));
        }
        let mut p = p.clone();
        p.approvals.push(crate::Approval {
            approver: approver.to_string(),
            at_ms: request.at_ms,
            term,
        });
        let count = p.approvals.len();
        if count >= required as usize {
            p.status = crate::ProposalStatus::Approved;
        }
        self.proposals.insert(id, p.clone());
        Ok(Applied {
            outcome: Outcome::ProposalDecided(Box::new(p.clone())),
            changes: vec![Change::Proposal(Box::new(p.clone()))],
            audit: vec![(
                format!("proposal.approve #{id}"),
                format!("{} approvals", count - 1),
                format!("{count} of {required} ({approver}); status {:?}", p.status),
            )],
        })
    }

    fn reject(
        &mut self,
        request: &Request,
        id: u64,
        approver: &str,
    ) -> Result<Applied, DomainError> {
        let mut p = self.open_proposal(id, request.at_ms)?.clone();
        p.status = crate::ProposalStatus::Rejected;
        self.proposals.insert(id, p.clone());
        Ok(Applied {
            outcome: Outcome::ProposalDecided(Box::new(p.clone())),
            changes: vec![Change::Proposal(Box::new(p))],
            audit: vec![(
                format!("proposal.reject #{id}"),
                "pending".into(),
                format!("rejected by {approver}"),
            )],
        })
    }

    fn set_policy_paused(&mut self, paused: bool) -> Applied {
        if self.policy_paused == paused {
            return Applied::outcome(Outcome::PolicyMode {
                paused,
                changed: false,
            });
        }
        let mode = |p: bool| if p { "paused" } else { "active" }.to_string();
        let before = mode(self.policy_paused);
        self.policy_paused = paused;
        Applied {
            outcome: Outcome::PolicyMode {
                paused,
                changed: true,
            },
            changes: vec![Change::PolicyMode { paused }],
            audit: vec![("policy.mode".into(), before, mode(paused))],
        }
    }

    fn apply_topology(&mut self, topology: &Topology) -> Result<Applied, DomainError> {
        topology.validate()?;
        // Check everything against the live state first: the apply is all or nothing.
        let mut roles: BTreeMap<&str, SiteRole> = self
            .sites
            .iter()
            .map(|(id, site)| (id.as_str(), site.role))
            .collect();
        for spec in &topology.sites {
            match self.sites.get(&spec.id) {
                Some(existing) if existing.role != spec.role => {
                    return Err(DomainError::SiteRoleChange {
                        site: spec.id.clone(),
                        existing: existing.role.to_string(),
                    })
                }
                _ => {
                    roles.insert(spec.id.as_str(), spec.role);
                }
            }
        }
        let traffic_site = |site: &str| match roles.get(site) {
            None => Err(DomainError::UnknownSite(site.to_string())),
            Some(SiteRole::Witness) => Err(DomainError::WitnessSite(site.to_string())),
            Some(SiteRole::Site) => Ok(()),
        };
        let mut tables = Vec::new();
        for spec in &topology.services {
            if let Some(existing) = self.services.get(&spec.name) {
                if existing.class != spec.class {
                    return Err(DomainError::ServiceClassChange {
                        service: spec.name.clone(),
                        existing: existing.class.to_string(),
                    });
                }
            }
            for (site, weight) in &spec.routing {
                if *weight > 0 {
                    traffic_site(site)?;
                }
            }
            if let Some(writer) = &spec.writer {
                traffic_site(&writer.site)?;
            }
            let weights = spec
                .routing
                .iter()
                .filter(|(_, w)| **w > 0)
                .map(|(s, w)| (s.clone(), *w))
                .collect();
            tables.push(RoutingTable::runs_from_weights(&spec.name, &weights)?);
        }

        let mut applied = Applied::outcome(Outcome::Audited);
        let mut changes_text = Vec::new();
        let mut notes = Vec::new();
        for spec in &topology.sites {
            if !self.sites.contains_key(&spec.id) {
                let site = Site {
                    id: spec.id.clone(),
                    role: spec.role,
                };
                self.sites.insert(spec.id.clone(), site.clone());
                changes_text.push(format!("site {} ({}) created", spec.id, spec.role));
                applied.changes.push(Change::Site(site));
                applied.audit.push((
                    format!("site.create {}", spec.id),
                    "-".into(),
                    spec.role.to_string(),
                ));
            }
        }
        for (spec, runs) in topology.services.iter().zip(tables) {
            let declared = RoutingTable {
                version: 1,
                runs,
                throttle_max_rps: BTreeMap::new(),
            };
            if !self.services.contains_key(&spec.name) {
                let service = Service {
                    name: spec.name.clone(),
                    class: spec.class,
                };
                self.services.insert(spec.name.clone(), service.clone());
                self.routing.insert(spec.name.clone(), declared.clone());
                changes_text.push(format!(
                    "service {} ({}) created, routing {}",
                    spec.name,
                    spec.class,
                    declared.summary()
                ));
                applied.changes.push(Change::Service(service));
                applied.changes.push(Change::Routing {
                    service: spec.name.clone(),
                    table: declared.clone(),
                });
                applied.audit.push((
                    format!("service.create {}", spec.name),
                    "-".into(),
                    format!("{} routing {}", spec.class, declared.summary()),
                ));
            } else if let Some(live) = self.routing.get(&spec.name) {
                if live.runs != declared.runs {
                    notes.push(format!(
                        "service {}: live routing ({}) differs from the declared initial routing; left as is (use `routing set`)",
                        spec.name,
                        live.summary()
                    ));
                }
            }
            if let Some(writer_spec) = &spec.writer {
                // The databases per site are added, never replaced (a failover owns them once
                // a service exists); a newly declared replica is simply added.
                let known = self.databases.entry(spec.name.clone()).or_default();
                let declared = std::iter::once((&writer_spec.site, &writer_spec.dsn))
                    .chain(writer_spec.replicas.iter());
                for (site, dsn) in declared {
                    if !known.contains_key(site) {
                        known.insert(site.clone(), dsn.clone());
                        changes_text.push(format!("database of {} in site {site}", spec.name));
                    }
                }
                match self.writers.get(&spec.name) {
                    None => {
                        let writer = Writer {
                            site: writer_spec.site.clone(),
                            epoch: 1,
                            dsn: writer_spec.dsn.clone(),
                        };
                        self.writers.insert(spec.name.clone(), writer.clone());
                        changes_text.push(format!(
                            "writer of {} set to site {} (epoch 1)",
                            spec.name, writer.site
                        ));
                        applied.audit.push((
                            format!("writer.create {}", spec.name),
                            "-".into(),
                            format!("site {} epoch 1", writer.site),
                        ));
                        applied.changes.push(Change::Writer {
                            service: spec.name.clone(),
                            writer,
                        });
                    }
                    Some(live) if live.site != writer_spec.site || live.dsn != writer_spec.dsn => {
                        notes.push(format!(
                            "service {}: live writer (site {}, epoch {}) differs from the declared initial writer; left as is (writers move only by failover)",
                            spec.name, live.site, live.epoch
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        applied.outcome = Outcome::Topology {
            changes: changes_text,
            notes,
        };
        Ok(applied)
    }

    /// Each service's buckets per site.
    pub fn routing_shares(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        self.routing
            .iter()
            .map(|(service, table)| (service.clone(), table.share()))
            .collect()
    }

    /// Whether a service is strong (has a writer).
    pub fn is_strong(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.class == ServiceClass::Strong)
    }
}

/// The fields of [`Command::ProposeFailover`], borrowed.
struct FailoverProposal<'a> {
    service: &'a str,
    from_site: &'a str,
    to_site: &'a str,
    writer_epoch: u64,
    evidence: &'a [crate::Evidence],
    data_loss: &'a crate::DataLossEstimate,
    term: u64,
    ttl_ms: u64,
    planned: bool,
}

/// What an approval is bound to: a digest of everything the approver was shown (FNV-1a over
/// a canonical rendering; stable across builds and platforms, no dependency).
fn proposal_digest(p: &Proposal, writer_epoch: u64) -> String {
    let loss = p.data_loss.clone().unwrap_or_default();
    let text = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
        p.id,
        p.kind,
        p.service,
        writer_epoch,
        p.created_at_ms,
        p.expires_at_ms,
        p.term,
        loss.primary_last_lsn,
        loss.replica_receive_lsn,
        loss.replica_replay_lsn,
        loss.gap_bytes,
        loss.ledger_sequence_gap
    );
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

pub(crate) struct Applied {
    pub(crate) outcome: Outcome,
    pub(crate) changes: Vec<Change>,
    /// (action, before, after) lines for the audit log.
    pub(crate) audit: Vec<(String, String, String)>,
}

impl Applied {
    pub(crate) fn outcome(outcome: Outcome) -> Applied {
        Applied {
            outcome,
            changes: Vec::new(),
            audit: Vec::new(),
        }
    }
}

fn validate_request(request: &Request) -> Result<(), DomainError> {
    validate_text("actor", &request.actor, true)?;
    validate_text("reason", &request.reason, true)?;
    match &request.command {
        Command::SetRouting { service, .. } => validate_id("service name", service)?,
        Command::SetThrottle { service, site, .. } => {
            validate_id("service name", service)?;
            validate_id("site", site)?;
        }
        Command::SetPolicyPaused { .. } => {}
        Command::ApproveProposal {
            approver, digest, ..
        } => {
            validate_id("approver", approver)?;
            validate_text("digest", digest, true)?;
        }
        Command::RejectProposal { approver, .. } => validate_id("approver", approver)?,
        Command::RenewLease { service, site, .. } => {
            validate_id("service name", service)?;
            validate_id("site", site)?;
        }
        Command::BeginFailover { .. } | Command::CompleteFailover { .. } => {}
        Command::SetSyncReplication { service, .. }
        | Command::RelaxSyncReplication { service, .. } => validate_id("service name", service)?,
        Command::RecordFailoverStep { step, .. } => match step {
            crate::FailoverStep::Fenced(r) | crate::FailoverStep::Promoted(r) => {
                validate_text("step detail", &r.detail, false)?
            }
            crate::FailoverStep::Failed(why) => validate_text("failure", why, true)?,
        },
        Command::ProposeFailover {
            service,
            from_site,
            to_site,
            evidence,
            ..
        } => {
            validate_id("service name", service)?;
            validate_id("site", from_site)?;
            validate_id("site", to_site)?;
            for e in evidence {
                validate_text("evidence", &e.detail, false)?;
            }
        }
        Command::RecordAudit {
            action,
            before,
            after,
        } => {
            validate_text("audit action", action, true)?;
            validate_text("audit before", before, false)?;
            validate_text("audit after", after, false)?;
        }
        Command::ApplyTopology(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: Command) -> Request {
        Request {
            actor: "alice".into(),
            reason: "test".into(),
            at_ms: 1_700_000_000_000,
            command,
        }
    }

    fn lab_state() -> State {
        let topology = Topology::from_toml(
            r#"
            [[sites]]
            id = "a"
            role = "site"
            [[sites]]
            id = "b"
            role = "site"
            [[sites]]
            id = "witness"
            role = "witness"
            [[services]]
            name = "gift-api"
            class = "stateless"
            routing = { a = 50, b = 50 }
            [[services]]
            name = "wallet"
            class = "strong"
            routing = { a = 1 }
            writer = { site = "a", dsn = "postgres://x", replicas = { b = "postgres://y" } }
            "#,
        )
        .unwrap();
        let mut state = State::default();
        let (resp, changes) = state.apply(1, &req(Command::ApplyTopology(topology)));
        assert!(matches!(resp, Response::Applied(_)), "{resp:?}");
        assert!(!changes.is_empty());
        state
    }

    #[test]
    fn topology_apply_is_idempotent() {
        let mut state = lab_state();
        let before = state.clone();
        let topology = Topology {
            sites: before
                .sites
                .values()
                .map(|s| crate::SiteSpec {
                    id: s.id.clone(),
                    role: s.role,
                })
                .collect(),
            services: vec![],
        };
        let (resp, changes) = state.apply(2, &req(Command::ApplyTopology(topology)));
        assert!(changes.is_empty());
        match resp {
            Response::Applied(Outcome::Topology { changes, .. }) => assert!(changes.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(state, before);
        assert_eq!(state.writers["wallet"].epoch, 1);
        assert_eq!(state.routing["gift-api"].share()["a"], 512);
    }

    #[test]
    fn routing_set_bumps_version_and_audits() {
        let mut state = lab_state();
        let runs = vec![BucketRun::new("b", BUCKETS as u32)];
        let (resp, changes) = state.apply(
            5,
            &req(Command::SetRouting {
                service: "gift-api".into(),
                runs,
                expected_version: Some(1),
            }),
        );
        match resp {
            Response::Applied(Outcome::Routing { table, changed }) => {
                assert!(changed);
                assert_eq!(table.version, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(changes.len(), 2);
        let last = state.audit.back().unwrap();
        assert_eq!(last.action, "routing.set gift-api");
        assert_eq!(last.before, "v1 a=512 b=512");
        assert_eq!(last.after, "v2 b=1024");
        assert_eq!(last.log_index, 5);
        assert_eq!(state.revision, 5);
    }

    #[test]
    fn bad_routing_leaves_state_untouched() {
        let mut state = lab_state();
        let before = state.clone();
        let cases = vec![
            (
                Command::SetRouting {
                    service: "nope".into(),
                    runs: vec![BucketRun::new("a", BUCKETS as u32)],
                    expected_version: None,
                },
                DomainError::UnknownService("nope".into()),
            ),
            (
                Command::SetRouting {
                    service: "gift-api".into(),
                    runs: vec![BucketRun::new("a", 1000)],
                    expected_version: None,
                },
                DomainError::WrongBucketCount {
                    got: 1000,
                    expected: BUCKETS,
                },
            ),
            (
                Command::SetRouting {
                    service: "gift-api".into(),
                    runs: vec![BucketRun::new("witness", BUCKETS as u32)],
                    expected_version: None,
                },
                DomainError::WitnessSite("witness".into()),
            ),
            (
                Command::SetRouting {
                    service: "gift-api".into(),
                    runs: vec![BucketRun::new("c", BUCKETS as u32)],
                    expected_version: None,
                },
                DomainError::UnknownSite("c".into()),
            ),
            (
                Command::SetRouting {
                    service: "gift-api".into(),
                    runs: vec![BucketRun::new("b", BUCKETS as u32)],
                    expected_version: Some(7),
                },
                DomainError::VersionConflict {
                    service: "gift-api".into(),
                    expected: 7,
                    actual: 1,
                },
            ),
        ];
        for (command, expected) in cases {
            let (resp, changes) = state.apply(9, &req(command));
            assert_eq!(resp, Response::Refused(expected));
            assert!(changes.is_empty());
            assert_eq!(state, before);
        }
        let mut no_reason = req(Command::RecordAudit {
            action: "x".into(),
            before: "".into(),
            after: "".into(),
        });
        no_reason.reason = " ".into();
        let (resp, _) = state.apply(10, &no_reason);
        assert_eq!(
            resp,
            Response::Refused(DomainError::Missing {
                field: "reason".into()
            })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn topology_cannot_change_class_or_role() {
        let mut state = lab_state();
        let before = state.clone();
        let t = Topology::from_toml(
            "[[services]]\nname = \"gift-api\"\nclass = \"strong\"\nrouting = { a = 1 }\nwriter = { site = \"a\", dsn = \"x\" }\n",
        )
        .unwrap();
        let (resp, _) = state.apply(3, &req(Command::ApplyTopology(t)));
        assert!(matches!(
            resp,
            Response::Refused(DomainError::ServiceClassChange { .. })
        ));
        let t = Topology::from_toml("[[sites]]\nid = \"a\"\nrole = \"witness\"\n").unwrap();
        let (resp, _) = state.apply(4, &req(Command::ApplyTopology(t)));
        assert!(matches!(
            resp,
            Response::Refused(DomainError::SiteRoleChange { .. })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn audit_is_bounded() {
        let mut state = lab_state();
        for i in 0..(AUDIT_RETAINED as u64 + 10) {
            state.apply(
                100 + i,
                &req(Command::RecordAudit {
                    action: "membership.add".into(),
                    before: "".into(),
                    after: "".into(),
                }),
            );
        }
        assert_eq!(state.audit.len(), AUDIT_RETAINED);
        assert_eq!(state.audit.back().unwrap().seq, state.next_audit_seq);
    }

    #[test]
    fn throttle_travels_with_the_table_and_survives_a_shift() {
        let mut state = lab_state();
        let v1 = state.routing["gift-api"].version;
        let throttle = |max_rps| {
            req(Command::SetThrottle {
                service: "gift-api".into(),
                site: "b".into(),
                max_rps,
            })
        };
        let (resp, changes) = state.apply(10, &throttle(Some(500)));
        assert!(matches!(
            resp,
            Response::Applied(Outcome::Routing { changed: true, .. })
        ));
        assert_eq!(changes.len(), 2, "routing change and audit: {changes:?}");
        let table = &state.routing["gift-api"];
        assert_eq!(table.version, v1 + 1);
        assert_eq!(table.throttle_max_rps.get("b"), Some(&500));
        assert!(table.summary().contains("throttle b<=500/s"));
        // The same throttle again changes nothing.
        let (resp, changes) = state.apply(11, &throttle(Some(500)));
        assert!(matches!(
            resp,
            Response::Applied(Outcome::Routing { changed: false, .. })
        ));
        assert!(changes.is_empty());
        // A shift keeps the throttle.
        let (resp, _) = state.apply(
            12,
            &req(Command::SetRouting {
                service: "gift-api".into(),
                runs: vec![BucketRun::new("b", BUCKETS as u32)],
                expected_version: None,
            }),
        );
        assert!(matches!(resp, Response::Applied(_)));
        assert_eq!(
            state.routing["gift-api"].throttle_max_rps.get("b"),
            Some(&500)
        );
        let (_, _) = state.apply(13, &throttle(None));
        assert!(state.routing["gift-api"].throttle_max_rps.is_empty());
    }

    #[test]
    fn bad_throttles_are_refused_and_change_nothing() {
        let mut state = lab_state();
        let before = state.clone();
        for (service, site, max_rps, expected) in [
            ("gift-api", "b", Some(0), "ZeroThrottle"),
            ("gift-api", "witness", Some(10), "WitnessSite"),
            ("gift-api", "c", Some(10), "UnknownSite"),
            ("nope", "b", Some(10), "UnknownService"),
        ] {
            let (resp, changes) = state.apply(
                20,
                &req(Command::SetThrottle {
                    service: service.into(),
                    site: site.into(),
                    max_rps,
                }),
            );
            assert!(format!("{resp:?}").contains(expected), "{resp:?}");
            assert!(changes.is_empty());
        }
        assert_eq!(state, before);
    }

    #[test]
    fn policy_mode_is_replicated_state_and_audited() {
        let mut state = lab_state();
        assert!(!state.policy_paused);
        let (resp, changes) = state.apply(30, &req(Command::SetPolicyPaused { paused: true }));
        assert_eq!(
            resp,
            Response::Applied(Outcome::PolicyMode {
                paused: true,
                changed: true
            })
        );
        assert!(changes.contains(&Change::PolicyMode { paused: true }));
        assert!(state.policy_paused);
        assert_eq!(state.audit.back().unwrap().action, "policy.mode");
        let (resp, changes) = state.apply(31, &req(Command::SetPolicyPaused { paused: true }));
        assert!(matches!(
            resp,
            Response::Applied(Outcome::PolicyMode { changed: false, .. })
        ));
        assert!(changes.is_empty());
        assert_eq!(state.revision, 30);
    }

    fn proposal(epoch: u64, at_ms: i64) -> Request {
        Request {
            actor: "policy".into(),
            reason: "site a down".into(),
            at_ms,
            command: Command::ProposeFailover {
                service: "wallet".into(),
                from_site: "a".into(),
                to_site: "b".into(),
                writer_epoch: epoch,
                evidence: vec![crate::Evidence {
                    observer: "agent-b".into(),
                    probe: "site a".into(),
                    detail: "unreachable".into(),
                    observed_at_ms: at_ms,
                }],
                data_loss: crate::DataLossEstimate {
                    primary_last_lsn: 5_000,
                    replica_receive_lsn: 4_800,
                    replica_replay_lsn: 4_700,
                    gap_bytes: 200,
                    primary_last_seen_ms: at_ms - 900,
                    ledger_sequence_gap: 3,
                },
                term: 7,
                ttl_ms: 60_000,
                planned: false,
            },
        }
    }

    #[test]
    fn a_failover_proposal_is_opened_once_and_carries_its_estimate() {
        let mut state = lab_state();
        let (resp, changes) = state.apply(40, &proposal(1, 1_000_000));
        assert_eq!(
            resp,
            Response::Applied(Outcome::Proposal {
                id: 1,
                created: true
            })
        );
        assert_eq!(changes.len(), 2, "{changes:?}");
        let p = &state.proposals[&1];
        assert_eq!(p.status, crate::ProposalStatus::Pending);
        assert_eq!(p.kind, "failover a -> b");
        assert_eq!(p.term, 7);
        assert_eq!(p.expires_at_ms, 1_060_000);
        assert_eq!(p.data_loss.as_ref().unwrap().ledger_sequence_gap, 3);
        assert_eq!(p.digest.len(), 16);
        assert_eq!(state.audit.back().unwrap().action, "proposal.create wallet");
        // The writer did not move: a proposal executes nothing.
        assert_eq!(state.writers["wallet"].site, "a");

        // The leader deciding again while it is pending opens nothing new.
        let before = state.clone();
        let (resp, changes) = state.apply(41, &proposal(1, 1_030_000));
        assert_eq!(
            resp,
            Response::Applied(Outcome::Proposal {
                id: 1,
                created: false
            })
        );
        assert!(changes.is_empty());
        assert_eq!(state, before);

        // Once it has expired, a new one can be opened, with its own digest.
        let (resp, _) = state.apply(42, &proposal(1, 1_061_000));
        assert_eq!(
            resp,
            Response::Applied(Outcome::Proposal {
                id: 2,
                created: true
            })
        );
        assert_ne!(state.proposals[&1].digest, state.proposals[&2].digest);
    }

    #[test]
    fn stale_or_wrong_failover_proposals_are_refused_and_change_nothing() {
        let mut state = lab_state();
        let before = state.clone();
        let mut cases = vec![(proposal(2, 1_000), "StaleProposal")];
        let mut stateless = proposal(1, 1_000);
        if let Command::ProposeFailover { service, .. } = &mut stateless.command {
            *service = "gift-api".into();
        }
        cases.push((stateless, "NotStrong"));
        let mut to_witness = proposal(1, 1_000);
        if let Command::ProposeFailover { to_site, .. } = &mut to_witness.command {
            *to_site = "witness".into();
        }
        cases.push((to_witness, "WitnessSite"));
        let mut from_b = proposal(1, 1_000);
        if let Command::ProposeFailover { from_site, .. } = &mut from_b.command {
            *from_site = "b".into();
        }
        cases.push((from_b, "StaleProposal"));
        for (request, expected) in cases {
            let (resp, changes) = state.apply(50, &request);
            assert!(format!("{resp:?}").contains(expected), "{resp:?}");
            assert!(changes.is_empty());
        }
        assert_eq!(state, before);
    }

    fn approve(
        id: u64,
        who: &str,
        digest: &str,
        shown: u64,
        term: u64,
        at_ms: i64,
        required: u32,
    ) -> Request {
        Request {
            actor: who.into(),
            reason: "approve".into(),
            at_ms,
            command: Command::ApproveProposal {
                id,
                approver: who.into(),
                digest: digest.into(),
                term_shown: shown,
                term,
                required,
            },
        }
    }

    #[test]
    fn approvals_are_bound_to_digest_term_expiry_and_approver() {
        let mut state = lab_state();
        state.apply(40, &proposal(1, 1_000_000));
        let digest = state.proposals[&1].digest.clone();
        let before = state.clone();
        for (request, expected) in [
            (
                approve(1, "alice", "0000", 7, 7, 1_000_100, 2),
                "not what was shown",
            ),
            (
                approve(1, "alice", &digest, 6, 7, 1_000_100, 2),
                "leader changed",
            ),
            (approve(1, "alice", &digest, 7, 7, 1_060_000, 2), "expired"),
            (
                approve(9, "alice", &digest, 7, 7, 1_000_100, 2),
                "UnknownProposal",
            ),
            // The policy opened it: with two approvers required, it cannot approve itself.
            (
                approve(1, "policy", &digest, 7, 7, 1_000_100, 2),
                "cannot approve it",
            ),
        ] {
            let (resp, changes) = state.apply(41, &request);
            assert!(
                format!("{resp:?}").contains(expected),
                "{expected}: {resp:?}"
            );
            assert!(changes.is_empty());
        }
        assert_eq!(state, before);

        // Two distinct approvers are needed; the same one twice is a replay.
        let (resp, _) = state.apply(42, &approve(1, "alice", &digest, 7, 7, 1_000_100, 2));
        assert!(
            matches!(&resp, Response::Applied(Outcome::ProposalDecided(p)) if p.status == crate::ProposalStatus::Pending),
            "{resp:?}"
        );
        let (resp, changes) = state.apply(43, &approve(1, "alice", &digest, 7, 7, 1_000_200, 2));
        assert!(format!("{resp:?}").contains("already approved"), "{resp:?}");
        assert!(changes.is_empty());
        let (resp, _) = state.apply(44, &approve(1, "bob", &digest, 7, 7, 1_000_300, 2));
        assert!(
            matches!(&resp, Response::Applied(Outcome::ProposalDecided(p)) if p.status == crate::ProposalStatus::Approved),
            "{resp:?}"
        );
        assert_eq!(state.proposals[&1].approvals.len(), 2);
        assert_eq!(state.audit.back().unwrap().action, "proposal.approve #1");
        // Decided: no more approvals or rejections.
        let (resp, _) = state.apply(45, &approve(1, "carol", &digest, 7, 7, 1_000_400, 2));
        assert!(format!("{resp:?}").contains("not pending"), "{resp:?}");
    }

    #[test]
    fn a_rejected_proposal_stays_rejected() {
        let mut state = lab_state();
        state.apply(40, &proposal(1, 1_000_000));
        let digest = state.proposals[&1].digest.clone();
        let reject = Request {
            actor: "alice".into(),
            reason: "the primary is only slow".into(),
            at_ms: 1_000_100,
            command: Command::RejectProposal {
                id: 1,
                approver: "alice".into(),
            },
        };
        let (resp, _) = state.apply(41, &reject);
        assert!(
            matches!(&resp, Response::Applied(Outcome::ProposalDecided(p)) if p.status == crate::ProposalStatus::Rejected),
            "{resp:?}"
        );
        assert_eq!(
            state.audit.back().unwrap().reason,
            "the primary is only slow"
        );
        let (resp, _) = state.apply(42, &approve(1, "bob", &digest, 7, 7, 1_000_200, 1));
        assert!(format!("{resp:?}").contains("not pending"), "{resp:?}");
        // One approver is enough when one is required, even the proposal's author.
        state.apply(43, &proposal(1, 2_000_000));
        let digest = state.proposals[&2].digest.clone();
        let (resp, _) = state.apply(44, &approve(2, "policy", &digest, 7, 7, 2_000_100, 1));
        assert!(
            matches!(&resp, Response::Applied(Outcome::ProposalDecided(p)) if p.status == crate::ProposalStatus::Approved),
            "{resp:?}"
        );
    }
}
