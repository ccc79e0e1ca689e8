//! A strong service's writer: its lease, and the execution of an approved failover or planned
//! switchover.
//!
//! The writer site holds a lease that its agent renews through the raft log every few hundred
//! milliseconds ([`Command::RenewLease`]). A renewal is refused once the writer has moved or
//! while a failover of the service is approved or executing, so the old site's lease runs out
//! and its agent fences the local primary; the executor waits for that expiry before it
//! promotes anything.
//!
//! Execution is a sequence of recorded steps on the proposal ([`Execution`]): begin (the new
//! epoch is fixed, renewals stop) → fence the old primary (or record why it was skipped) →
//! promote the target (its agent writes the new epoch into the fencing row) → complete (the
//! writer moves, the new site holds the lease). Each step is a raft entry, so a new leader
//! resumes from the last one recorded; each action behind a step is idempotent, so repeating
//! one after a crash is harmless.

use serde::{Deserialize, Serialize};

use crate::state::{Applied, Outcome};
use crate::{Change, DomainError, ProposalStatus, Request, State, Writer};

/// The site allowed to write a strong service, for how long (leader wall clock at commit +
/// the granted duration). Soft for the data plane: the agent counts the same duration from
/// *before* it asked, so its view always ends first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub site: String,
    pub epoch: u64,
    pub granted_at_ms: i64,
    pub expires_at_ms: i64,
    /// The writer's WAL position and ledger sequence as its agent last reported them with a
    /// renewal (0: unknown), and when: a new leader's data-loss estimate starts from them.
    #[serde(default)]
    pub primary_lsn: u64,
    #[serde(default)]
    pub ledger_sequence: u64,
    #[serde(default)]
    pub positions_at_ms: i64,
}

/// Optional zero-loss mode of a strong service: its primary commits only once a standby in
/// another site has the commit (`synchronous_standby_names`). When no standby streams (the
/// other site is down), the controller *relaxes* it, as a recorded decision, so that the
/// primary keeps committing; it restores it once a standby streams again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReplication {
    /// Asked for by an operator.
    pub enabled: bool,
    /// Relaxed by the controller (no standby to wait for).
    pub relaxed: bool,
    /// Why it was last relaxed or restored.
    pub reason: String,
    pub changed_at_ms: i64,
}

/// What a failover proposal will do once approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPlan {
    /// A planned switchover: the old primary must be fenced and the target caught up before
    /// promotion (loses nothing); otherwise an unplanned failover (may lose the gap).
    pub planned: bool,
    pub from_site: String,
    pub from_epoch: u64,
    pub from_dsn: String,
    pub to_site: String,
    pub to_dsn: String,
    pub new_epoch: u64,
}

impl FailoverPlan {
    /// The steps, as the console and `invokerctl proposals` print them.
    pub fn steps(&self) -> Vec<String> {
        let (from, to) = (&self.from_site, &self.to_site);
        let mut steps = vec![
            format!(
                "stop renewing {from}'s lease (epoch {}); promote once fenced or expired",
                self.from_epoch
            ),
            if self.planned {
                format!("fence {from}'s primary (read-only, sessions killed); abort if unreachable")
            } else {
                format!("fence {from}'s primary if reachable (read-only, sessions killed)")
            },
        ];
        if self.planned {
            steps.push(format!(
                "wait until {to} has replayed the fenced primary's last WAL position"
            ));
        }
        steps.push(format!(
            "promote {to} (pg_promote), write epoch {} into its fencing row",
            self.new_epoch
        ));
        steps.push(format!(
            "publish writer {to} epoch {}: every wallet reconnects",
            self.new_epoch
        ));
        steps
    }
}

/// The result of one execution step, as the agent reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    pub ok: bool,
    /// Fence: the old primary's last WAL position; promote: the promotion point.
    pub lsn: u64,
    /// The wallet ledger's highest sequence at that moment.
    pub ledger_sequence: u64,
    pub detail: String,
    pub at_ms: i64,
}

/// Where an approved proposal's execution stands. Recorded step by step in the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub started_at_ms: i64,
    /// The raft term of the leader that began it (a later leader resumes it).
    pub term: u64,
    /// When the old writer's lease ends: nothing is promoted before.
    pub old_lease_expires_at_ms: i64,
    pub fence: Option<StepResult>,
    pub promote: Option<StepResult>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
}

