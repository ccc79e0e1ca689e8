//! An observer's side of the session with the invoker leader: hello, then the latest report
//! whenever a new one is ready. A follower answers `NotLeader` with the leader's address,
//! which is tried next; any failure starts over after a capped exponential backoff with
//! jitter (so agents of a restarted site do not all reconnect in the same millisecond).
//! Observing goes on regardless: reports that find no session are simply superseded.
//!
//! The site agent (probe rounds) and the edge router (real traffic) both report through it;
//! each converts its own observations into a [`pb::AgentReport`] before publishing it.
//!
//! The site agent also talks to the leader through it ([`run_with`] and [`Channels`]): lease
//! requests and command results go out, lease grants and commands come in. What is queued
//! for the leader while no session is up is not sent late: lease requests queued then are
//! dropped when the next session starts (the lease loop just sees no grant); command results
//! are sent (the leader may also repeat the command and get the remembered result).

use std::net::IpAddr;
use std::time::Duration;

use invoker_api::pb;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;

use crate::probe::{DatabaseRole, Round};

const MIN_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;

/// The protobuf form of a round.
pub fn to_report(round: &Round) -> pb::AgentReport {
    pb::AgentReport {
        seq: round.seq,
        observed_at_ms: i64::try_from(round.observed_at_ms).unwrap_or(i64::MAX),
        instances: round
            .instances
            .iter()
            .map(|i| pb::InstanceProbe {
                service: i.service.clone(),
                instance: i.instance.clone(),
                address: i.address.clone(),
                site: i.site.clone(),
                healthy: i.healthy,
                latency_us: u32::try_from(i.latency_us).unwrap_or(u32::MAX),
                error: i.error.clone().unwrap_or_default(),
                consecutive_failures: i.consecutive_failures,
            })
            .collect(),
        databases: round
            .databases
            .iter()
            .map(|d| pb::DatabaseProbe {
                site: d.site.clone(),
                service: d.service.clone(),
                role: match d.role {
                    DatabaseRole::Primary => pb::DatabaseRole::Primary,
                    DatabaseRole::Replica => pb::DatabaseRole::Replica,
                    DatabaseRole::Unreachable => pb::DatabaseRole::Unreachable,
                } as i32,
                current_wal_lsn: d.current_wal_lsn.unwrap_or(0),
                receive_lsn: d.receive_lsn.unwrap_or(0),
                replay_lsn: d.replay_lsn.unwrap_or(0),
                replay_lag_ms: d.replay_lag_ms.unwrap_or(0),
                ledger_sequence: d.ledger_sequence.unwrap_or(0),
                fencing_epoch: d.fencing_epoch.unwrap_or(0),
                read_only: d.read_only.unwrap_or(false),
                error: d.error.clone().unwrap_or_default(),
            })
            .collect(),
        peers: round
            .peers
            .iter()
            .map(|p| pb::PeerProbe {
                target_site: p.target_site.clone(),
                target: p.target.clone(),
                reachable: p.reachable,
                latency_us: u32::try_from(p.latency_us).unwrap_or(u32::MAX),
                error: p.error.clone().unwrap_or_default(),
            })
            .collect(),
        edge: Vec::new(),
    }
}

/// Who reports, and to which invoker nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    /// The observer's own location (`a`, `b`, `witness`).
    pub site: String,
    pub role: pb::AgentRole,
    /// `host:port` of invoker nodes; the session follows the leader among them.
    pub invoker_endpoints: Vec<String>,
    /// Source address of the session, so that a partition of the observer's range cuts it too.
    pub bind_ip: Option<IpAddr>,
}

/// The site agent's two-way traffic with the leader beside its reports.
#[derive(Debug)]
pub struct Channels {
    /// Lease requests and command results to send to the leader.
    pub outgoing: mpsc::Receiver<pb::AgentMessage>,
    /// Lease grants and commands from the leader (dropped when full).
    pub incoming: mpsc::Sender<pb::ControllerMessage>,
}

/// How one session attempt ended.
enum Ended {
    /// Try this address next, at once.
    Redirect(String),
    /// Start over after a backoff.
    Failed(String),
    Stopped,
}

/// Runs sessions until `stop` turns true, sending each new report published in `reports`
/// (reports whose `seq` is not above the last one sent are skipped).
pub async fn run(
    identity: Identity,
    reports: watch::Receiver<Option<pb::AgentReport>>,
    stop: watch::Receiver<bool>,
) {
    run_with(identity, reports, None, stop).await;
}

