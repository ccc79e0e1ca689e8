//! Conversions between protobuf messages and domain types: the only place that knows both.

use std::collections::BTreeMap;

use invoker_domain as d;

use crate::pb;

/// A protobuf message that does not map to a valid domain value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0} is unspecified")]
    Unspecified(&'static str),
    #[error("{0} is missing")]
    Missing(&'static str),
}

pub fn class_to_pb(class: d::ServiceClass) -> pb::ServiceClass {
    match class {
        d::ServiceClass::Stateless => pb::ServiceClass::Stateless,
        d::ServiceClass::Strong => pb::ServiceClass::Strong,
    }
}

pub fn class_from_pb(class: i32) -> Result<d::ServiceClass, ConvertError> {
    match pb::ServiceClass::try_from(class) {
        Ok(pb::ServiceClass::Stateless) => Ok(d::ServiceClass::Stateless),
        Ok(pb::ServiceClass::Strong) => Ok(d::ServiceClass::Strong),
        _ => Err(ConvertError::Unspecified("service class")),
    }
}

pub fn role_to_pb(role: d::SiteRole) -> pb::SiteRole {
    match role {
        d::SiteRole::Site => pb::SiteRole::Site,
        d::SiteRole::Witness => pb::SiteRole::Witness,
    }
}

pub fn role_from_pb(role: i32) -> Result<d::SiteRole, ConvertError> {
    match pb::SiteRole::try_from(role) {
        Ok(pb::SiteRole::Site) => Ok(d::SiteRole::Site),
        Ok(pb::SiteRole::Witness) => Ok(d::SiteRole::Witness),
        _ => Err(ConvertError::Unspecified("site role")),
    }
}

pub fn site_to_pb(site: &d::Site) -> pb::Site {
    pb::Site {
        id: site.id.clone(),
        role: role_to_pb(site.role) as i32,
    }
}

pub fn service_to_pb(service: &d::Service) -> pb::Service {
    pb::Service {
        name: service.name.clone(),
        class: class_to_pb(service.class) as i32,
    }
}

pub fn runs_to_pb(runs: &[d::BucketRun]) -> Vec<pb::BucketRun> {
    runs.iter()
        .map(|r| pb::BucketRun {
            site: r.site.clone(),
            count: r.count,
        })
        .collect()
}

pub fn runs_from_pb(runs: &[pb::BucketRun]) -> Vec<d::BucketRun> {
    runs.iter()
        .map(|r| d::BucketRun::new(r.site.clone(), r.count))
        .collect()
}

pub fn routing_to_pb(service: &str, table: &d::RoutingTable) -> pb::RoutingTable {
    pb::RoutingTable {
        service: service.to_string(),
        version: table.version,
        runs: runs_to_pb(&table.runs),
        throttle_max_rps: table
            .throttle_max_rps
            .iter()
            .map(|(s, r)| (s.clone(), *r))
            .collect(),
    }
}

pub fn routing_from_pb(table: &pb::RoutingTable) -> d::RoutingTable {
    d::RoutingTable {
        version: table.version,
        runs: d::normalize_runs(&runs_from_pb(&table.runs)),
        throttle_max_rps: table
            .throttle_max_rps
            .iter()
            .map(|(s, r)| (s.clone(), *r))
            .collect(),
    }
}

pub fn writer_to_pb(service: &str, writer: &d::Writer) -> pb::Writer {
    pb::Writer {
        service: service.to_string(),
        site: writer.site.clone(),
        epoch: writer.epoch,
        dsn: writer.dsn.clone(),
    }
}

pub fn writer_from_pb(writer: &pb::Writer) -> d::Writer {
    d::Writer {
        site: writer.site.clone(),
        epoch: writer.epoch,
        dsn: writer.dsn.clone(),
    }
}

fn status_to_pb(status: d::ProposalStatus) -> pb::ProposalStatus {
    match status {
        d::ProposalStatus::Pending => pb::ProposalStatus::Pending,
        d::ProposalStatus::Approved => pb::ProposalStatus::Approved,
        d::ProposalStatus::Rejected => pb::ProposalStatus::Rejected,
        d::ProposalStatus::Expired => pb::ProposalStatus::Expired,
        d::ProposalStatus::Executing => pb::ProposalStatus::Executing,
        d::ProposalStatus::Executed => pb::ProposalStatus::Executed,
        d::ProposalStatus::Failed => pb::ProposalStatus::Failed,
    }
}

pub fn evidence_to_pb(e: &d::Evidence) -> pb::Evidence {
    pb::Evidence {
        observer: e.observer.clone(),
        probe: e.probe.clone(),
        detail: e.detail.clone(),
        observed_at_ms: e.observed_at_ms,
    }
}

pub fn proposal_to_pb(p: &d::Proposal) -> pb::Proposal {
    pb::Proposal {
        id: p.id,
        kind: p.kind.clone(),
        service: p.service.clone(),
        status: status_to_pb(p.status) as i32,
        created_at_ms: p.created_at_ms,
        expires_at_ms: p.expires_at_ms,
        evidence: p.evidence.iter().map(evidence_to_pb).collect(),
        data_loss: p.data_loss.as_ref().map(|l| pb::DataLossEstimate {
            primary_last_lsn: l.primary_last_lsn,
            replica_receive_lsn: l.replica_receive_lsn,
            replica_replay_lsn: l.replica_replay_lsn,
            gap_bytes: l.gap_bytes,
            primary_last_seen_ms: l.primary_last_seen_ms,
            ledger_sequence_gap: l.ledger_sequence_gap,
        }),
        approvals: p
            .approvals
            .iter()
            .map(|a| pb::Approval {
                approver: a.approver.clone(),
                at_ms: a.at_ms,
                term: a.term,
            })
            .collect(),
        digest: p.digest.clone(),
        term: p.term,
        actor: p.actor.clone(),
        reason: p.reason.clone(),
        plan: p.plan.as_ref().map(|plan| pb::FailoverPlan {
            planned: plan.planned,
            from_site: plan.from_site.clone(),
            from_epoch: plan.from_epoch,
            from_dsn: plan.from_dsn.clone(),
            to_site: plan.to_site.clone(),
            to_dsn: plan.to_dsn.clone(),
            new_epoch: plan.new_epoch,
            steps: plan.steps(),
        }),
        execution: p.execution.as_ref().map(|e| pb::FailoverExecution {
            started_at_ms: e.started_at_ms,
            term: e.term,
            old_lease_expires_at_ms: e.old_lease_expires_at_ms,
            fence: e.fence.as_ref().map(step_to_pb),
            promote: e.promote.as_ref().map(step_to_pb),
            finished_at_ms: e.finished_at_ms.unwrap_or(0),
            error: e.error.clone().unwrap_or_default(),
        }),
    }
}

fn step_to_pb(r: &d::StepResult) -> pb::FailoverStepResult {
    pb::FailoverStepResult {
        ok: r.ok,
        lsn: r.lsn,
        ledger_sequence: r.ledger_sequence,
        detail: r.detail.clone(),
        at_ms: r.at_ms,
    }
}

pub fn lease_to_pb(l: &d::Lease) -> pb::WriterLease {
    pb::WriterLease {
        site: l.site.clone(),
        epoch: l.epoch,
        granted_at_ms: l.granted_at_ms,
        expires_at_ms: l.expires_at_ms,
    }
}

pub fn audit_to_pb(a: &d::AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: a.seq,
        log_index: a.log_index,
        at_ms: a.at_ms,
        actor: a.actor.clone(),
        reason: a.reason.clone(),
        action: a.action.clone(),
        before: a.before.clone(),
        after: a.after.clone(),
    }
}