/// One step reported by the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailoverStep {
    /// The old primary was fenced (`ok`), or could not be reached (`!ok`, detail says why;
    /// refused for a planned switchover, which needs the fence).
    Fenced(StepResult),
    /// The target was promoted and holds the new epoch (`ok` must be true).
    Promoted(StepResult),
    /// The execution cannot go on (a planned switchover whose old primary cannot be fenced or
    /// whose target does not catch up). Only before promotion: the writer stays where it was.
    Failed(String),
}

impl State {
    /// Whether a proposal of `service` is approved or executing: the writer is about to move,
    /// so no lease is renewed.
    pub fn failover_in_progress(&self, service: &str) -> Option<u64> {
        self.proposals
            .values()
            .find(|p| {
                p.service == service
                    && matches!(
                        p.status,
                        ProposalStatus::Approved | ProposalStatus::Executing
                    )
            })
            .map(|p| p.id)
    }

    /// The proposal that pauses `service`'s payments, and until when (leader wall clock, ms):
    /// a pending one until it expires, an approved or executing one until it is done
    /// (`i64::MAX`).
    pub fn failover_pending(&self, service: &str) -> Option<(u64, i64)> {
        self.proposals
            .values()
            .filter(|p| p.service == service && p.plan.is_some())
            .filter_map(|p| match p.status {
                ProposalStatus::Pending => Some((p.id, p.expires_at_ms)),
                ProposalStatus::Approved | ProposalStatus::Executing => Some((p.id, i64::MAX)),
                _ => None,
            })
            .max_by_key(|(_, until)| *until)
    }

    /// Whether `service`'s writer must wait for a standby: zero-loss mode on and not relaxed.
    pub fn synchronous_standby(&self, service: &str) -> bool {
        self.sync_replication
            .get(service)
            .is_some_and(|s| s.enabled && !s.relaxed)
    }

    pub(crate) fn set_sync_replication(
        &mut self,
        request: &Request,
        service: &str,
        enabled: bool,
    ) -> Result<Applied, DomainError> {
        if !self.is_strong(service) {
            return Err(DomainError::NotStrong(service.to_string()));
        }
        let before = self
            .sync_replication
            .get(service)
            .cloned()
            .unwrap_or_default();
        if before.enabled == enabled {
            return Ok(Applied::outcome(Outcome::Replication {
                enabled,
                relaxed: before.relaxed,
                changed: false,
            }));
        }
        let mode = |e: bool| if e { "synchronous" } else { "asynchronous" }.to_string();
        // Turning it on starts strict: the controller relaxes it if no standby streams.
        let after = SyncReplication {
            enabled,
            relaxed: false,
            reason: request.reason.clone(),
            changed_at_ms: request.at_ms,
        };
        self.sync_replication.insert(service.to_string(), after);
        Ok(Applied {
            outcome: Outcome::Replication {
                enabled,
                relaxed: false,
                changed: true,
            },
            changes: Vec::new(),
            audit: vec![(
                format!("replication.mode {service}"),
                mode(before.enabled),
                mode(enabled),
            )],
        })
    }

    pub(crate) fn relax_sync_replication(
        &mut self,
        request: &Request,
        service: &str,
        relaxed: bool,
    ) -> Result<Applied, DomainError> {
        let Some(current) = self.sync_replication.get(service).cloned() else {
            return Err(DomainError::ExecutionRefused(format!(
                "{service:?} is not in zero-loss mode"
            )));
        };
        if !current.enabled {
            return Err(DomainError::ExecutionRefused(format!(
                "{service:?} is not in zero-loss mode"
            )));
        }
        if current.relaxed == relaxed {
            return Ok(Applied::outcome(Outcome::Replication {
                enabled: true,
                relaxed,
                changed: false,
            }));
        }
        let state = |r: bool| if r { "relaxed" } else { "strict" }.to_string();
        self.sync_replication.insert(
            service.to_string(),
            SyncReplication {
                enabled: true,
                relaxed,
                reason: request.reason.clone(),
                changed_at_ms: request.at_ms,
            },
        );
        Ok(Applied {
            outcome: Outcome::Replication {
                enabled: true,
                relaxed,
                changed: true,
            },
            changes: Vec::new(),
            audit: vec![(
                format!("replication.relax {service}"),
                state(current.relaxed),
                state(relaxed),
            )],
        })
    }

