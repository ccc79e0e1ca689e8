//! Zero-loss mode on the leader: relax a strong service's synchronous replication, as a
//! recorded decision, when its primary has no standby streaming (the other site is down: the
//! primary would otherwise wait forever), and restore it once a standby streams again.
//!
//! What the primary sees comes with its site agent's lease requests (`streaming_standbys`);
//! the decision goes through raft (`RelaxSyncReplication`, audited with the reason), and the
//! agent applies it on its next grant (`LeaseGrant.synchronous_standby`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use invoker_domain::{Command, Request};

use crate::executor::LeaseConfig;
use crate::node::Node;

/// A report older than this says nothing (the writer site's agent is gone).
const STALE_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Seen {
    streaming: bool,
    /// Since when `streaming` has had this value.
    since: Instant,
    at: Instant,
}

/// What each strong service's writer site last said about its standbys (soft state on the
/// leader; a new leader hears it again within a renewal interval).
#[derive(Debug, Default)]
pub struct Standbys(Mutex<BTreeMap<String, Seen>>);

impl Standbys {
    pub fn observe(&self, service: &str, streaming_standbys: u32) {
        let now = Instant::now();
        let streaming = streaming_standbys > 0;
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let since = match seen.get(service) {
            Some(s) if s.streaming == streaming && now.duration_since(s.at) < STALE_AFTER => {
                s.since
            }
            _ => now,
        };
        seen.insert(
            service.to_string(),
            Seen {
                streaming,
                since,
                at: now,
            },
        );
    }

    /// (streaming, for how long), when fresh.
    fn get(&self, service: &str) -> Option<(bool, Duration)> {
        let seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let s = seen.get(service)?;
        let now = Instant::now();
        (now.duration_since(s.at) < STALE_AFTER).then(|| (s.streaming, now.duration_since(s.since)))
    }
}

/// Runs for the life of the node; decides only while it leads.
pub async fn run(node: Arc<Node>, config: LeaseConfig) {
    let relax_after = Duration::from_millis(config.sync_relax_after_ms);
    let restore_after = Duration::from_millis(config.sync_restore_after_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !node.is_leader() {
            continue;
        }
        let modes: Vec<(String, bool)> = node
            .sm
            .read()
            .await
            .state
            .sync_replication
            .iter()
            .filter(|(_, m)| m.enabled)
            .map(|(service, m)| (service.clone(), m.relaxed))
            .collect();
        for (service, relaxed) in modes {
            let Some((streaming, for_how_long)) = node.standbys.get(&service) else {
                continue;
            };
            let (relax, reason) = if !relaxed && !streaming && for_how_long >= relax_after {
                (
                    true,
                    format!(
                        "no standby has streamed from the primary for {} ms: relaxed so that it keeps committing",
                        for_how_long.as_millis()
                    ),
                )
            } else if relaxed && streaming && for_how_long >= restore_after {
                (
                    false,
                    format!(
                        "a standby has streamed for {} ms: zero-loss mode restored",
                        for_how_long.as_millis()
                    ),
                )
            } else {
                continue;
            };
            let request = Request {
                actor: "controller".into(),
                reason,
                at_ms: crate::now_ms(),
                command: Command::RelaxSyncReplication {
                    service: service.clone(),
                    relaxed: relax,
                },
            };
            match node.propose(request).await {
                Ok(_) => {
                    tracing::warn!(%service, relaxed = relax, "zero-loss mode changed by the controller")
                }
                Err(e) => tracing::warn!(%service, "zero-loss mode change not committed: {e:?}"),
            }
        }
    }
}