pub fn state_to_pb(state: &d::State) -> pb::DomainState {
    pb::DomainState {
        revision: state.revision,
        sites: state.sites.values().map(site_to_pb).collect(),
        services: state.services.values().map(service_to_pb).collect(),
        routing: state
            .routing
            .iter()
            .map(|(s, t)| routing_to_pb(s, t))
            .collect(),
        writers: state
            .writers
            .iter()
            .map(|(s, w)| writer_to_pb(s, w))
            .collect(),
        proposals: state.proposals.values().map(proposal_to_pb).collect(),
        policy_paused: state.policy_paused,
    }
}

/// A change as a watch event (without its revision).
pub fn change_to_pb(change: &d::Change) -> pb::watch_event::Event {
    use pb::watch_event::Event;
    match change {
        d::Change::Site(s) => Event::Site(site_to_pb(s)),
        d::Change::Service(s) => Event::Service(service_to_pb(s)),
        d::Change::Routing { service, table } => Event::Routing(routing_to_pb(service, table)),
        d::Change::Writer { service, writer } => Event::Writer(writer_to_pb(service, writer)),
        d::Change::Proposal(p) => Event::Proposal(proposal_to_pb(p)),
        d::Change::Audit(a) => Event::Audit(audit_to_pb(a)),
        d::Change::PolicyMode { paused } => Event::PolicyPaused(*paused),
    }
}

pub fn topology_to_pb(t: &d::Topology) -> pb::Topology {
    pb::Topology {
        sites: t
            .sites
            .iter()
            .map(|s| pb::SiteSpec {
                id: s.id.clone(),
                role: role_to_pb(s.role) as i32,
            })
            .collect(),
        services: t
            .services
            .iter()
            .map(|s| pb::ServiceSpec {
                name: s.name.clone(),
                class: class_to_pb(s.class) as i32,
                routing_weights: s.routing.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                writer: s.writer.as_ref().map(|w| pb::WriterSpec {
                    site: w.site.clone(),
                    dsn: w.dsn.clone(),
                    replicas: w
                        .replicas
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }),
            })
            .collect(),
    }
}

pub fn topology_from_pb(t: &pb::Topology) -> Result<d::Topology, ConvertError> {
    let sites = t
        .sites
        .iter()
        .map(|s| {
            Ok(d::SiteSpec {
                id: s.id.clone(),
                role: role_from_pb(s.role)?,
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    let services = t
        .services
        .iter()
        .map(|s| {
            Ok(d::ServiceSpec {
                name: s.name.clone(),
                class: class_from_pb(s.class)?,
                routing: s
                    .routing_weights
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<BTreeMap<_, _>>(),
                writer: s.writer.as_ref().map(|w| d::WriterSpec {
                    site: w.site.clone(),
                    dsn: w.dsn.clone(),
                    replicas: w
                        .replicas
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }),
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(d::Topology { sites, services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_round_trips() {
        let t = d::Topology::from_toml(
            "[[sites]]\nid = \"a\"\nrole = \"site\"\n[[services]]\nname = \"wallet\"\nclass = \"strong\"\nrouting = { a = 3 }\nwriter = { site = \"a\", dsn = \"postgres://x\" }\n",
        )
        .unwrap();
        assert_eq!(topology_from_pb(&topology_to_pb(&t)).unwrap(), t);
    }

    #[test]
    fn unspecified_enums_are_refused() {
        let t = pb::Topology {
            sites: vec![pb::SiteSpec {
                id: "a".into(),
                role: 0,
            }],
            services: vec![],
        };
        assert!(matches!(
            topology_from_pb(&t),
            Err(ConvertError::Unspecified("site role"))
        ));
    }
}