    pub(crate) fn renew_lease(
        &mut self,
        request: &Request,
        service: &str,
        site: &str,
        epoch: u64,
        duration_ms: u64,
        positions: (u64, u64),
    ) -> Result<Applied, DomainError> {
        let writer = self
            .writers
            .get(service)
            .ok_or_else(|| DomainError::UnknownService(service.to_string()))?;
        if writer.site != site || writer.epoch != epoch {
            return Err(DomainError::LeaseRefused(format!(
                "the writer of {service:?} is site {:?} epoch {}, not {site:?} epoch {epoch}",
                writer.site, writer.epoch
            )));
        }
        if let Some(id) = self.failover_in_progress(service) {
            return Err(DomainError::LeaseRefused(format!(
                "proposal #{id} moving {service:?}'s writer is approved: the lease is not renewed"
            )));
        }
        if duration_ms == 0 || duration_ms > 60_000 {
            return Err(DomainError::LeaseRefused(format!(
                "lease duration {duration_ms} ms is out of range (1..=60000)"
            )));
        }
        let expires_at_ms = request
            .at_ms
            .saturating_add(i64::try_from(duration_ms).unwrap_or(i64::MAX));
        // Renewals never shorten a lease (a delayed entry applied after a newer one), and a
        // renewal without positions (the witness's) keeps the last ones known.
        let held = self
            .leases
            .get(service)
            .filter(|l| l.site == site && l.epoch == epoch);
        let expires_at_ms = held.map_or(expires_at_ms, |l| l.expires_at_ms.max(expires_at_ms));
        let (primary_lsn, ledger_sequence, positions_at_ms) = match (positions, held) {
            ((lsn, seq), _) if lsn > 0 => (lsn, seq, request.at_ms),
            (_, Some(l)) => (l.primary_lsn, l.ledger_sequence, l.positions_at_ms),
            _ => (0, 0, 0),
        };
        self.leases.insert(
            service.to_string(),
            Lease {
                site: site.to_string(),
                epoch,
                granted_at_ms: request.at_ms,
                expires_at_ms,
                primary_lsn,
                ledger_sequence,
                positions_at_ms,
            },
        );
        // Not a change watchers need (it happens every few hundred ms): no audit, no revision.
        Ok(Applied::outcome(Outcome::Lease { expires_at_ms }))
    }

    pub(crate) fn begin_failover(
        &mut self,
        request: &Request,
        id: u64,
        term: u64,
    ) -> Result<Applied, DomainError> {
        let mut p = self
            .proposals
            .get(&id)
            .ok_or(DomainError::UnknownProposal(id))?
            .clone();
        if p.status == ProposalStatus::Executing {
            // Already begun (a retry by a leader that did not see its own commit).
            return Ok(Applied::outcome(Outcome::ProposalDecided(Box::new(p))));
        }
        if p.status != ProposalStatus::Approved {
            return Err(DomainError::ExecutionRefused(format!(
                "proposal #{id} is {:?}, not approved",
                p.status
            )));
        }
        let plan = p.plan.clone().ok_or_else(|| {
            DomainError::ExecutionRefused(format!("proposal #{id} has no execution plan"))
        })?;
        let writer = self
            .writers
            .get(&p.service)
            .ok_or_else(|| DomainError::StrongWithoutWriter(p.service.clone()))?;
        let old_lease_expires_at_ms = self
            .leases
            .get(&p.service)
            .filter(|l| l.site == plan.from_site && l.epoch == plan.from_epoch)
            .map_or(request.at_ms, |l| l.expires_at_ms);
        let stale = writer.site != plan.from_site || writer.epoch != plan.from_epoch;
        p.execution = Some(Execution {
            started_at_ms: request.at_ms,
            term,
            old_lease_expires_at_ms,
            ..Execution::default()
        });
        let (action, after) = if stale {
            p.status = ProposalStatus::Failed;
            let why = format!(
                "the writer is site {} epoch {}, no longer the plan's {} epoch {}",
                writer.site, writer.epoch, plan.from_site, plan.from_epoch
            );
            if let Some(e) = p.execution.as_mut() {
                e.error = Some(why.clone());
                e.finished_at_ms = Some(request.at_ms);
            }
            (format!("failover.abort #{id}"), why)
        } else {
            p.status = ProposalStatus::Executing;
            (
                format!("failover.begin #{id}"),
                format!(
                    "{} -> {} epoch {}; old lease ends {}",
                    plan.from_site,
                    plan.to_site,
                    plan.new_epoch,
                    crate::format_utc_ms(old_lease_expires_at_ms)
                ),
            )
        };
        self.proposals.insert(id, p.clone());
        Ok(Applied {
            outcome: Outcome::ProposalDecided(Box::new(p.clone())),
            changes: vec![Change::Proposal(Box::new(p))],
            audit: vec![(action, "approved".into(), after)],
        })
    }

