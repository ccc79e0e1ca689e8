//! Automatic failover under steady traffic through the edge router, on the full lab: real
//! invokers, etcd, PostgreSQL with its replica, wallets, gift-apis, agents and the edge.
//! Processes are SIGKILLed or SIGSTOPped; the load generator's availability timeline gives the
//! recovery time (200 ms windows back at >= 99% success), the invoker the shift.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use drills::loadgen::Mix;
use drills::loadgen::{LoadReport, LoadgenConfig};
use drills::scenarios::{self, KillUnderLoad};

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn full_lab(prefix: &str) -> Result<(tempfile::TempDir, Lab)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let lab = Lab::start(options).await?;
    Ok((dir, lab))
}

/// Steady traffic through the edge: `rate` requests/s for `secs`, users already funded.
fn load(edge: &str, rate: u64, secs: u64, mix: Mix) -> LoadgenConfig {
    let mut load = LoadgenConfig::new(vec![edge.to_string()]);
    load.rate_per_sec = rate;
    load.duration_secs = secs;
    load.users = 300;
    load.streamers = 50;
    load.mix = mix;
    load.timeout_ms = 2_000;
    load.initial_balance = 0;
    load
}

fn describe(report: &LoadReport) -> String {
    format!(
        "{} requests, {} committed, {} rejected, {} errors {:?}",
        report.requests, report.committed, report.rejected, report.errors, report.errors_by_reason
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_failover_site_a_application_tier_hard_down_moves_all_traffic_to_b() -> Result<()> {
    let (_dir, mut lab) = full_lab("e2e-tier-down-").await?;
    let edge = scenarios::edge_url(&lab)?;
    let mut funding = load(&edge, 50, 1, Mix::default());
    funding.initial_balance = 1_000_000;
    scenarios::fund_users(&funding).await?;

    phase("50 requests/s through the edge; 3 s in, every site-a process but PostgreSQL SIGKILLed");
    let victims = scenarios::site_a_application_tier(&lab);
    assert!(victims.contains(&"invoker-1".to_string()), "{victims:?}");
    assert!(victims.contains(&"etcd-a".to_string()), "{victims:?}");
    assert!(
        !victims.iter().any(|v| v.starts_with("postgres")),
        "{victims:?}"
    );
    let plan = KillUnderLoad {
        load: load(&edge, 50, 12, Mix::default()),
        kill_after: Duration::from_secs(3),
        victims,
        freeze: false,
        shift_within: Duration::from_secs(15),
    };
    let outcome = scenarios::kill_under_load(&mut lab, &plan).await?;
    eprintln!(
        "RTO {} ms (recovered: {}), {} failed of {} after the kill, worst window {:.2}; shift after {:?}; {}",
        outcome.recovery.rto_ms,
        outcome.recovery.recovered,
        outcome.recovery.failed_after_event,
        outcome.recovery.requests_after_event,
        outcome.recovery.worst_window_rate,
        outcome.shift_after,
        describe(&outcome.report)
    );
    assert!(
        outcome.shift_after.is_some(),
        "gift-api's buckets did not all move to b"
    );
    assert!(
        outcome.recovery.recovered,
        "availability never came back to 99% per 200 ms window: {:?}",
        outcome.report.timeline
    );
    assert_eq!(
        outcome.report.readback.missing, 0,
        "a committed gift was lost"
    );
    assert_eq!(outcome.report.readback.mismatched, 0);
    // A send whose connection to gift-api-a broke after a had committed it is re-sent by the
    // edge to b with the same key, and b answers `duplicate`: the retry was safe. Whether any
    // money moved twice is reconciliation's to say.
    eprintln!(
        "sends answered duplicate: {}",
        outcome.report.send_duplicates
    );

    phase("reconciliation: no money created or lost, every order consistent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = std::process::Command::new(drills::lab::find_bin("reconcile")?)
        .args(["--grace-secs", "2", "--database-url"])
        .arg(&lab.describe().endpoints.postgres["a"])
        .output()?;
    assert!(
        out.status.success(),
        "reconcile: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    phase("invokerctl status shows gift-api 100% on b");
    let bin = drills::lab::find_bin("invokerctl")?;
    let out = std::process::Command::new(bin)
        .args([
            "--json",
            "--endpoints",
            &lab.invoker_endpoints().join(","),
            "status",
        ])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let gift_api = status["routing"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "gift-api")
        .unwrap();
    assert_eq!(gift_api["buckets_per_site"]["b"], 1024, "{gift_api:#}");
    let shifts = scenarios::policy_shifts(&lab).await?;
    assert_eq!(shifts.get("gift-api"), Some(&1), "{shifts:?}");

    phase("the primary still answers: no wallet failover is proposed");
    let client = invoker_api::InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let proposals = client
        .admin()
        .list_proposals(invoker_api::pb::ListProposalsRequest {
            pending_only: false,
        })
        .await?
        .into_inner()
        .proposals;
    assert!(proposals.is_empty(), "{proposals:?}");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_failover_site_a_entirely_down_reads_recover_and_sends_fail_fast() -> Result<()> {
    let (_dir, mut lab) = full_lab("e2e-site-down-").await?;
    let edge = scenarios::edge_url(&lab)?;
    let mut funding = load(&edge, 50, 1, Mix::default());
    funding.initial_balance = 1_000_000;
    scenarios::fund_users(&funding).await?;
    // The replica must have the balances before the primary goes.
    tokio::time::sleep(Duration::from_secs(1)).await;

    phase("balance reads through the edge; 3 s in, every site-a process SIGKILLed, PostgreSQL too");
    let mut reads = load(&edge, 50, 10, Mix::new(0, 1, 0)?);
    reads.readback = false;
    let plan = KillUnderLoad {
        load: reads,
        kill_after: Duration::from_secs(3),
        victims: scenarios::site_a_entirely(&lab),
        freeze: false,
        shift_within: Duration::from_secs(15),
    };
    let outcome = scenarios::kill_under_load(&mut lab, &plan).await?;
    eprintln!(
        "reads: RTO {} ms (recovered: {}), {} failed after the kill; shift after {:?}; {}",
        outcome.recovery.rto_ms,
        outcome.recovery.recovered,
        outcome.recovery.failed_after_event,
        outcome.shift_after,
        describe(&outcome.report)
    );
    assert!(outcome.shift_after.is_some(), "gift-api did not move to b");
    assert!(outcome.recovery.recovered, "reads did not recover");

    phase("the catalog is served; a gift send fails fast with payments_unavailable");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let catalog = http.get(format!("{edge}/v1/catalog")).send().await?;
    assert_eq!(catalog.status(), 200);
    let mut keys = Vec::new();
    for i in 0..5 {
        let key = format!("e2e-site-down-{i}");
        let started = Instant::now();
        let reply = http
            .post(format!("{edge}/v1/gifts"))
            .header("x-uid", "7")
            .json(&serde_json::json!({
                "idempotency_key": key, "user_id": 7, "streamer_id": 1_000_000_001i64,
                "gift_id": "rose", "count": 1,
            }))
            .send()
            .await?;
        let took = started.elapsed();
        let status = reply.status();
        let body: serde_json::Value = reply.json().await?;
        eprintln!("send {i}: {status} in {took:?}: {body}");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "payments_unavailable", "{body}");
        keys.push(key);
    }

    phase("a wallet failover proposal is pending, with its data-loss estimate; nothing moved");
    let out = std::process::Command::new(drills::lab::find_bin("invokerctl")?)
        .args([
            "--json",
            "--endpoints",
            &lab.invoker_endpoints().join(","),
            "proposals",
        ])
        .output()?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let proposals = listed["proposals"].as_array().context("proposals")?;
    assert_eq!(proposals.len(), 1, "{listed:#}");
    let proposal = &proposals[0];
    assert_eq!(proposal["service"], "wallet", "{proposal:#}");
    assert_eq!(proposal["kind"], "failover a -> b", "{proposal:#}");
    let loss = &proposal["data_loss"];
    assert!(
        loss["primary_last_lsn"].as_u64().unwrap_or(0) > 0,
        "{proposal:#}"
    );
    assert!(
        loss["replica_receive_lsn"].as_u64().unwrap_or(0) > 0,
        "{proposal:#}"
    );
    let age_ms = proposal["created_at_ms"].as_i64().unwrap_or(0) - outcome.killed_at_unix_ms as i64;
    eprintln!("proposal opened {age_ms} ms after the kill: {loss}");
    let wallet = scenarios::routing(&lab, "wallet").await?;
    assert_eq!(
        wallet.len(),
        2,
        "the wallet's routing was not touched: {wallet:?}"
    );

    phase("PostgreSQL a back: none of those sends left an order or a debit");
    lab.restart("postgres-a").await?;
    let list = keys
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(",");
    let orders = lab
        .psql(
            "postgres-a",
            "gift",
            &format!("select count(*) from orders.gift_orders where idempotency_key in ({list})"),
        )
        .await?;
    assert_eq!(orders.trim(), "0", "an order was written");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_failover_gift_api_a_not_ready_shifts_gift_api_only() -> Result<()> {
    let (_dir, lab) = full_lab("e2e-readyz-").await?;
    let edge = scenarios::edge_url(&lab)?;
    let mut funding = load(&edge, 50, 1, Mix::default());
    funding.initial_balance = 1_000_000;
    scenarios::fund_users(&funding).await?;
    let wallet_before = scenarios::routing(&lab, "wallet").await?;

    phase("gift-api-a frozen (SIGSTOP: /readyz stops answering) under load through the edge");
    let traffic = tokio::spawn({
        let load = load(&edge, 50, 10, Mix::default());
        async move { drills::loadgen::run(&load).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let frozen = Instant::now();
    lab.pause("gift-api-a")?;
    let shifted =
        scenarios::wait_for_routing(&lab, "gift-api", "b", frozen, Duration::from_secs(15)).await;
    let report = traffic.await??;
    lab.resume("gift-api-a")?;
    let recovery = report
        .timeline
        .recovery_after(frozen_at, scenarios::RTO_THRESHOLD);
    eprintln!(
        "shift after {shifted:?}; RTO {} ms (recovered {}), {} failed; {}",
        recovery.rto_ms,
        recovery.recovered,
        recovery.failed_after_event,
        describe(&report)
    );
    assert!(shifted.is_some(), "gift-api did not move to b");
    assert!(
        recovery.recovered,
        "traffic did not recover: {:?}",
        report.timeline
    );
    assert_eq!(
        scenarios::routing(&lab, "wallet").await?,
        wallet_before,
        "the wallet moved"
    );
    let shifts = scenarios::policy_shifts(&lab).await?;
    assert_eq!(shifts.get("gift-api"), Some(&1), "{shifts:?}");
    assert_eq!(shifts.get("wallet"), None, "{shifts:?}");
    assert_eq!(report.readback.missing, 0);
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_failover_proposal_approvals_are_authenticated_bound_and_audited() -> Result<()> {
    use invoker_api::pb;
    let (_dir, mut lab) = full_lab("e2e-approve-").await?;
    let oncall = lab
        .describe()
        .oncall
        .clone()
        .context("the lab's on-call operator")?;
    let token = std::fs::read_to_string(&oncall.token_file)?
        .trim()
        .to_string();

    phase("site A entirely down: a wallet failover proposal opens");
    let killed = Instant::now();
    for victim in scenarios::site_a_entirely(&lab) {
        lab.kill(&victim)?;
    }
    // Site A's invoker may have been the leader: wait out the election.
    let client = invoker_api::InvokerClient::wait_for_leader(
        &lab.invoker_endpoints(),
        Duration::from_secs(15),
    )
    .await?;
    let (proposal, term) = loop {
        let listed = client
            .admin()
            .list_proposals(pb::ListProposalsRequest { pending_only: true })
            .await?
            .into_inner();
        if let Some(p) = listed.proposals.first() {
            break (p.clone(), listed.term);
        }
        anyhow::ensure!(killed.elapsed() < Duration::from_secs(15), "no proposal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("proposal #{} after {:?}", proposal.id, killed.elapsed());
    let approve =
        |approver: &str, credential: &str, digest: &str, term: u64| pb::ApproveProposalRequest {
            id: proposal.id,
            digest: digest.into(),
            term,
            approver: approver.into(),
            credential: credential.into(),
        };

    phase("refused: an unknown identity, a wrong token, a stale digest, a term since changed");
    let mut admin = client.admin();
    let refusals = [
        (
            approve("mallory", &token, &proposal.digest, term),
            tonic::Code::Unauthenticated,
        ),
        (
            approve(&oncall.operator, "not-the-token", &proposal.digest, term),
            tonic::Code::Unauthenticated,
        ),
        (
            approve(&oncall.operator, &token, "0123456789abcdef", term),
            tonic::Code::FailedPrecondition,
        ),
        (
            approve(&oncall.operator, &token, &proposal.digest, term - 1),
            tonic::Code::FailedPrecondition,
        ),
    ];
    for (request, code) in refusals {
        let err = admin.approve_proposal(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        eprintln!("refused: {}", err.message());
    }

    phase("invokerctl approve by the on-call operator: approved, and a replay is refused");
    let out = std::process::Command::new(drills::lab::find_bin("invokerctl")?)
        .args(["--endpoints", &lab.invoker_endpoints().join(",")])
        .args([
            "approve",
            &proposal.id.to_string(),
            "--yes",
            "--operator",
            &oncall.operator,
        ])
        .arg("--token-file")
        .arg(&oncall.token_file)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("could lose"),
        "the estimate was shown: {stdout}"
    );
    assert!(stdout.contains("is approved"), "{stdout}");
    let replay = admin
        .approve_proposal(approve(&oncall.operator, &token, &proposal.digest, term))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), tonic::Code::FailedPrecondition, "{replay:?}");

    phase("every refusal and the approval are in the audit log");
    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            before_seq: 0,
        })
        .await?
        .into_inner();
    let id = proposal.id;
    let actions: Vec<(String, String)> = audit
        .entries
        .iter()
        .filter(|e| e.action.contains(&format!("#{id}")))
        .map(|e| (e.action.clone(), e.actor.clone()))
        .collect();
    let refused = actions
        .iter()
        .filter(|(a, _)| a.ends_with("refused"))
        .count();
    assert_eq!(refused, 5, "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|(a, who)| a == &format!("proposal.approve #{id}") && who == &oncall.operator),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|(_, who)| who == "mallory"),
        "{actions:?}"
    );
    lab.down().await?;
    Ok(())
}