/// [`run`], with lease requests and command results sent from `channels.outgoing` and lease
/// grants and commands delivered to `channels.incoming`.
pub async fn run_with(
    identity: Identity,
    mut reports: watch::Receiver<Option<pb::AgentReport>>,
    mut channels: Option<Channels>,
    mut stop: watch::Receiver<bool>,
) {
    if identity.invoker_endpoints.is_empty() {
        tracing::info!("no invoker_endpoints: not reporting");
        return;
    }
    let mut backoff_ms = MIN_BACKOFF_MS;
    let mut next = 0usize;
    let mut redirect: Option<String> = None;
    let mut last_seq = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        let endpoint = redirect.take().unwrap_or_else(|| {
            let e = identity.invoker_endpoints[next % identity.invoker_endpoints.len()].clone();
            next += 1;
            e
        });
        match session(
            &identity,
            &endpoint,
            &mut reports,
            channels.as_mut(),
            &mut stop,
            &mut last_seq,
        )
        .await
        {
            Ended::Stopped => return,
            Ended::Redirect(leader) => {
                tracing::info!(from = %endpoint, to = %leader, "following the leader");
                redirect = Some(leader);
                continue;
            }
            Ended::Failed(why) => {
                tracing::info!(invoker = %endpoint, "session: {why}; retrying in about {backoff_ms} ms");
            }
        }
        // Jitter: 50-100% of the backoff.
        let sleep_ms = rand::rng().random_range(backoff_ms / 2..=backoff_ms);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            _ = stop.changed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
}

async fn session(
    identity: &Identity,
    endpoint: &str,
    reports: &mut watch::Receiver<Option<pb::AgentReport>>,
    mut channels: Option<&mut Channels>,
    stop: &mut watch::Receiver<bool>,
    last_seq: &mut u64,
) -> Ended {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let channel = match Endpoint::from_shared(url) {
        Ok(e) => match e
            .connect_timeout(Duration::from_millis(500))
            .local_address(identity.bind_ip)
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(c) => c,
            Err(e) => return Ended::Failed(format!("connect: {e}")),
        },
        Err(e) => return Ended::Failed(format!("bad endpoint: {e}")),
    };
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(4);
    let hello = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::AgentHello {
            agent_id: identity.agent_id.clone(),
            site: identity.site.clone(),
            role: identity.role as i32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            last_seq: *last_seq,
        })),
    };
    if tx.send(hello).await.is_err() {
        return Ended::Failed("session closed before hello".into());
    }
    let mut inbound = match client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return Ended::Failed(format!("{:?}: {}", e.code(), e.message())),
    };
    match inbound.message().await {
        Ok(Some(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Accepted(a)),
        })) => {
            tracing::info!(invoker = %endpoint, leader = a.leader_id, term = a.term, "session accepted");
        }
        Ok(Some(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::NotLeader(n)),
        })) => {
            return if n.leader_addr.is_empty() || n.leader_addr == endpoint {
                Ended::Failed("not the leader, and no leader known".into())
            } else {
                Ended::Redirect(n.leader_addr)
            };
        }
        Ok(_) => return Ended::Failed("unexpected first answer".into()),
        Err(e) => return Ended::Failed(format!("{:?}: {}", e.code(), e.message())),
    }
    // Lease requests queued while no session was up are stale: drop them.
    let mut backlog = Vec::new();
    if let Some(c) = channels.as_deref_mut() {
        while let Ok(m) = c.outgoing.try_recv() {
            if matches!(m.body, Some(pb::agent_message::Body::CommandResult(_))) {
                backlog.push(m);
            }
        }
    }
    for m in backlog {
        if tx.send(m).await.is_err() {
            return Ended::Failed("the session closed".into());
        }
    }
    let mut outgoing_open = channels.is_some();
    loop {
        let next_outgoing = async {
            match channels.as_deref_mut() {
                Some(c) if outgoing_open => c.outgoing.recv().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            message = next_outgoing => {
                let Some(message) = message else {
                    outgoing_open = false;
                    continue;
                };
                if tx.send(message).await.is_err() {
                    return Ended::Failed("the session closed".into());
                }
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    return Ended::Stopped;
                }
                let report = match reports.borrow_and_update().as_ref() {
                    Some(report) if report.seq > *last_seq => report.clone(),
                    _ => continue,
                };
                let seq = report.seq;
                let message = pb::AgentMessage {
                    body: Some(pb::agent_message::Body::Report(report)),
                };
                if tx.send(message).await.is_err() {
                    return Ended::Failed("the session closed".into());
                }
                *last_seq = seq;
            }
            answer = inbound.message() => match answer {
                Ok(Some(pb::ControllerMessage { body: Some(pb::controller_message::Body::NotLeader(n)) })) => {
                    return if n.leader_addr.is_empty() {
                        Ended::Failed("the leader stepped down".into())
                    } else {
                        Ended::Redirect(n.leader_addr)
                    };
                }
                Ok(Some(message)) => {
                    let wanted = matches!(
                        message.body,
                        Some(pb::controller_message::Body::LeaseGrant(_) | pb::controller_message::Body::Command(_))
                    );
                    if let (true, Some(c)) = (wanted, channels.as_deref_mut()) {
                        if c.incoming.try_send(message).is_err() {
                            tracing::warn!("a message from the leader was dropped: its consumer is behind");
                        }
                    }
                }
                Ok(None) => return Ended::Failed("the invoker closed the session".into()),
                Err(e) => return Ended::Failed(format!("{:?}: {}", e.code(), e.message())),
            },
            _ = stop.changed() => return Ended::Stopped,
        }
    }
}
