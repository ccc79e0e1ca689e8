//! The leader's execution of approved writer moves (failover or planned switchover), and the
//! directory of connected site agents it sends commands to.
//!
//! Every step is recorded in the raft log before the next one starts (see
//! `invoker_domain::failover`), so a new leader resumes where the old one stopped; every
//! action behind a step is idempotent on the agent's side (fencing twice, promoting a
//! database already promoted with this epoch), so repeating the step in flight is harmless.
//!
//! Order, per proposal: begin (renewals stop) → fence the old primary through its site's
//! agent (an unplanned failover may skip an unreachable one, but only once the old lease has
//! expired) → unless it was fenced, wait for the old lease to expire → promote the target
//! through its agent (which writes the new epoch into the fencing row) → complete (the writer
//! moves; the publisher tells every site's wallets).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use invoker_api::pb;
use invoker_domain::{
    Command, FailoverStep, Outcome, Proposal, ProposalStatus, Request, Response, StepResult,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::node::Node;

/// The writer lease and failover execution settings (`[writer_lease]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a renewal holds. The agent fences its primary when it has not renewed for
    /// `duration_ms - fence_margin_ms` (its own setting), so this bounds how long an isolated
    /// writer can keep writing and how long a failover waits for the old lease.
    pub duration_ms: u64,
    /// Added to the old lease's end before promoting: covers clock skew between invoker
    /// nodes (the end was stamped by the leader that granted it).
    pub clock_skew_margin_ms: u64,
    /// Longest wait for an agent to fence its primary.
    pub fence_timeout_ms: u64,
    /// Longest wait for an agent to promote its replica (catch-up included).
    pub promote_timeout_ms: u64,
    /// A planned switchover's replica must replay the fenced primary's last position within
    /// this, or the switchover fails (and the old primary takes writes again).
    pub catch_up_timeout_ms: u64,
    /// Zero-loss mode: relax it when no standby has streamed from the primary for this long.
    pub sync_relax_after_ms: u64,
    /// ... and restore it once one has streamed for this long.
    pub sync_restore_after_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration_ms: 3_000,
            clock_skew_margin_ms: 100,
            fence_timeout_ms: 3_000,
            promote_timeout_ms: 20_000,
            catch_up_timeout_ms: 10_000,
            sync_relax_after_ms: 1_000,
            sync_restore_after_ms: 5_000,
        }
    }
}

impl LeaseConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(500..=60_000).contains(&self.duration_ms) {
            return Err(format!(
                "writer_lease.duration_ms {} is out of range (500..=60000)",
                self.duration_ms
            ));
        }
        if self.clock_skew_margin_ms > 10_000 {
            return Err("writer_lease.clock_skew_margin_ms must be at most 10000".into());
        }
        for (name, v) in [
            ("fence_timeout_ms", self.fence_timeout_ms),
            ("promote_timeout_ms", self.promote_timeout_ms),
            ("catch_up_timeout_ms", self.catch_up_timeout_ms),
            ("sync_relax_after_ms", self.sync_relax_after_ms),
            ("sync_restore_after_ms", self.sync_restore_after_ms),
        ] {
            if !(100..=600_000).contains(&v) {
                return Err(format!(
                    "writer_lease.{name} {v} is out of range (100..=600000)"
                ));
            }
        }
        Ok(())
    }
}

type Outbound = mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>;

/// Why a command did not get a result.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no agent of site {0:?} is connected to this leader")]
    NotConnected(String),
    #[error("the agent of site {0:?} did not answer within {1} ms")]
    Timeout(String, u64),
    #[error("the agent of site {site:?} refused: {error}")]
    Refused { site: String, error: String },
}

