//! The writer lease of the strong service (`wallet`), kept by the agent of the site whose
//! database is the primary, and the fence that protects it.
//!
//! Every `lease_renew_interval_ms` the loop reads its database (role, fencing epoch E, lease,
//! read-only). While it is a primary it sends `LeaseRequest{service, E, request_id}` and
//! remembers the `Instant` it sent it. A grant holds until sent + `duration_ms` (the leader
//! counts from its commit, later, so the agent's view always expires first); the loop writes
//! it into both fencing rows as `lease_until = clock_timestamp() + remaining` (durations
//! only: the clocks of two hosts are never compared), and unfences a database it had fenced
//! (the partition healed and this site is still the writer).
//!
//! The local primary is fenced ([`crate::db::Db::fence`]): when the lease has less than
//! `fence_margin_ms` left and no grant came (before it expires; logged loudly with how long
//! before expiry the fence completed); at once when the leader answers that the writer has
//! moved (a higher epoch, or this epoch at another site; a writer record below the local
//! epoch is a leader that has not recorded this site's promotion yet, and a refusal that
//! names this site and epoch, e.g. during a failover's execution or without a quorum, lets
//! the lease run out); and again at every renewal while the lease is not held.
//!
//! A database whose fencing row has `lease_until` NULL has never had a lease: nothing is
//! enforced (and nothing fenced for want of a grant) until the first grant or a promotion
//! writes one. A restarted agent adopts the lease the database still holds.
//!
//! Commands from the leader run in [`crate::commands`] beside the loop, on their own
//! connection; both take [`Control::shared`] while they touch the database, so a grant never
//! unfences what a fence command has just fenced (a grant only unfences if its request left
//! after the fence command), and a promotion hands its lease over to the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use invoker_api::pb;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Mutex, Notify};

use crate::config::AgentConfig;
use crate::db::Db;
use crate::AgentError;

/// Unanswered lease requests remembered (the oldest are forgotten first).
const PENDING_LIMIT: usize = 64;

/// What the lease loop and the command worker share.
#[derive(Debug, Default)]
pub struct Shared {
    /// When the last `FenceDatabase` command completed: a grant for a request sent before
    /// it never unfences.
    pub fenced_by_command_at: Option<Instant>,
    /// A promotion's lease for the loop to adopt: (epoch, deadline).
    pub promoted: Option<(u64, Instant)>,
}

#[derive(Debug, Default)]
pub struct Control {
    /// Held while the database is changed (lease loop or command).
    pub shared: Mutex<Shared>,
    /// Wakes the loop at once (after a promotion: request the new epoch's lease now).
    pub wake: Notify,
}

/// The loop's view, for logs (and metrics, once the agent serves any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// `primary`, `replica`, `unreachable`, `unknown`.
    pub role: &'static str,
    /// The local primary's fencing epoch.
    pub epoch: Option<u64>,
    /// A lease is enforced on this database (`lease_until` not NULL, or a grant came).
    pub enforced: bool,
    /// The lease has more than the fence margin left.
    pub held: bool,
    /// Lease time left (0 when none).
    pub remaining_ms: u64,
    /// This agent fenced the database and has not unfenced it since.
    pub fenced: bool,
    pub last_fence_took_ms: Option<u64>,
    /// Lease time left when the last fence completed (negative: after expiry; none: no
    /// lease was running).
    pub last_fence_before_expiry_ms: Option<i64>,
    pub requests_sent: u64,
    pub grants: u64,
    pub refusals: u64,
    pub last_error: Option<String>,
}

/// The lease settings from the agent's configuration.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub site: String,
    pub service: String,
    pub renew_interval: Duration,
    pub fence_margin: Duration,
    pub database_timeout: Duration,
}

impl LeaseSettings {
    pub fn from_config(config: &AgentConfig) -> LeaseSettings {
        LeaseSettings {
            site: config.site.clone(),
            service: config.strong_service.clone(),
            renew_interval: Duration::from_millis(config.lease_renew_interval_ms),
            fence_margin: Duration::from_millis(config.fence_margin_ms),
            database_timeout: Duration::from_millis(config.database_timeout_ms),
        }
    }
}