    pub(crate) fn record_failover_step(
        &mut self,
        request: &Request,
        id: u64,
        step: &FailoverStep,
    ) -> Result<Applied, DomainError> {
        let mut p = self.executing(id)?.clone();
        let plan = p.plan.clone().ok_or_else(|| {
            DomainError::ExecutionRefused(format!("proposal #{id} has no execution plan"))
        })?;
        let Some(execution) = p.execution.as_mut() else {
            return Err(DomainError::ExecutionRefused(format!(
                "proposal #{id} has not begun"
            )));
        };
        let refuse = |why: String| Err(DomainError::ExecutionRefused(why));
        let (action, after) = match step {
            FailoverStep::Fenced(result) => {
                if execution.promote.is_some() {
                    return refuse(format!("proposal #{id} is already promoted"));
                }
                if plan.planned && !result.ok {
                    return refuse(format!(
                        "proposal #{id} is a planned switchover: it needs the old primary fenced ({})",
                        result.detail
                    ));
                }
                if request.at_ms < execution.old_lease_expires_at_ms && !result.ok {
                    return refuse(format!(
                        "proposal #{id}: the old lease runs until {}; an unfenced primary cannot be skipped before",
                        crate::format_utc_ms(execution.old_lease_expires_at_ms)
                    ));
                }
                execution.fence = Some(result.clone());
                (
                    format!("failover.fence #{id}"),
                    if result.ok {
                        format!("{} fenced at lsn {}", plan.from_site, result.lsn)
                    } else {
                        format!("{} not fenced: {}", plan.from_site, result.detail)
                    },
                )
            }
            FailoverStep::Promoted(result) => {
                if !result.ok {
                    return refuse(format!(
                        "proposal #{id}: a failed promotion is not a step; retry it"
                    ));
                }
                if execution.fence.is_none() {
                    return refuse(format!("proposal #{id}: fence (or skip) before promoting"));
                }
                // A fenced old primary can commit nothing (its lease is expired in the
                // database, it is read-only, its sessions are gone): no need to wait for the
                // lease. Otherwise the lease must be over.
                let fenced = execution.fence.as_ref().is_some_and(|f| f.ok);
                if !fenced && request.at_ms < execution.old_lease_expires_at_ms {
                    return refuse(format!(
                        "proposal #{id}: the old primary is not fenced and its lease runs until {}",
                        crate::format_utc_ms(execution.old_lease_expires_at_ms)
                    ));
                }
                if execution.promote.is_some() {
                    return Ok(Applied::outcome(Outcome::ProposalDecided(Box::new(
                        p.clone(),
                    ))));
                }
                execution.promote = Some(result.clone());
                (
                    format!("failover.promote #{id}"),
                    format!(
                        "{} promoted at lsn {} (ledger seq {}), epoch {}",
                        plan.to_site, result.lsn, result.ledger_sequence, plan.new_epoch
                    ),
                )
            }
            FailoverStep::Failed(why) => {
                if execution.promote.is_some() {
                    return refuse(format!("proposal #{id} is promoted: it can only complete"));
                }
                execution.error = Some(why.clone());
                execution.finished_at_ms = Some(request.at_ms);
                p.status = ProposalStatus::Failed;
                (format!("failover.fail #{id}"), why.clone())
            }
        };
        self.proposals.insert(id, p.clone());
        Ok(Applied {
            outcome: Outcome::ProposalDecided(Box::new(p.clone())),
            changes: vec![Change::Proposal(Box::new(p))],
            audit: vec![(action, "executing".into(), after)],
        })
    }

