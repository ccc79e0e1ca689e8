//! The wallet failover with human sign-off, step by step, as the end-to-end tests and the
//! benchmark drive it: wait for the proposal, approve it as the lab's on-call operator, wait
//! for the execution, and time the first gift the new writer commits.

use std::time::{Duration, Instant};

use invoker_api::{pb, InvokerClient};

use crate::lab::Lab;
use crate::scenarios::ScenarioError;

fn failed(message: impl Into<String>) -> ScenarioError {
    ScenarioError::Failed(message.into())
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn client(lab: &Lab) -> Result<InvokerClient, ScenarioError> {
    Ok(InvokerClient::connect_leader(&lab.invoker_endpoints()).await?)
}

/// Waits for an open (pending) wallet proposal; returns it with the term it was listed in.
pub async fn wait_for_proposal(
    lab: &Lab,
    within: Duration,
) -> Result<(pb::Proposal, u64), ScenarioError> {
    let started = Instant::now();
    loop {
        if let Ok(client) = client(lab).await {
            if let Ok(listed) = client
                .admin()
                .list_proposals(pb::ListProposalsRequest { pending_only: true })
                .await
            {
                let listed = listed.into_inner();
                if let Some(p) = listed.proposals.iter().find(|p| {
                    p.service == "wallet" && p.status == pb::ProposalStatus::Pending as i32
                }) {
                    return Ok((p.clone(), listed.term));
                }
            }
        }
        if started.elapsed() > within {
            return Err(failed(format!("no wallet proposal within {within:?}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One proposal by id (any status).
pub async fn proposal(lab: &Lab, id: u64) -> Result<pb::Proposal, ScenarioError> {
    let listed = client(lab)
        .await?
        .admin()
        .list_proposals(pb::ListProposalsRequest {
            pending_only: false,
        })
        .await?
        .into_inner();
    listed
        .proposals
        .into_iter()
        .find(|p| p.id == id)
        .ok_or_else(|| failed(format!("no proposal #{id}")))
}

/// The lab's on-call operator and token.
pub fn oncall(lab: &Lab) -> Result<(String, String), ScenarioError> {
    let oncall = lab
        .describe()
        .oncall
        .clone()
        .ok_or_else(|| failed("the lab has no on-call operator"))?;
    let token = std::fs::read_to_string(&oncall.token_file)
        .map_err(|e| failed(format!("reading {}: {e}", oncall.token_file.display())))?;
    Ok((oncall.operator, token.trim().to_string()))
}

/// Approves `proposal` (listed in `term`) as the on-call operator. The gRPC refusal, if any,
/// is returned as is (tests check its code).
pub async fn approve(
    lab: &Lab,
    proposal: &pb::Proposal,
    term: u64,
) -> Result<Result<pb::Proposal, tonic::Status>, ScenarioError> {
    let (operator, token) = oncall(lab)?;
    let reply = client(lab)
        .await?
        .admin()
        .approve_proposal(pb::ApproveProposalRequest {
            id: proposal.id,
            digest: proposal.digest.clone(),
            term,
            approver: operator,
            credential: token,
        })
        .await;
    Ok(reply.map(|r| r.into_inner().proposal.unwrap_or_default()))
}

/// Opens a planned switchover (or a forced failover) of the wallet to `to_site` as the on-call
/// operator; returns the proposal and the term.
pub async fn open_switchover(
    lab: &Lab,
    to_site: &str,
    planned: bool,
) -> Result<(pb::Proposal, u64), ScenarioError> {
    let (operator, token) = oncall(lab)?;
    let client = client(lab).await?;
    let reply = client
        .admin()
        .open_switchover(pb::OpenSwitchoverRequest {
            service: "wallet".into(),
            to_site: to_site.into(),
            planned,
            operator,
            credential: token,
            reason: "drill".into(),
        })
        .await?
        .into_inner();
    let proposal = reply
        .proposal
        .ok_or_else(|| failed("no proposal in the reply"))?;
    let term = client.status().await?.term;
    Ok((proposal, term))
}

/// Waits until proposal `id` is executed; fails if it fails or takes longer than `within`.
pub async fn wait_executed(
    lab: &Lab,
    id: u64,
    within: Duration,
) -> Result<pb::Proposal, ScenarioError> {
    let started = Instant::now();
    loop {
        if let Ok(p) = proposal(lab, id).await {
            match pb::ProposalStatus::try_from(p.status) {
                Ok(pb::ProposalStatus::Executed) => return Ok(p),
                Ok(pb::ProposalStatus::Failed) => {
                    return Err(failed(format!(
                        "proposal #{id} failed: {:?}",
                        p.execution.map(|e| e.error)
                    )))
                }
                _ => {}
            }
        }
        if started.elapsed() > within {
            return Err(failed(format!(
                "proposal #{id} not executed within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The wallet's writer lease as the leader holds it: (site, epoch, expires_at_ms).
pub async fn wallet_lease(lab: &Lab) -> Result<Option<(String, u64, i64)>, ScenarioError> {
    let status = client(lab).await?.status().await?;
    Ok(status
        .routing
        .iter()
        .find(|r| r.service == "wallet")
        .and_then(|r| r.lease.as_ref())
        .map(|l| (l.site.clone(), l.epoch, l.expires_at_ms)))
}

/// Waits until the wallet's current lease has run out (what an on-call human sees before
/// approving: the old writer can no longer write). Returns how long that took.
pub async fn wait_lease_expired(lab: &Lab, within: Duration) -> Result<Duration, ScenarioError> {
    let started = Instant::now();
    loop {
        match wallet_lease(lab).await {
            Ok(Some((_, _, expires))) if unix_ms() > expires + 100 => return Ok(started.elapsed()),
            Ok(None) => return Ok(started.elapsed()),
            _ => {}
        }
        if started.elapsed() > within {
            return Err(failed(format!(
                "the wallet lease did not expire within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One gift send through `edge` with a fresh key: the HTTP status and the body.
pub async fn send_gift(
    http: &reqwest::Client,
    edge: &str,
    user_id: i64,
    key: &str,
) -> Result<(u16, serde_json::Value), ScenarioError> {
    let reply = http
        .post(format!("{edge}/v1/gifts"))
        .header("x-uid", user_id.to_string())
        .json(&serde_json::json!({
            "idempotency_key": key, "user_id": user_id, "streamer_id": 1_000_000_001i64,
            "gift_id": "rose", "count": 1,
        }))
        .send()
        .await
        .map_err(|e| failed(format!("send: {e}")))?;
    let status = reply.status().as_u16();
    let body = reply.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

/// Sends a gift every 10 ms (fresh keys) until one commits; how long after `since`.
pub async fn first_committed_gift(
    edge: &str,
    user_id: i64,
    since: Instant,
    within: Duration,
) -> Result<Duration, ScenarioError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let run = std::process::id();
    for i in 0u64.. {
        let key = format!("first-gift-{run}-{}-{i}", unix_ms());
        if let Ok((200, _)) = send_gift(&http, edge, user_id, &key).await {
            return Ok(since.elapsed());
        }
        if since.elapsed() > within {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(failed(format!("no gift committed within {within:?}")))
}

/// `invokerctl --json wallet lost-report` against the lab; retried for a while when no
/// leader is known (a healed partition may cause an election).
pub fn lost_report(lab: &Lab) -> Result<serde_json::Value, ScenarioError> {
    let bin = crate::lab::find_bin("invokerctl")?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = std::process::Command::new(&bin)
            .args(["--json", "--endpoints", &lab.invoker_endpoints().join(",")])
            .args(["wallet", "lost-report"])
            .output()
            .map_err(|e| failed(format!("running invokerctl: {e}")))?;
        if out.status.success() {
            return serde_json::from_slice(&out.stdout)
                .map_err(|e| failed(format!("lost-report JSON: {e}")));
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if attempts >= 10 || !stderr.contains("leader") {
            return Err(failed(format!("invokerctl wallet lost-report: {stderr}")));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