/// The site agents connected to this node (soft state: they reconnect to a new leader), and
/// the commands waiting for their results.
#[derive(Default)]
pub struct Directory {
    sessions: Mutex<BTreeMap<String, (u64, Outbound)>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<pb::CommandResult>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Directory {
    /// A site agent's session; the newest one per site receives commands. Returns a handle for
    /// [`Directory::unregister`].
    pub fn register(&self, site: &str, outbound: Outbound) -> u64 {
        let generation = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(site.to_string(), (generation, outbound));
        generation
    }

    pub fn unregister(&self, site: &str, generation: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.get(site).is_some_and(|(g, _)| *g == generation) {
            sessions.remove(site);
        }
    }

    pub fn connected(&self, site: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(site)
            .is_some_and(|(_, tx)| !tx.is_closed())
    }

    /// A result arrived on a session.
    pub fn deliver(&self, result: pb::CommandResult) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&result.command_id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => tracing::debug!(id = %result.command_id, "result for no waiting command"),
        }
    }

    /// Sends `command` to `site`'s agent and waits for its result.
    pub async fn command(
        &self,
        site: &str,
        command: pb::AgentCommand,
        timeout: Duration,
    ) -> Result<pb::CommandResult, CommandError> {
        let outbound = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(site)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| CommandError::NotConnected(site.to_string()))?;
        let id = command.command_id.clone();
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), tx);
        let message = pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Command(command)),
        };
        let waited = async {
            outbound
                .send(Ok(message))
                .await
                .map_err(|_| CommandError::NotConnected(site.to_string()))?;
            rx.await
                .map_err(|_| CommandError::NotConnected(site.to_string()))
        };
        let result = tokio::time::timeout(timeout, waited).await;
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let result = result.map_err(|_| {
            CommandError::Timeout(
                site.to_string(),
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            )
        })??;
        if result.ok {
            Ok(result)
        } else {
            Err(CommandError::Refused {
                site: site.to_string(),
                error: result.error,
            })
        }
    }
}

fn step_result(r: &pb::CommandResult) -> StepResult {
    StepResult {
        ok: r.ok,
        lsn: r.lsn,
        ledger_sequence: r.ledger_sequence,
        detail: if r.detail.is_empty() {
            r.error.clone()
        } else {
            r.detail.clone()
        },
        at_ms: crate::now_ms(),
    }
}