    pub(crate) fn complete_failover(
        &mut self,
        request: &Request,
        id: u64,
        lease_ms: u64,
    ) -> Result<Applied, DomainError> {
        let mut p = self.executing(id)?.clone();
        let plan = p.plan.clone().ok_or_else(|| {
            DomainError::ExecutionRefused(format!("proposal #{id} has no execution plan"))
        })?;
        let Some(execution) = p.execution.as_mut() else {
            return Err(DomainError::ExecutionRefused(format!(
                "proposal #{id} has not begun"
            )));
        };
        if execution.promote.is_none() {
            return Err(DomainError::ExecutionRefused(format!(
                "proposal #{id}: promote before completing"
            )));
        }
        execution.finished_at_ms = Some(request.at_ms);
        p.status = ProposalStatus::Executed;
        let before = self
            .writers
            .get(&p.service)
            .map(|w| format!("site {} epoch {}", w.site, w.epoch))
            .unwrap_or_default();
        let writer = Writer {
            site: plan.to_site.clone(),
            epoch: plan.new_epoch,
            dsn: plan.to_dsn.clone(),
        };
        self.writers.insert(p.service.clone(), writer.clone());
        // The promotion wrote a lease of this length into the new primary's fencing row; the
        // new site's agent renews it from here.
        self.leases.insert(
            p.service.clone(),
            Lease {
                site: plan.to_site.clone(),
                epoch: plan.new_epoch,
                granted_at_ms: request.at_ms,
                expires_at_ms: request
                    .at_ms
                    .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX)),
                primary_lsn: 0,
                ledger_sequence: 0,
                positions_at_ms: 0,
            },
        );
        let mut audit = vec![(
            format!("writer.move {} (#{id})", p.service),
            before,
            format!("site {} epoch {}", writer.site, writer.epoch),
        )];
        // The new primary has no standby yet (the old one is gone or stale): in zero-loss mode
        // it would wait forever. Relaxed until a standby streams again.
        if let Some(sync) = self.sync_replication.get_mut(&p.service) {
            if sync.enabled && !sync.relaxed {
                sync.relaxed = true;
                sync.reason = format!("failover #{id}: the new primary has no standby yet");
                sync.changed_at_ms = request.at_ms;
                audit.push((
                    format!("replication.relax {}", p.service),
                    "strict".into(),
                    "relaxed".into(),
                ));
            }
        }
        self.proposals.insert(id, p.clone());
        Ok(Applied {
            outcome: Outcome::ProposalDecided(Box::new(p.clone())),
            changes: vec![
                Change::Proposal(Box::new(p.clone())),
                Change::Writer {
                    service: p.service.clone(),
                    writer: writer.clone(),
                },
            ],
            audit,
        })
    }

    fn executing(&self, id: u64) -> Result<&crate::Proposal, DomainError> {
        let p = self
            .proposals
            .get(&id)
            .ok_or(DomainError::UnknownProposal(id))?;
        if p.status != ProposalStatus::Executing {
            return Err(DomainError::ExecutionRefused(format!(
                "proposal #{id} is {:?}, not executing",
                p.status
            )));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Response, Topology};

    const T0: i64 = 1_700_000_000_000;

    fn at(at_ms: i64, actor: &str, command: Command) -> Request {
        Request {
            actor: actor.into(),
            reason: "test".into(),
            at_ms,
            command,
        }
    }

    fn apply(state: &mut State, index: u64, request: Request) -> Response {
        state.apply(index, &request).0
    }

    fn refused(response: &Response) -> bool {
        matches!(response, Response::Refused(_))
    }

    fn lab() -> State {
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
            name = "wallet"
            class = "strong"
            routing = { a = 1 }
            writer = { site = "a", dsn = "postgres://a", replicas = { b = "postgres://b" } }
            "#,
        )
        .unwrap();
        let mut state = State::default();
        let r = apply(
            &mut state,
            1,
            at(T0, "ops", Command::ApplyTopology(topology)),
        );
        assert!(!refused(&r), "{r:?}");
        state
    }

    fn renew(site: &str, epoch: u64) -> Command {
        Command::RenewLease {
            service: "wallet".into(),
            site: site.into(),
            epoch,
            duration_ms: 3_000,
            primary_lsn: 0,
            ledger_sequence: 0,
        }
    }

    /// Opens a proposal (`planned` or not) and approves it with one approver; returns its id.
    fn approved(state: &mut State, now: i64, planned: bool) -> u64 {
        let r = apply(
            state,
            10,
            at(
                now,
                "policy",
                Command::ProposeFailover {
                    service: "wallet".into(),
                    from_site: "a".into(),
                    to_site: "b".into(),
                    writer_epoch: 1,
                    evidence: Vec::new(),
                    data_loss: crate::DataLossEstimate::default(),
                    term: 3,
                    ttl_ms: 600_000,
                    planned,
                },
            ),
        );
        let Response::Applied(Outcome::Proposal { id, created: true }) = r else {
            panic!("{r:?}")
        };
        let digest = state.proposals[&id].digest.clone();
        let r = apply(
            state,
            11,
            at(
                now + 1,
                "alice",
                Command::ApproveProposal {
                    id,
                    approver: "alice".into(),
                    digest,
                    term_shown: 3,
                    term: 3,
                    required: 1,
                },
            ),
        );
        assert!(!refused(&r), "{r:?}");
        assert_eq!(state.proposals[&id].status, ProposalStatus::Approved);
        id
    }

    fn step(id: u64, step: FailoverStep) -> Command {
        Command::RecordFailoverStep { id, step }
    }

    fn result(ok: bool, lsn: u64) -> StepResult {
        StepResult {
            ok,
            lsn,
            ledger_sequence: 7,
            detail: if ok {
                "done".into()
            } else {
                "agent not connected".into()
            },
            at_ms: 0,
        }
    }

    #[test]
    fn only_the_writer_renews_its_lease_and_never_shortens_it() {
        let mut state = lab();
        assert!(!refused(&apply(
            &mut state,
            2,
            at(T0 + 100, "agent-a", renew("a", 1))
        )));
        assert_eq!(state.leases["wallet"].expires_at_ms, T0 + 3_100);
        // Renewals do not count as changes: no revision, no audit line.
        assert_eq!(state.revision, 1);
        // A delayed renewal applied late never moves the end backwards.
        assert!(!refused(&apply(
            &mut state,
            3,
            at(T0 + 50, "agent-a", renew("a", 1))
        )));
        assert_eq!(state.leases["wallet"].expires_at_ms, T0 + 3_100);
        let before = state.clone();
        for bad in [renew("b", 1), renew("a", 2)] {
            assert!(refused(&apply(&mut state, 4, at(T0 + 200, "agent", bad))));
        }
        assert_eq!(state, before, "a refused renewal changes nothing");
    }

    #[test]
    fn an_approved_failover_stops_renewals_and_waits_for_the_old_lease() {
        let mut state = lab();
        apply(&mut state, 2, at(T0, "agent-a", renew("a", 1)));
        let id = approved(&mut state, T0 + 500, false);
        assert_eq!(state.failover_pending("wallet"), Some((id, i64::MAX)));
        assert!(refused(&apply(
            &mut state,
            12,
            at(T0 + 600, "agent-a", renew("a", 1))
        )));

        let r = apply(
            &mut state,
            13,
            at(T0 + 700, "leader", Command::BeginFailover { id, term: 3 }),
        );
        assert!(!refused(&r), "{r:?}");
        let exec = state.proposals[&id].execution.clone().unwrap();
        assert_eq!(exec.old_lease_expires_at_ms, T0 + 3_000);
        assert_eq!(state.proposals[&id].status, ProposalStatus::Executing);

        // Before the old lease ends: no promotion, and an unreachable primary cannot be skipped.
        let promote = step(id, FailoverStep::Promoted(result(true, 900)));
        assert!(refused(&apply(
            &mut state,
            14,
            at(T0 + 800, "leader", promote.clone())
        )));
        let skip = step(id, FailoverStep::Fenced(result(false, 0)));
        assert!(refused(&apply(
            &mut state,
            15,
            at(T0 + 900, "leader", skip.clone())
        )));
        // Completing before promoting is refused.
        let complete = Command::CompleteFailover {
            id,
            lease_ms: 3_000,
        };
        assert!(refused(&apply(
            &mut state,
            16,
            at(T0 + 3_100, "leader", complete.clone())
        )));

        assert!(!refused(&apply(
            &mut state,
            17,
            at(T0 + 3_100, "leader", skip)
        )));
        assert!(!refused(&apply(
            &mut state,
            18,
            at(T0 + 3_200, "leader", promote.clone())
        )));
        // Recording the promotion again (a new leader resuming) changes nothing.
        let once = state.clone();
        assert!(!refused(&apply(
            &mut state,
            19,
            at(T0 + 3_250, "leader", promote)
        )));
        assert_eq!(state.proposals, once.proposals);

        assert!(!refused(&apply(
            &mut state,
            20,
            at(T0 + 3_300, "leader", complete.clone())
        )));
        let writer = &state.writers["wallet"];
        assert_eq!(
            (writer.site.as_str(), writer.epoch, writer.dsn.as_str()),
            ("b", 2, "postgres://b")
        );
        assert_eq!(state.proposals[&id].status, ProposalStatus::Executed);
        assert_eq!(state.failover_pending("wallet"), None);
        assert_eq!(state.leases["wallet"].site, "b");
        // The old writer's lease is gone for good; the new one renews.
        assert!(refused(&apply(
            &mut state,
            21,
            at(T0 + 3_400, "agent-a", renew("a", 1))
        )));
        assert!(!refused(&apply(
            &mut state,
            22,
            at(T0 + 3_400, "agent-b", renew("b", 2))
        )));
        // Completing twice is refused (the proposal is no longer executing).
        assert!(refused(&apply(
            &mut state,
            23,
            at(T0 + 3_500, "leader", complete)
        )));
    }

    #[test]
    fn a_planned_switchover_needs_the_fence_and_can_abort_before_promotion() {
        let mut state = lab();
        let id = approved(&mut state, T0, true);
        assert!(state.proposals[&id].kind.starts_with("switchover"));
        apply(
            &mut state,
            12,
            at(T0 + 10, "leader", Command::BeginFailover { id, term: 3 }),
        );
        let skip = step(id, FailoverStep::Fenced(result(false, 0)));
        assert!(refused(&apply(
            &mut state,
            13,
            at(T0 + 60_000, "leader", skip)
        )));
        let fail = step(id, FailoverStep::Failed("replica did not catch up".into()));
        assert!(!refused(&apply(
            &mut state,
            14,
            at(T0 + 60_000, "leader", fail)
        )));
        assert_eq!(state.proposals[&id].status, ProposalStatus::Failed);
        assert_eq!(state.writers["wallet"].site, "a");
        assert_eq!(state.failover_pending("wallet"), None);
        // The old writer may hold its lease again.
        assert!(!refused(&apply(
            &mut state,
            15,
            at(T0 + 60_001, "agent-a", renew("a", 1))
        )));
    }

    #[test]
    fn a_fenced_old_primary_is_promoted_past_without_waiting_for_its_lease() {
        let mut state = lab();
        apply(&mut state, 2, at(T0, "agent-a", renew("a", 1)));
        let id = approved(&mut state, T0 + 100, true);
        apply(
            &mut state,
            12,
            at(T0 + 200, "leader", Command::BeginFailover { id, term: 3 }),
        );
        let fenced = step(id, FailoverStep::Fenced(result(true, 500)));
        assert!(!refused(&apply(
            &mut state,
            13,
            at(T0 + 300, "leader", fenced)
        )));
        // The lease (until T0 + 3000) is not over, but the old primary is fenced.
        let promote = step(id, FailoverStep::Promoted(result(true, 600)));
        assert!(!refused(&apply(
            &mut state,
            14,
            at(T0 + 400, "leader", promote)
        )));
    }

    #[test]
    fn zero_loss_mode_is_set_by_operators_relaxed_by_the_controller_and_after_a_failover() {
        let mut state = lab();
        let relax = |relaxed| Command::RelaxSyncReplication {
            service: "wallet".into(),
            relaxed,
        };
        // Nothing to relax before it is on.
        assert!(refused(&apply(
            &mut state,
            2,
            at(T0, "controller", relax(true))
        )));
        let on = Command::SetSyncReplication {
            service: "wallet".into(),
            enabled: true,
        };
        assert!(!refused(&apply(&mut state, 3, at(T0, "alice", on))));
        assert!(state.synchronous_standby("wallet"));
        assert!(!refused(&apply(
            &mut state,
            4,
            at(T0 + 1, "controller", relax(true))
        )));
        assert!(!state.synchronous_standby("wallet"));
        assert!(!refused(&apply(
            &mut state,
            5,
            at(T0 + 2, "controller", relax(false))
        )));
        assert!(state.synchronous_standby("wallet"));
        let audited = state
            .audit
            .iter()
            .filter(|e| e.action.starts_with("replication."))
            .count();
        assert_eq!(audited, 3, "{:?}", state.audit);

        // A failover relaxes it: the new primary has no standby yet.
        apply(&mut state, 6, at(T0 + 10, "agent-a", renew("a", 1)));
        let id = approved(&mut state, T0 + 20, true);
        apply(
            &mut state,
            12,
            at(T0 + 30, "leader", Command::BeginFailover { id, term: 3 }),
        );
        apply(
            &mut state,
            13,
            at(
                T0 + 40,
                "leader",
                step(id, FailoverStep::Fenced(result(true, 5))),
            ),
        );
        apply(
            &mut state,
            14,
            at(
                T0 + 50,
                "leader",
                step(id, FailoverStep::Promoted(result(true, 6))),
            ),
        );
        let complete = Command::CompleteFailover {
            id,
            lease_ms: 3_000,
        };
        assert!(!refused(&apply(
            &mut state,
            15,
            at(T0 + 60, "leader", complete)
        )));
        assert!(!state.synchronous_standby("wallet"));
        assert!(state.sync_replication["wallet"].enabled);

        // Only strong services have it.
        let stateless = Command::SetSyncReplication {
            service: "gift-api".into(),
            enabled: true,
        };
        assert!(refused(&apply(
            &mut state,
            16,
            at(T0 + 70, "alice", stateless)
        )));
    }

    #[test]
    fn a_stale_plan_aborts_at_begin_and_pending_proposals_pause_until_they_expire() {
        let mut state = lab();
        let r = apply(
            &mut state,
            10,
            at(
                T0,
                "policy",
                Command::ProposeFailover {
                    service: "wallet".into(),
                    from_site: "a".into(),
                    to_site: "b".into(),
                    writer_epoch: 1,
                    evidence: Vec::new(),
                    data_loss: crate::DataLossEstimate::default(),
                    term: 3,
                    ttl_ms: 60_000,
                    planned: false,
                },
            ),
        );
        let Response::Applied(Outcome::Proposal { id, .. }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(state.failover_pending("wallet"), Some((id, T0 + 60_000)));
        // A proposal toward a site without a known database is refused.
        let mut no_db = state.clone();
        no_db.databases.clear();
        no_db.proposals.clear();
        let r = apply(
            &mut no_db,
            11,
            at(
                T0,
                "policy",
                Command::ProposeFailover {
                    service: "wallet".into(),
                    from_site: "a".into(),
                    to_site: "b".into(),
                    writer_epoch: 1,
                    evidence: Vec::new(),
                    data_loss: crate::DataLossEstimate::default(),
                    term: 3,
                    ttl_ms: 60_000,
                    planned: false,
                },
            ),
        );
        assert!(refused(&r), "{r:?}");
        // Begin on a proposal that is not approved is refused.
        assert!(refused(&apply(
            &mut state,
            12,
            at(T0 + 1, "leader", Command::BeginFailover { id, term: 3 })
        )));
        // The writer moved under an approved plan: begin aborts it.
        let digest = state.proposals[&id].digest.clone();
        apply(
            &mut state,
            13,
            at(
                T0 + 2,
                "alice",
                Command::ApproveProposal {
                    id,
                    approver: "alice".into(),
                    digest,
                    term_shown: 3,
                    term: 3,
                    required: 1,
                },
            ),
        );
        state.writers.get_mut("wallet").unwrap().epoch = 5;
        assert!(!refused(&apply(
            &mut state,
            14,
            at(T0 + 3, "leader", Command::BeginFailover { id, term: 3 })
        )));
        assert_eq!(state.proposals[&id].status, ProposalStatus::Failed);
    }
}
