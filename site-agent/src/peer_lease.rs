//! The witness agent's renewal of the writer's lease from outside the writer's site.
//!
//! The lease in the writer database says "someone connected to the raft quorum vouches for
//! this writer". Its own site's agent is the first to vouch ([`crate::lease`]); if that one
//! process dies while its site's database and the quorum are fine, nothing would renew the
//! lease, the database would refuse every payment, and (the database still answering) no
//! failover would be proposed either. So the witness agent, which reaches every site's
//! database, renews it too, under stricter rules:
//!
//! - only a primary that is not fenced (read-only off) and whose lease is still running;
//! - its write only pushes a running lease further out (`Db::extend_lease`): it never
//!   revives a lease that ran out or was fenced, and never shortens one;
//! - it never fences and never unfences: that is the writer site's own agent's job.
//!
//! A site cut off from the quorum is cut off from the witness too (or the quorum could not
//! be formed without it), so this never keeps an isolated writer alive.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use invoker_api::pb;
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::db::Db;
use crate::AgentError;

/// Requests remembered while waiting for their grants.
const PENDING_LIMIT: usize = 64;

/// The witness's peer renewal: one `Db` per site whose database it reads.
pub struct PeerLease {
    service: String,
    interval: Duration,
    timeout: Duration,
    dbs: Vec<(String, Db)>,
    next_request: u64,
    /// request_id → (site, epoch, when it was queued).
    pending: BTreeMap<u64, (String, u64, Instant)>,
}

impl PeerLease {
    /// `None` when the agent reads no database (nothing to renew).
    pub fn from_config(config: &AgentConfig) -> Result<Option<PeerLease>, AgentError> {
        let timeout = Duration::from_millis(config.database_timeout_ms);
        let dbs = config
            .sites
            .iter()
            .filter(|s| s.site != config.site)
            .filter_map(|s| s.database_url.as_deref().map(|url| (s.site.clone(), url)))
            .map(|(site, url)| Ok((site, Db::new(url, &config.strong_service, timeout)?)))
            .collect::<Result<Vec<_>, AgentError>>()?;
        if dbs.is_empty() {
            return Ok(None);
        }
        Ok(Some(PeerLease {
            service: config.strong_service.clone(),
            interval: Duration::from_millis(config.lease_renew_interval_ms),
            timeout,
            dbs,
            next_request: 0,
            pending: BTreeMap::new(),
        }))
    }

    /// The database worth vouching for: a running, unfenced primary with a running lease (the
    /// highest epoch if there are several).
    async fn candidate(&mut self) -> Option<(String, u64)> {
        let mut best: Option<(String, u64)> = None;
        for (site, db) in &mut self.dbs {
            let state = match tokio::time::timeout(self.timeout * 2, db.state()).await {
                Ok(Ok(state)) => state,
                _ => continue,
            };
            let leased = state.lease_remaining_ms.is_some_and(|ms| ms > 0);
            if !state.in_recovery
                && !state.read_only
                && leased
                && best.as_ref().is_none_or(|(_, e)| state.epoch > *e)
            {
                best = Some((site.clone(), state.epoch));
            }
        }
        best
    }

    async fn granted(&mut self, grant: &pb::LeaseGrant) {
        let Some((site, epoch, queued)) = self.pending.remove(&grant.request_id) else {
            return;
        };
        if !grant.granted {
            tracing::debug!(%site, epoch, "peer renewal refused: {}", grant.error);
            return;
        }
        let deadline = queued + Duration::from_millis(u64::from(grant.duration_ms));
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        let Some((_, db)) = self.dbs.iter_mut().find(|(s, _)| *s == site) else {
            return;
        };
        if let Err(e) = db.extend_lease(epoch, remaining).await {
            tracing::info!(%site, epoch, "peer renewal not written: {e}");
        }
    }

    /// Renews until `stop`: asks every interval, writes every grant.
    pub async fn run(
        mut self,
        mut incoming: mpsc::Receiver<pb::ControllerMessage>,
        outgoing: mpsc::Sender<pb::AgentMessage>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = ticker.tick() => {
                    let Some((site, epoch)) = self.candidate().await else { continue };
                    self.next_request += 1;
                    let request_id = self.next_request;
                    self.pending.insert(request_id, (site.clone(), epoch, Instant::now()));
                    while self.pending.len() > PENDING_LIMIT {
                        self.pending.pop_first();
                    }
                    let message = pb::AgentMessage {
                        body: Some(pb::agent_message::Body::LeaseRequest(pb::LeaseRequest {
                            service: self.service.clone(),
                            epoch,
                            request_id,
                            site,
                            // Only the writer site's own agent reports its standbys.
                            streaming_standbys: 0,
                            primary_lsn: 0,
                            ledger_sequence: 0,
                        })),
                    };
                    // No session: no grant; the writer site's own agent may still renew.
                    let _ = outgoing.try_send(message);
                }
                message = incoming.recv() => match message {
                    None => return,
                    Some(pb::ControllerMessage {
                        body: Some(pb::controller_message::Body::LeaseGrant(grant)),
                    }) => self.granted(&grant).await,
                    // The witness runs no commands.
                    Some(_) => {}
                },
            }
        }
    }
}