/// Runs for the life of the node; acts only while it leads.
pub async fn run(node: Arc<Node>, config: LeaseConfig) {
    let mut events = node.sm.subscribe();
    // Errors already logged, so a step retried every tick logs once per change.
    let mut last_error: BTreeMap<u64, String> = BTreeMap::new();
    loop {
        if node.is_leader() {
            let active: Vec<Proposal> = node
                .sm
                .read()
                .await
                .state
                .proposals
                .values()
                .filter(|p| {
                    matches!(
                        p.status,
                        ProposalStatus::Approved | ProposalStatus::Executing
                    )
                })
                .cloned()
                .collect();
            for proposal in active {
                if let Err(e) = drive(&node, &config, &proposal).await {
                    if last_error.get(&proposal.id) != Some(&e) {
                        tracing::warn!(id = proposal.id, "failover step not done yet: {e}");
                        last_error.insert(proposal.id, e);
                    }
                }
            }
        }
        tokio::select! {
            _ = events.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

async fn commit(node: &Node, reason: &str, command: Command) -> Result<(), String> {
    let request = Request {
        actor: "executor".into(),
        reason: reason.into(),
        at_ms: crate::now_ms(),
        command,
    };
    match node.propose(request).await {
        Ok((_, Response::Applied(Outcome::ProposalDecided(_)))) => Ok(()),
        Ok((_, other)) => Err(format!("unexpected result {other:?}")),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Takes one proposal one step further (or as far as it can go now).
async fn drive(node: &Node, config: &LeaseConfig, p: &Proposal) -> Result<(), String> {
    let id = p.id;
    let plan = p.plan.clone().ok_or("no plan")?;
    let started = Instant::now();
    if p.status == ProposalStatus::Approved {
        let term = node.raft_metrics().current_term;
        commit(
            node,
            "approved: executing",
            Command::BeginFailover { id, term },
        )
        .await?;
        tracing::warn!(id, from = %plan.from_site, to = %plan.to_site, epoch = plan.new_epoch, "failover begun");
        return Ok(());
    }
    let execution = p.execution.clone().ok_or("not begun")?;
    let lease_over_at = execution
        .old_lease_expires_at_ms
        .saturating_add(i64::try_from(config.clock_skew_margin_ms).unwrap_or(0));
    let command_id = |step: &str| format!("proposal-{id}-{step}-epoch-{}", plan.new_epoch);
    if execution.fence.is_none() {
        let command = pb::AgentCommand {
            command_id: command_id("fence"),
            epoch: plan.new_epoch,
            action: Some(pb::agent_command::Action::Fence(pb::FenceDatabase {
                service: p.service.clone(),
                terminate_sessions: true,
            })),
        };
        let fenced = node
            .directory
            .command(
                &plan.from_site,
                command,
                Duration::from_millis(config.fence_timeout_ms),
            )
            .await;
        let step = match fenced {
            Ok(result) => FailoverStep::Fenced(step_result(&result)),
            Err(e) if plan.planned => FailoverStep::Failed(format!(
                "planned switchover: the old primary could not be fenced: {e}"
            )),
            Err(e) if crate::now_ms() >= lease_over_at => FailoverStep::Fenced(StepResult {
                ok: false,
                detail: e.to_string(),
                at_ms: crate::now_ms(),
                ..StepResult::default()
            }),
            Err(e) => {
                return Err(format!(
                    "{e}; the old lease runs {} ms more",
                    lease_over_at - crate::now_ms()
                ))
            }
        };
        commit(
            node,
            "failover: fence",
            Command::RecordFailoverStep { id, step },
        )
        .await?;
        tracing::warn!(
            id,
            ms = started.elapsed().as_millis(),
            "failover fence step recorded"
        );
        return Ok(());
    }
    if execution.promote.is_none() {
        let fenced = execution.fence.as_ref().is_some_and(|f| f.ok);
        let wait = lease_over_at - crate::now_ms();
        if !fenced && wait > 0 {
            // Nothing is promoted while the old writer may still hold its lease.
            tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
        }
        let min_replay_lsn = match (&execution.fence, plan.planned) {
            (Some(f), true) => f.lsn,
            _ => 0,
        };
        let command = pb::AgentCommand {
            command_id: command_id("promote"),
            epoch: plan.new_epoch,
            action: Some(pb::agent_command::Action::Promote(pb::PromoteDatabase {
                service: p.service.clone(),
                min_replay_lsn,
                lease_ms: u32::try_from(config.duration_ms).unwrap_or(u32::MAX),
                catch_up_timeout_ms: u32::try_from(config.catch_up_timeout_ms).unwrap_or(u32::MAX),
            })),
        };
        let promoted = node
            .directory
            .command(
                &plan.to_site,
                command,
                Duration::from_millis(config.promote_timeout_ms),
            )
            .await;
        match promoted {
            Ok(result) => {
                let step = FailoverStep::Promoted(step_result(&result));
                commit(
                    node,
                    "failover: promote",
                    Command::RecordFailoverStep { id, step },
                )
                .await?;
                tracing::warn!(id, lsn = result.lsn, ms = started.elapsed().as_millis(), detail = %result.detail, "failover target promoted");
            }
            Err(CommandError::Refused { error, .. }) if plan.planned && error.contains("catch") => {
                // The replica did not catch up and was not promoted: the switchover is off;
                // the old writer renews its lease again and unfences.
                let step = FailoverStep::Failed(format!("planned switchover: {error}"));
                commit(
                    node,
                    "failover: fail",
                    Command::RecordFailoverStep { id, step },
                )
                .await?;
            }
            Err(e) => return Err(e.to_string()),
        }
        // Complete in the same pass: every millisecond here is a millisecond without payments.
        let now = node.sm.read().await.state.proposals.get(&id).cloned();
        if now
            .as_ref()
            .is_none_or(|q| q.status != ProposalStatus::Executing)
        {
            return Ok(());
        }
    }
    commit(
        node,
        "failover: complete",
        Command::CompleteFailover {
            id,
            lease_ms: config.duration_ms,
        },
    )
    .await?;
    tracing::warn!(id, site = %plan.to_site, epoch = plan.new_epoch, ms = started.elapsed().as_millis(), "failover complete: writer moved");
    Ok(())
}