fn signed_ms(deadline: Instant, now: Instant) -> i64 {
    if deadline >= now {
        i64::try_from(deadline.duration_since(now).as_millis()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(now.duration_since(deadline).as_millis()).unwrap_or(i64::MAX)
    }
}

/// The lease loop of one site agent.
pub struct LeaseLoop {
    settings: LeaseSettings,
    db: Db,
    control: Arc<Control>,
    outgoing: mpsc::Sender<pb::AgentMessage>,
    status: watch::Sender<LeaseStatus>,
    /// The epoch the lease is for (the local primary's).
    epoch: Option<u64>,
    /// Until when the lease holds, in this host's monotonic clock.
    deadline: Option<Instant>,
    enforced: bool,
    fenced: bool,
    /// The database's read-only setting as last seen.
    read_only: bool,
    /// request_id → (sent at, epoch).
    pending: BTreeMap<u64, (Instant, u64)>,
    next_request_id: u64,
    view: LeaseStatus,
    /// Standbys streaming from the local primary, as last seen (sent with each request).
    streaming_standbys: u32,
    /// The local primary's WAL position and ledger sequence, as last seen (sent too).
    positions: (u64, u64),
    /// Zero-loss mode as last applied to the database (`None`: not yet, so the first grant
    /// applies whatever it says).
    synchronous: Option<bool>,
}

impl LeaseLoop {
    pub fn new(
        settings: LeaseSettings,
        database_url: &str,
        control: Arc<Control>,
        outgoing: mpsc::Sender<pb::AgentMessage>,
        status: watch::Sender<LeaseStatus>,
    ) -> Result<LeaseLoop, AgentError> {
        let db = Db::new(database_url, &settings.service, settings.database_timeout)?;
        Ok(LeaseLoop {
            settings,
            db,
            control,
            outgoing,
            status,
            epoch: None,
            deadline: None,
            enforced: false,
            fenced: false,
            read_only: false,
            pending: BTreeMap::new(),
            next_request_id: 1,
            streaming_standbys: 0,
            positions: (0, 0),
            synchronous: None,
            view: LeaseStatus {
                role: "unknown",
                ..LeaseStatus::default()
            },
        })
    }

    /// Until `stop`: renew, handle grants, fence when the lease runs out.
    pub async fn run(
        mut self,
        mut grants: mpsc::Receiver<pb::LeaseGrant>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.settings.renew_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let control = self.control.clone();
        loop {
            // The fence timer: margin before the deadline, while a lease runs.
            let fence_at = self
                .deadline
                .map(|d| d.checked_sub(self.settings.fence_margin).unwrap_or(d));
            let fence_timer = async move {
                match fence_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                () = fence_timer => self.running_out().await,
                grant = grants.recv() => match grant {
                    Some(grant) => self.grant(grant).await,
                    None => return,
                },
                () = control.wake.notified() => self.tick().await,
                _ = ticker.tick() => self.tick().await,
            }
            self.publish();
        }
    }

    fn held(&self, now: Instant) -> bool {
        self.deadline
            .is_some_and(|d| d.saturating_duration_since(now) > self.settings.fence_margin)
    }

    fn publish(&mut self) {
        let now = Instant::now();
        let previous = self.status.borrow().clone();
        self.view.epoch = self.epoch;
        self.view.enforced = self.enforced;
        self.view.held = self.held(now);
        self.view.remaining_ms = self.deadline.map_or(0, |d| {
            u64::try_from(d.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
        });
        self.view.fenced = self.fenced;
        if previous.held != self.view.held && self.view.role == "primary" {
            if self.view.held {
                tracing::info!(epoch = ?self.epoch, remaining_ms = self.view.remaining_ms, "writer lease held");
            } else if self.enforced {
                tracing::warn!(epoch = ?self.epoch, "writer lease lost");
            }
        }
        self.status.send_replace(self.view.clone());
    }

    fn error(&mut self, what: &str, e: &AgentError) {
        let text = format!("{what}: {e}");
        if self.view.last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!("lease loop: {text}");
        }
        self.view.last_error = Some(text);
    }

    /// One renewal round.
    async fn tick(&mut self) {
        let control = self.control.clone();
        let mut shared = control.shared.lock().await;
        if let Some((epoch, deadline)) = shared.promoted.take() {
            tracing::info!(
                epoch,
                "promoted: the promotion's lease is the writer lease now"
            );
            self.epoch = Some(epoch);
            self.deadline = Some(deadline);
            self.enforced = true;
            self.fenced = false;
            self.pending.clear();
        }
        let sent = Instant::now();
        let state = match self.db.state().await {
            Ok(s) => s,
            Err(e) => {
                self.view.role = "unreachable";
                self.error("database", &e);
                return;
            }
        };
        self.view.last_error = None;
        if state.in_recovery {
            if self.view.role != "replica" {
                tracing::info!("the local database is a replica: no writer lease to keep");
            }
            self.view.role = "replica";
            self.epoch = None;
            self.deadline = None;
            self.enforced = false;
            self.fenced = false;
            self.pending.clear();
            return;
        }
        self.view.role = "primary";
        self.read_only = state.read_only;
        if self.epoch != Some(state.epoch) {
            // First sight of this epoch (start, or promoted by someone else): adopt what the
            // database itself enforces, counted from before the question was asked.
            self.epoch = Some(state.epoch);
            self.deadline = state
                .lease_remaining_ms
                .and_then(|r| u64::try_from(r).ok())
                .filter(|r| *r > 0)
                .map(|r| sent + Duration::from_millis(r));
            self.enforced = false;
            self.pending.clear();
            tracing::info!(epoch = state.epoch, lease_remaining_ms = ?state.lease_remaining_ms, read_only = state.read_only, "the local database is the primary");
        }
        self.enforced |= state.lease_remaining_ms.is_some();
        self.streaming_standbys = state.streaming_standbys;
        self.positions = (state.wal_lsn, state.ledger_sequence);
        self.request(state.epoch);
        if self.enforced && !self.held(Instant::now()) {
            // Keep fencing while the lease is not held. Sessions are terminated only until the
            // database is seen read-only: later ones cannot commit a ledger entry (read-only,
            // lease expired at COMMIT), and operators must be able to read an old primary
            // (the lost-transaction report) without being cut off every renewal.
            let terminate = !(self.fenced && state.read_only);
            self.fence_with("writer lease not held", terminate).await;
        }
        drop(shared);
    }

    fn request(&mut self, epoch: u64) {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let message = pb::AgentMessage {
            body: Some(pb::agent_message::Body::LeaseRequest(pb::LeaseRequest {
                service: self.settings.service.clone(),
                epoch,
                request_id,
                site: String::new(),
                streaming_standbys: self.streaming_standbys,
                primary_lsn: self.positions.0,
                ledger_sequence: self.positions.1,
            })),
        };
        let sent = Instant::now();
        // No session (or a full queue): no request, so no grant; the lease runs out.
        if self.outgoing.try_send(message).is_ok() {
            self.view.requests_sent += 1;
            self.pending.insert(request_id, (sent, epoch));
            while self.pending.len() > PENDING_LIMIT {
                self.pending.pop_first();
            }
        }
    }

    /// The fence timer fired: no grant extended the lease in time.
    async fn running_out(&mut self) {
        let control = self.control.clone();
        let _shared = control.shared.lock().await;
        let now = Instant::now();
        let Some(deadline) = self.deadline else {
            return;
        };
        if self.held(now) {
            return; // a grant came while waiting for the lock
        }
        tracing::error!(
            epoch = ?self.epoch,
            remaining_ms = signed_ms(deadline, now),
            "writer lease not renewed: fencing local primary"
        );
        self.fence("writer lease not renewed").await;
    }

    /// Fences the local primary and forgets the lease.
    async fn fence(&mut self, reason: &str) {
        self.fence_with(reason, true).await;
    }

    async fn fence_with(&mut self, reason: &str, terminate: bool) {
        let deadline = self.deadline.take();
        match self.db.fence(terminate).await {
            Ok(report) => {
                let left = deadline.map(|d| signed_ms(d, Instant::now()));
                self.view.last_fence_took_ms = Some(report.took_ms);
                self.view.last_fence_before_expiry_ms = left;
                if !self.fenced {
                    tracing::error!(
                        reason,
                        took_ms = report.took_ms,
                        before_expiry_ms = ?left,
                        terminated = report.terminated,
                        lease_retried = report.lease_retried,
                        "local primary fenced (lease expired in the database, read-only, sessions terminated)"
                    );
                } else if report.terminated > 0 {
                    tracing::debug!(
                        terminated = report.terminated,
                        "still fenced: sessions terminated again"
                    );
                }
                self.fenced = true;
                self.read_only = true;
            }
            Err(e) => {
                self.error("fence", &e);
                tracing::error!(reason, "FENCE FAILED: {e} (the database's own lease_until still expires; retrying at the next renewal)");
            }
        }
    }

    async fn grant(&mut self, grant: pb::LeaseGrant) {
        if grant.service != self.settings.service {
            return;
        }
        let Some((sent, epoch)) = self.pending.remove(&grant.request_id) else {
            tracing::debug!(
                request_id = grant.request_id,
                "a grant for no pending request: ignored"
            );
            return;
        };
        let control = self.control.clone();
        let mut shared = control.shared.lock().await;
        if !grant.granted {
            self.view.refusals += 1;
            let current = self.epoch.unwrap_or(epoch);
            // Moved: a newer epoch, or this epoch at another site. A writer record BEHIND the
            // local epoch is the leader not having recorded this site's promotion yet (it
            // does once the promote result arrives): the promotion's lease runs meanwhile.
            let moved = grant.writer_epoch > current
                || (grant.writer_epoch == current && grant.writer_site != self.settings.site);
            if moved {
                tracing::error!(
                    writer_site = %grant.writer_site,
                    writer_epoch = grant.writer_epoch,
                    local_epoch = current,
                    error = %grant.error,
                    "the writer is no longer this site's database: fencing local primary"
                );
                self.enforced = true;
                // Sessions are terminated until the database is read-only, not at every
                // refused renewal: operators read the old primary (the lost-report).
                let terminate = !(self.fenced && self.read_only);
                self.fence_with("the writer moved", terminate).await;
            } else {
                tracing::warn!(
                    writer_site = %grant.writer_site,
                    writer_epoch = grant.writer_epoch,
                    error = %grant.error,
                    "writer lease not granted (the writer has not moved): the lease runs out"
                );
            }
            return;
        }
        if self.epoch != Some(epoch) || grant.epoch != epoch {
            return; // the epoch changed since the request: stale
        }
        if shared.fenced_by_command_at.is_some_and(|at| sent <= at) {
            tracing::info!(
                request_id = grant.request_id,
                "a grant asked for before the leader's fence command: ignored"
            );
            return;
        }
        let now = Instant::now();
        let deadline = sent + Duration::from_millis(u64::from(grant.duration_ms));
        if deadline <= now {
            return;
        }
        self.view.grants += 1;
        self.enforced = true;
        if self.deadline.is_none_or(|d| deadline > d) {
            self.deadline = Some(deadline);
        }
        let remaining = self
            .deadline
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
        if let Err(e) = self.db.write_lease(epoch, remaining).await {
            self.error("lease write", &e);
            if matches!(e, AgentError::EpochMismatch { .. }) {
                // Someone else moved the epoch: re-read at the next round.
                self.epoch = None;
                self.deadline = None;
                return;
            }
        }
        if self.synchronous != Some(grant.synchronous_standby) {
            match self.db.set_synchronous(grant.synchronous_standby).await {
                Ok(()) => {
                    tracing::warn!(
                        synchronous = grant.synchronous_standby,
                        "zero-loss mode applied (synchronous_standby_names)"
                    );
                    self.synchronous = Some(grant.synchronous_standby);
                }
                Err(e) => self.error("synchronous_standby_names", &e),
            }
        }
        if self.fenced || self.read_only {
            match self.db.unfence().await {
                Ok(_) => {
                    tracing::warn!(
                        epoch,
                        remaining_ms = remaining.as_millis(),
                        "writer lease granted again: local primary unfenced"
                    );
                    self.fenced = false;
                    self.read_only = false;
                    shared.fenced_by_command_at = None;
                }
                Err(e) => self.error("unfence", &e),
            }
        }
    }
}

/// Splits what the leader sends: grants to the lease loop, commands (with the instant they
/// arrived) to the command worker.
async fn route(
    mut incoming: mpsc::Receiver<pb::ControllerMessage>,
    grants: mpsc::Sender<pb::LeaseGrant>,
    commands: mpsc::Sender<(pb::AgentCommand, Instant)>,
) {
    while let Some(message) = incoming.recv().await {
        let dropped = match message.body {
            Some(pb::controller_message::Body::LeaseGrant(g)) => grants
                .try_send(g)
                .err()
                .map(|_| "lease loop behind: a grant was dropped".to_string()),
            Some(pb::controller_message::Body::Command(c)) => {
                let id = c.command_id.clone();
                commands
                    .try_send((c, Instant::now()))
                    .err()
                    .map(|_| format!("command queue full: {id} dropped (the leader re-sends it)"))
            }
            _ => None,
        };
        if let Some(why) = dropped {
            tracing::warn!("{why}");
        }
    }
}

/// The site agent's control side: the lease loop, the command worker and the router between
/// them and the session; the future runs until `stop`. Fails only on a bad database URL.
pub fn controller(
    config: &AgentConfig,
    database_url: &str,
    incoming: mpsc::Receiver<pb::ControllerMessage>,
    outgoing: mpsc::Sender<pb::AgentMessage>,
    status: watch::Sender<LeaseStatus>,
    stop: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, AgentError> {
    let settings = LeaseSettings::from_config(config);
    let control = Arc::new(Control::default());
    let lease = LeaseLoop::new(
        settings.clone(),
        database_url,
        control.clone(),
        outgoing.clone(),
        status,
    )?;
    let commands = crate::commands::Commands::new(
        Db::new(database_url, &settings.service, settings.database_timeout)?,
        &settings.service,
        control,
    );
    Ok(async move {
        let (grants_tx, grants_rx) = mpsc::channel(64);
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let router = route(incoming, grants_tx, commands_tx);
        tokio::select! {
            () = lease.run(grants_rx, stop.clone()) => {}
            () = commands.run(commands_rx, outgoing, stop) => {}
            () = router => {}
        }
    })
}
