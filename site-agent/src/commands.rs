//! The leader's commands to a site agent, each run at most once per `command_id`: the
//! result is remembered and sent again when the same id comes back (the leader re-sends a
//! command whose result it did not see). Transient failures (no answer from the database,
//! recovery not over in time) are not remembered: a repeat runs the command again.
//!
//! - `FenceDatabase`: [`Db::fence`] (sessions terminated when asked). Result: `lsn` =
//!   `pg_current_wal_lsn()` once fenced, `ledger_sequence` = the ledger's highest seq.
//! - `PromoteDatabase{min_replay_lsn, lease_ms, catch_up_timeout_ms}` with
//!   `AgentCommand.epoch` the new epoch: [`Db::promote`]: on a replica, wait until replay
//!   reaches `min_replay_lsn` (0: no wait; on timeout an error and no promotion),
//!   `pg_promote`, wait out of recovery (polled every few ms), read-only off, and in one READ
//!   WRITE transaction both fencing rows move to the epoch with a lease of `lease_ms`
//!   counted from the command's arrival. A primary already holding the epoch answers ok
//!   again; one holding a higher epoch refuses. Result: `lsn` = `pg_current_wal_lsn()` right
//!   after the promotion, `ledger_sequence`, `detail` with the timings. The lease is handed
//!   to the lease loop, which asks the leader to renew it at once.
//! - `InjectFault` / `ClearFault`: refused as unsupported.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use invoker_api::pb;
use tokio::sync::{mpsc, watch};

use crate::db::Db;
use crate::lease::Control;
use crate::AgentError;

/// Results remembered by command id (the oldest forgotten first).
const REMEMBERED: usize = 1024;

pub struct Commands {
    db: Db,
    service: String,
    control: Arc<Control>,
    done: BTreeMap<String, pb::CommandResult>,
    order: VecDeque<String>,
}

impl Commands {
    pub fn new(db: Db, service: &str, control: Arc<Control>) -> Commands {
        Commands {
            db,
            service: service.to_string(),
            control,
            done: BTreeMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Runs commands one at a time until `stop`, sending each result.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<(pb::AgentCommand, Instant)>,
        outgoing: mpsc::Sender<pb::AgentMessage>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let (command, received) = tokio::select! {
                _ = stop.changed() => return,
                c = commands.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            let result = self.handle(command, received).await;
            let message = pb::AgentMessage {
                body: Some(pb::agent_message::Body::CommandResult(result)),
            };
            // The session may be down: the result is remembered and sent again on a repeat.
            if outgoing.try_send(message).is_err() {
                tracing::warn!("no session for a command result: sent again when the leader repeats the command");
            }
        }
    }

    /// The result of `command`: remembered when it already ran, else run now.
    pub async fn handle(
        &mut self,
        command: pb::AgentCommand,
        received: Instant,
    ) -> pb::CommandResult {
        if let Some(result) = self.done.get(&command.command_id) {
            tracing::info!(command_id = %command.command_id, "a repeated command: its remembered result again");
            return result.clone();
        }
        let id = command.command_id.clone();
        let (result, transient) = self.execute(command, received).await;
        if result.ok {
            tracing::info!(command_id = %id, detail = %result.detail, lsn = result.lsn, ledger_sequence = result.ledger_sequence, "command done");
        } else {
            tracing::error!(command_id = %id, error = %result.error, "command failed");
        }
        // A transient failure (the database did not answer, recovery still running) is not
        // remembered: the leader's repeat runs the command again, which is safe because
        // every step is idempotent. Successes and definite refusals (a catch-up timeout, a
        // higher epoch, unsupported) are: a repeat gets them again and runs nothing.
        if !id.is_empty() && !transient {
            self.done.insert(id.clone(), result.clone());
            self.order.push_back(id);
            while self.order.len() > REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
        result
    }

    /// The result, and whether it is a transient failure.
    async fn execute(
        &mut self,
        command: pb::AgentCommand,
        received: Instant,
    ) -> (pb::CommandResult, bool) {
        use pb::agent_command::Action;
        let id = command.command_id.clone();
        let outcome = match command.action {
            Some(Action::Fence(f)) if !f.service.is_empty() && f.service != self.service => {
                Err(self.other_service(&f.service))
            }
            Some(Action::Promote(p)) if !p.service.is_empty() && p.service != self.service => {
                Err(self.other_service(&p.service))
            }
            Some(Action::Fence(fence)) => self.fence(&fence).await,
            Some(Action::Promote(promote)) => self.promote(command.epoch, &promote, received).await,
            Some(Action::InjectFault(f)) => Err(AgentError::Unsupported(format!(
                "inject_fault {:?}: this agent injects no faults",
                f.fault
            ))),
            Some(Action::ClearFault(f)) => Err(AgentError::Unsupported(format!(
                "clear_fault {:?}: this agent injects no faults",
                f.fault
            ))),
            None => Err(AgentError::Unsupported("a command with no action".into())),
        };
        match outcome {
            Ok((detail, positions)) => (
                pb::CommandResult {
                    command_id: id,
                    ok: true,
                    error: String::new(),
                    detail,
                    lsn: positions.lsn,
                    ledger_sequence: positions.ledger_sequence,
                },
                false,
            ),
            Err(e) => (
                pb::CommandResult {
                    command_id: id,
                    ok: false,
                    error: format!("{}: {e}", e.label()),
                    detail: String::new(),
                    lsn: 0,
                    ledger_sequence: 0,
                },
                e.is_transient(),
            ),
        }
    }

    fn other_service(&self, service: &str) -> AgentError {
        AgentError::Unsupported(format!(
            "this agent's database backs {:?}, not {service:?}",
            self.service
        ))
    }

    async fn fence(
        &mut self,
        fence: &pb::FenceDatabase,
    ) -> Result<(String, crate::db::Positions), AgentError> {
        let control = self.control.clone();
        let mut shared = control.shared.lock().await;
        let report = self.db.fence(fence.terminate_sessions).await?;
        shared.fenced_by_command_at = Some(Instant::now());
        let positions = self.db.positions().await?;
        let detail = if report.replica {
            format!("a replica: read-only set in {} ms", report.took_ms)
        } else {
            format!(
                "fenced in {} ms: lease expired, read-only, {} session(s) terminated",
                report.took_ms, report.terminated
            )
        };
        Ok((detail, positions))
    }

    async fn promote(
        &mut self,
        epoch: u64,
        promote: &pb::PromoteDatabase,
        received: Instant,
    ) -> Result<(String, crate::db::Positions), AgentError> {
        if epoch == 0 {
            return Err(AgentError::Unsupported(
                "promote with epoch 0: the command must carry the new epoch".into(),
            ));
        }
        let control = self.control.clone();
        let mut shared = control.shared.lock().await;
        let lease = Duration::from_millis(u64::from(promote.lease_ms));
        let report = self
            .db
            .promote(
                epoch,
                promote.min_replay_lsn,
                Duration::from_millis(u64::from(promote.catch_up_timeout_ms)),
                lease,
                received,
            )
            .await?;
        if report.promoted {
            shared.promoted = Some((epoch, received + lease));
            control.wake.notify_one();
        }
        let detail = if report.promoted {
            format!(
                "promoted to epoch {epoch}: catch-up {} ms, promote {} ms, {} ms from receipt to the epoch write",
                report.catch_up_ms, report.promote_ms, report.total_ms
            )
        } else {
            format!("already the primary of epoch {epoch}")
        };
        Ok((detail, report.positions))
    }
}
