//! The site agent against the lab: it finds the instances registered in each site's etcd,
//! probes its own site's instances and database and the peer site's instances, and sees what
//! a SIGKILL or a SIGSTOP does.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use serde_json::Value;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

/// Writes an agent config for `site` (or the witness) into `dir`.
fn write_config(dir: &Path, lab: &Lab, site: &str) -> Result<std::path::PathBuf> {
    let e = &lab.describe().endpoints;
    let role = if site == "witness" { "witness" } else { "site" };
    let host = match site {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    let mut text = format!("bind_ip = \"127.0.{host}.7\"\n");
    text.push_str(&format!(
        "site = {site:?}\nrole = {role:?}\nprobe_timeout_ms = 1000\nprobe_interval_ms = 1000\n"
    ));
    for s in ["a", "b"] {
        text.push_str(&format!(
            "[[sites]]\nsite = {s:?}\netcd_endpoints = [{:?}]\n",
            e.etcd[s]
        ));
        // A site agent probes its own database; the witness probes both.
        if s == site || site == "witness" {
            text.push_str(&format!("database_url = {:?}\n", e.postgres[s]));
        }
    }
    let path = dir.join(format!("agent-{site}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn once(config: &Path) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .args(["--once", "--json", "--config"])
        .arg(config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("the round as JSON")
}

fn find<'a>(list: &'a Value, field: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[field] == value)
        .unwrap_or_else(|| panic!("no {field} = {value} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_probes_its_site_the_peer_and_the_databases() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-")
        .tempdir_in("/tmp")?;
    let mut lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let config_a = write_config(dir.path(), &lab, "a")?;
    let config_b = write_config(dir.path(), &lab, "b")?;
    let config_w = write_config(dir.path(), &lab, "witness")?;

    phase("site a: its instances healthy, its primary, site b reachable");
    let a = once(&config_a)?;
    assert_eq!(a["site"], "a");
    assert_eq!(a["instances"].as_array().unwrap().len(), 2, "{a}");
    for instance in ["gift-api-a", "wallet-a"] {
        let i = find(&a["instances"], "instance", instance);
        assert_eq!(i["healthy"], true, "{i}");
        assert_eq!(i["consecutive_failures"], 0);
    }
    let db = find(&a["databases"], "site", "a");
    assert_eq!(db["role"], "primary", "{db}");
    assert_eq!(db["fencing_epoch"], 1);
    assert!(db["current_wal_lsn"].as_u64().unwrap() > 0);
    assert!(db["ledger_sequence"].is_u64());
    assert_eq!(db["read_only"], false);
    for target in ["gift-api/gift-api-b", "wallet/wallet-b"] {
        assert_eq!(find(&a["peers"], "target", target)["reachable"], true);
    }

    phase("site b: its replica with receive and replay positions");
    let b = once(&config_b)?;
    let db = find(&b["databases"], "site", "b");
    assert_eq!(db["role"], "replica", "{db}");
    assert!(db["receive_lsn"].as_u64().unwrap() >= db["replay_lsn"].as_u64().unwrap());
    assert_eq!(db["current_wal_lsn"], Value::Null);

    phase("the witness: no instances of its own, both sites as peers, both databases");
    let w = once(&config_w)?;
    assert!(w["instances"].as_array().unwrap().is_empty());
    assert_eq!(w["peers"].as_array().unwrap().len(), 4, "{w}");
    assert_eq!(w["databases"].as_array().unwrap().len(), 2);

    phase("gift-api-a SIGKILLed: site a's agent and the witness see it fail");
    lab.kill("gift-api-a")?;
    let a = once(&config_a)?;
    let i = find(&a["instances"], "instance", "gift-api-a");
    assert_eq!(i["healthy"], false, "{i}");
    assert!(i["error"].as_str().unwrap().contains("readyz"), "{i}");
    assert_eq!(
        find(&a["instances"], "instance", "wallet-a")["healthy"],
        true
    );
    let w = once(&config_w)?;
    assert_eq!(
        find(&w["peers"], "target", "gift-api/gift-api-a")["reachable"],
        false
    );

    phase("the primary SIGSTOPped: unreachable within the probe deadline, back after SIGCONT");
    lab.pause("postgres-a")?;
    let started = std::time::Instant::now();
    let a = once(&config_a)?;
    let took = started.elapsed();
    lab.resume("postgres-a")?;
    let db = find(&a["databases"], "site", "a");
    assert_eq!(db["role"], "unreachable", "{db}");
    assert!(
        took.as_secs() < 5,
        "a hung database held the round for {took:?}"
    );
    let a = once(&config_a)?;
    assert_eq!(find(&a["databases"], "site", "a")["role"], "primary");

    phase("long-running: probes until SIGTERM, exits 0");
    let log = std::fs::File::create(dir.path().join("agent-a.log"))?;
    let child = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .arg("--config")
        .arg(&config_a)
        .stderr(log.try_clone()?)
        .stdout(log)
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert_eq!(status.status.code(), Some(0));
    let text = std::fs::read_to_string(dir.path().join("agent-a.log"))?;
    assert!(
        text.contains("failing") && text.contains("gift-api"),
        "{text}"
    );
    assert!(text.contains("site-agent stopped cleanly"), "{text}");

    phase("bad configuration: exit 64 naming the problem");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "site = \"a\"\nrole = \"site\"\nsites = []\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .arg("--config")
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sites"));
    lab.down().await?;
    Ok(())
}

/// `invoker_agent_reports_total{site=..,result=..}` on one invoker node.
async fn reports(lab: &Lab, node: &str, site: &str, result: &str) -> Result<u64> {
    let addr = lab
        .process(node)
        .and_then(|p| p.listen.get("metrics"))
        .context("invoker metrics address")?
        .clone();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let needle = format!("invoker_agent_reports_total{{site=\"{site}\",result=\"{result}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

async fn wait_reports(lab: &Lab, node: &str, site: &str, at_least: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n = reports(lab, node, site, "accepted").await?;
        if n >= at_least {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{node} accepted only {n} reports of site {site}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn hello(
    agent: &str,
    site: &str,
    role: invoker_api::pb::AgentRole,
) -> invoker_api::pb::AgentMessage {
    use invoker_api::pb;
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::AgentHello {
            agent_id: agent.into(),
            site: site.into(),
            role: role as i32,
            version: "test".into(),
            last_seq: 0,
        })),
    }
}

fn report(seq: u64, probe_site: &str) -> invoker_api::pb::AgentMessage {
    use invoker_api::pb;
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Report(pb::AgentReport {
            seq,
            instances: vec![pb::InstanceProbe {
                service: "gift-api".into(),
                instance: "x".into(),
                site: probe_site.into(),
                healthy: true,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

/// Opens a session on `addr` with `messages`; the first answer or the error.
async fn raw_session(
    addr: &str,
    messages: Vec<invoker_api::pb::AgentMessage>,
) -> Result<Result<invoker_api::pb::ControllerMessage, tonic::Status>> {
    use invoker_api::pb;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in messages {
        tx.send(m).await?;
    }
    let answer = match client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => {
            let mut inbound = r.into_inner();
            let first = inbound.message().await;
            // Let the leader read what was sent before the session closes.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            drop(tx);
            match first {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(tonic::Status::unknown("no answer")),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_session_follows_the_leader_and_bad_reports_are_refused() -> Result<()> {
    use invoker_api::pb;
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-session-")
        .tempdir_in("/tmp")?;
    let mut lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let config = write_config(dir.path(), &lab, "a")?;
    let endpoints = lab.invoker_endpoints();
    let mut text = std::fs::read_to_string(&config)?;
    text = format!("invoker_endpoints = {endpoints:?}\n{text}");
    std::fs::write(&config, text)?;

    phase("the agent of site a streams its rounds to the leader");
    let log = std::fs::File::create(dir.path().join("agent-a.log"))?;
    let mut agent = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .arg("--config")
        .arg(&config)
        .stderr(log.try_clone()?)
        .stdout(log)
        .spawn()?;
    let (_, leader) = lab
        .invoker_leader(std::time::Duration::from_secs(10))
        .await?;
    wait_reports(&lab, &leader, "a", 3).await?;

    phase("the leader is SIGKILLed: the agent finds the new leader and goes on");
    lab.kill(&leader)?;
    let (_, new_leader) = lab
        .invoker_leader(std::time::Duration::from_secs(15))
        .await?;
    assert_ne!(new_leader, leader);
    wait_reports(&lab, &new_leader, "a", 3).await?;
    agent.kill()?;
    let _ = agent.wait();

    phase("bad sessions and reports are refused, counted, and change nothing");
    let addr = lab
        .process(&new_leader)
        .and_then(|p| p.main_addr())
        .context("leader address")?
        .to_string();
    let refused = raw_session(&addr, vec![hello("agent-z", "z", pb::AgentRole::Site)]).await?;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    let refused = raw_session(
        &addr,
        vec![hello("agent-w", "witness", pb::AgentRole::Site)],
    )
    .await?;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    let refused = raw_session(&addr, vec![report(1, "b")]).await?;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    let before = reports(&lab, &new_leader, "b", "accepted").await?;
    let answer = raw_session(
        &addr,
        vec![
            hello("agent-test-b", "b", pb::AgentRole::Site),
            report(5, "b"),
            report(5, "b"),
            report(3, "b"),
            report(6, "nowhere"),
            report(7, "b"),
        ],
    )
    .await?;
    assert!(
        matches!(
            answer,
            Ok(pb::ControllerMessage {
                body: Some(pb::controller_message::Body::Accepted(_))
            })
        ),
        "{answer:?}"
    );
    assert_eq!(
        reports(&lab, &new_leader, "b", "accepted").await? - before,
        2
    );
    assert_eq!(reports(&lab, &new_leader, "b", "stale_seq").await?, 2);
    assert_eq!(reports(&lab, &new_leader, "b", "invalid").await?, 1);

    phase("an oversized report (2 MiB) ends the session and counts nothing");
    let accepted_before = reports(&lab, &new_leader, "b", "accepted").await?;
    let mut huge = report(8, "b");
    if let Some(pb::agent_message::Body::Report(r)) = huge.body.as_mut() {
        r.instances[0].error = "x".repeat(2 * 1024 * 1024);
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel)
        .max_encoding_message_size(4 * 1024 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello("agent-test-b3", "b", pb::AgentRole::Site))
        .await?;
    tx.send(huge).await?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _accepted = inbound.message().await?;
    // The leader drops the session on the oversized frame: the stream ends or errors.
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), inbound.message()).await?;
    assert!(!matches!(end, Ok(Some(_))), "the session went on: {end:?}");
    drop(tx);
    assert_eq!(
        reports(&lab, &new_leader, "b", "accepted").await?,
        accepted_before
    );

    phase("a follower sends the agent to the leader");
    let follower = ["invoker-1", "invoker-2", "invoker-3"]
        .into_iter()
        .find(|n| *n != new_leader && *n != leader)
        .context("a live follower")?;
    let follower_addr = lab
        .process(follower)
        .and_then(|p| p.main_addr())
        .context("follower")?
        .to_string();
    let answer = raw_session(
        &follower_addr,
        vec![hello("agent-test-b2", "b", pb::AgentRole::Site)],
    )
    .await?;
    match answer {
        Ok(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::NotLeader(n)),
        }) => {
            assert_eq!(n.leader_addr, addr);
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    lab.down().await?;
    Ok(())
}

/// gift-api's routing table on the leader: (site, buckets) runs.
async fn gift_api_routing(lab: &Lab) -> Result<Vec<(String, u32)>> {
    Ok(drills::scenarios::routing(lab, "gift-api").await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_policy_shifts_gift_api_away_from_a_failed_instance() -> Result<()> {
    use invoker_api::pb;
    let dir = tempfile::Builder::new()
        .prefix("e2e-policy-")
        .tempdir_in("/tmp")?;
    // The lab's own agents (a, b, witness) report to the leader, which runs the policy.
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let mut lab = Lab::start(options).await?;
    let endpoints = lab.invoker_endpoints();
    for agent in ["agent-a", "agent-b", "agent-witness"] {
        assert!(lab.is_running(agent), "{agent} runs");
    }

    phase("all healthy for 4 s: the policy shifts nothing");
    let before = gift_api_routing(&lab).await?;
    assert_eq!(before, vec![("a".to_string(), 512), ("b".to_string(), 512)]);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(gift_api_routing(&lab).await?, before);

    phase("gift-api-a SIGKILLed: every gift-api bucket moves to b, by the policy");
    lab.kill("gift-api-a")?;
    let killed = std::time::Instant::now();
    let deadline = killed + std::time::Duration::from_secs(15);
    loop {
        let runs = gift_api_routing(&lab).await?;
        if runs == vec![("b".to_string(), 1024)] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no shift: {runs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!("shifted {:?} after the kill", killed.elapsed());
    let client = invoker_api::InvokerClient::connect_leader(&endpoints).await?;
    let wallet = client
        .admin()
        .get_routing(pb::GetRoutingRequest {
            service: "wallet".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(wallet.runs.len(), 2, "the wallet was not moved: {wallet:?}");
    let audit = client
        .admin()
        .list_audit(pb::ListAuditRequest {
            limit: 20,
            before_seq: 0,
        })
        .await?
        .into_inner();
    let shift = audit
        .entries
        .iter()
        .find(|e| e.actor == "policy" && e.reason.contains("shift_buckets"))
        .context("the shift in the audit log")?;
    assert!(shift.reason.contains("ServiceFailure"), "{}", shift.reason);
    let shifts = audit
        .entries
        .iter()
        .filter(|e| e.actor == "policy" && e.reason.contains("policy: shift_buckets"))
        .count();
    assert_eq!(shifts, 1, "exactly one automatic shift");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_policy_does_not_shift_on_an_inter_site_partition() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        // nft needs root; CI runs as root, so this only skips on a developer's machine.
        eprintln!("SKIPPED: partitions need root (nft)");
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("e2e-partition-")
        .tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let lab = Lab::start(options).await?;
    let before = gift_api_routing(&lab).await?;

    phase("a and b cannot reach each other; the witness reaches both: 8 s, no shift");
    let partition = drills::scenarios::Partition::between_a_and_b()?;
    // The partition is real: a's agent reports b unreachable.
    let config_a = write_config(dir.path(), &lab, "a")?;
    let a = once(&config_a)?;
    assert_eq!(
        find(&a["peers"], "target", "gift-api/gift-api-b")["reachable"],
        false,
        "the partition does not hold: {a}"
    );
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    assert_eq!(gift_api_routing(&lab).await?, before);
    let client = invoker_api::InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let audit = client
        .admin()
        .list_audit(invoker_api::pb::ListAuditRequest {
            limit: 50,
            before_seq: 0,
        })
        .await?
        .into_inner();
    let shifts: Vec<_> = audit
        .entries
        .iter()
        .filter(|e| e.actor == "policy" && e.action.contains("routing"))
        .collect();
    assert!(
        shifts.is_empty(),
        "the policy shifted on a partition: {shifts:?}"
    );
    drop(partition);

    phase("healed: still no shift");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(gift_api_routing(&lab).await?, before);
    lab.down().await?;
    Ok(())
}

async fn policy_shifts(lab: &Lab) -> Result<Vec<invoker_api::pb::AuditEntry>> {
    let client = invoker_api::InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let audit = client
        .admin()
        .list_audit(invoker_api::pb::ListAuditRequest {
            limit: 200,
            before_seq: 0,
        })
        .await?
        .into_inner();
    Ok(audit
        .entries
        .into_iter()
        .filter(|e| e.actor == "policy" && e.action.contains("routing"))
        .collect())
}

async fn wait_all_on_b(lab: &Lab, within: std::time::Duration) -> Result<std::time::Duration> {
    let started = std::time::Instant::now();
    loop {
        if let Ok(runs) = gift_api_routing(lab).await {
            if runs == vec![("b".to_string(), 1024)] {
                return Ok(started.elapsed());
            }
        }
        anyhow::ensure!(started.elapsed() < within, "gift-api never moved to b");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_policy_leader_killed_mid_shift_shifts_exactly_once() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-midshift-")
        .tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let mut lab = Lab::start(options).await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    phase("gift-api-a SIGKILLed, and the invoker leader 300 ms later, before the trip");
    let (_, leader) = lab
        .invoker_leader(std::time::Duration::from_secs(10))
        .await?;
    lab.kill("gift-api-a")?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    lab.kill(&leader)?;
    let took = wait_all_on_b(&lab, std::time::Duration::from_secs(20)).await?;
    eprintln!("all buckets on b {took:?} after the leader kill");

    phase("exactly one automatic shift, committed by the new leader");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let shifts = policy_shifts(&lab).await?;
    assert_eq!(shifts.len(), 1, "{shifts:?}");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_policy_flapping_instance_shifts_at_most_once_per_hold_down() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-flap-")
        .tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let lab = Lab::start(options).await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    phase("gift-api-a frozen and thawed every 2 s for 16 s (SIGSTOP / SIGCONT)");
    for _ in 0..4 {
        lab.pause("gift-api-a")?;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        lab.resume("gift-api-a")?;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let shifts = policy_shifts(&lab).await?;
    eprintln!("{} automatic shift(s) while flapping", shifts.len());
    assert!(
        shifts.len() <= 1,
        "more than one shift within the 30 s hold-down: {shifts:?}"
    );
    lab.down().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The writer lease, the fence and the promotion, on the lab's real primary and replica. The
// test plays the invoker leader's side of the session through the agent's channels.

mod lease {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use invoker_api::pb;
    use site_agent::lease::LeaseStatus;
    use sqlx::{Connection, PgConnection};
    use tokio::sync::{mpsc, watch};

    pub async fn client(url: &str) -> Result<PgConnection> {
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        Ok(PgConnection::connect_with(&options.application_name("test-client")).await?)
    }

    /// The lease column (migration 20261124000003) and a table the test writes to.
    pub async fn prepare(url: &str) -> Result<()> {
        let mut c = client(url).await?;
        for schema in ["wallet", "shadow_wallet"] {
            sqlx::query(&format!(
                "ALTER TABLE {schema}.fencing ADD COLUMN IF NOT EXISTS lease_until timestamptz NULL"
            ))
            .execute(&mut c)
            .await?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS public.agent_test (id bigint)")
            .execute(&mut c)
            .await?;
        Ok(())
    }

    /// A write in a new session: Ok or the SQLSTATE.
    pub async fn write(url: &str) -> Result<Result<(), String>> {
        let mut c = client(url).await?;
        Ok(sqlx::query("INSERT INTO public.agent_test VALUES (1)")
            .execute(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                sqlx::Error::Database(d) => d.code().unwrap_or_default().to_string(),
                other => other.to_string(),
            }))
    }

    /// (read_only, lease_until - now in ms, epoch) as a new session sees them.
    pub async fn fencing(url: &str) -> Result<(bool, Option<i64>, i64)> {
        let mut c = client(url).await?;
        let row: (bool, Option<i64>, i64) = sqlx::query_as(
            "SELECT current_setting('default_transaction_read_only') = 'on', \
             (extract(epoch FROM lease_until - clock_timestamp()) * 1000)::bigint, epoch \
             FROM wallet.fencing",
        )
        .fetch_one(&mut c)
        .await?;
        Ok(row)
    }

    pub fn config(url: &str) -> Result<site_agent::AgentConfig> {
        Ok(toml::from_str(&format!(
            "site = \"a\"\nrole = \"site\"\ndatabase_timeout_ms = 300\n\
             [[sites]]\nsite = \"a\"\netcd_endpoints = [\"http://127.0.1.2:2379\"]\ndatabase_url = {url:?}\n"
        ))?)
    }

    /// The leader's side of one agent's session.
    pub struct Leader {
        pub from_agent: mpsc::Receiver<pb::AgentMessage>,
        pub to_agent: mpsc::Sender<pb::ControllerMessage>,
        pub status: watch::Receiver<LeaseStatus>,
        pub stop: watch::Sender<bool>,
        pub task: tokio::task::JoinHandle<()>,
    }

    impl Leader {
        pub fn start(url: &str) -> Result<Leader> {
            let config = config(url)?;
            let (out_tx, out_rx) = mpsc::channel(64);
            let (in_tx, in_rx) = mpsc::channel(64);
            let (status_tx, status_rx) = watch::channel(LeaseStatus::default());
            let (stop_tx, stop_rx) = watch::channel(false);
            let controller =
                site_agent::lease::controller(&config, url, in_rx, out_tx, status_tx, stop_rx)?;
            Ok(Leader {
                from_agent: out_rx,
                to_agent: in_tx,
                status: status_rx,
                stop: stop_tx,
                task: tokio::spawn(controller),
            })
        }

        /// A lease request sent from now on (queued ones are dropped, as a session would not
        /// have sent them; so are queued command results).
        pub async fn request(&mut self) -> Result<(pb::LeaseRequest, Instant)> {
            while self.from_agent.try_recv().is_ok() {}
            loop {
                let m = tokio::time::timeout(Duration::from_secs(3), self.from_agent.recv())
                    .await
                    .context("no lease request within 3 s")?
                    .context("the agent stopped")?;
                if let Some(pb::agent_message::Body::LeaseRequest(r)) = m.body {
                    return Ok((r, Instant::now()));
                }
            }
        }

        pub async fn result(&mut self) -> Result<pb::CommandResult> {
            loop {
                let m = tokio::time::timeout(Duration::from_secs(10), self.from_agent.recv())
                    .await
                    .context("no command result within 10 s")?
                    .context("the agent stopped")?;
                if let Some(pb::agent_message::Body::CommandResult(r)) = m.body {
                    return Ok(r);
                }
            }
        }

        pub async fn answer(
            &self,
            request: &pb::LeaseRequest,
            grant: pb::LeaseGrant,
        ) -> Result<()> {
            self.to_agent
                .send(pb::ControllerMessage {
                    body: Some(pb::controller_message::Body::LeaseGrant(pb::LeaseGrant {
                        service: request.service.clone(),
                        epoch: request.epoch,
                        request_id: request.request_id,
                        ..grant
                    })),
                })
                .await?;
            Ok(())
        }

        pub async fn grant(&self, request: &pb::LeaseRequest, duration_ms: u32) -> Result<()> {
            self.answer(
                request,
                pb::LeaseGrant {
                    granted: true,
                    duration_ms,
                    writer_site: "a".into(),
                    writer_epoch: request.epoch,
                    ..Default::default()
                },
            )
            .await
        }

        pub async fn command(&self, command: pb::AgentCommand) -> Result<()> {
            self.to_agent
                .send(pb::ControllerMessage {
                    body: Some(pb::controller_message::Body::Command(command)),
                })
                .await?;
            Ok(())
        }

        /// Waits until the agent's status satisfies `f`.
        pub async fn until(
            &mut self,
            within: Duration,
            what: &str,
            f: impl Fn(&LeaseStatus) -> bool,
        ) -> Result<LeaseStatus> {
            let deadline = Instant::now() + within;
            loop {
                let s = self.status.borrow_and_update().clone();
                if f(&s) {
                    return Ok(s);
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{what}: not within {within:?}: {s:?}"
                );
                let _ =
                    tokio::time::timeout(Duration::from_millis(20), self.status.changed()).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_writer_lease_renews_fences_before_expiry_and_unfences() -> Result<()> {
    use invoker_api::pb;
    use lease::{fencing, write, Leader};
    use std::time::{Duration, Instant};
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-lease-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let url = lab.describe().endpoints.postgres["a"].clone();
    lease::prepare(&url).await?;
    let mut leader = Leader::start(&url)?;

    phase("a primary that never had a lease (lease_until NULL): requests, no fence without grants");
    let (r, _) = leader.request().await?;
    assert_eq!((r.service.as_str(), r.epoch), ("wallet", 1), "{r:?}");
    let (r2, _) = leader.request().await?;
    assert!(r2.request_id > r.request_id);
    let (r3, _) = leader.request().await?;
    let s = leader.status.borrow().clone();
    assert!(!s.enforced && !s.fenced && s.role == "primary", "{s:?}");
    assert!(!fencing(&url).await?.0);
    assert_eq!(write(&url).await?, Ok(()));

    phase("a grant of 2500 ms: held, written into lease_until");
    leader.grant(&r3, 2_500).await?;
    leader
        .until(Duration::from_secs(1), "held", |s| s.held)
        .await?;
    let (read_only, left_ms, _) = fencing(&url).await?;
    let left_ms = left_ms.context("lease_until set")?;
    assert!(!read_only);
    assert!(
        (1_000..=2_500).contains(&left_ms),
        "lease_until - now = {left_ms} ms"
    );

    phase("grants stop: the agent fences the primary before the lease expires");
    let mut open = lease::client(&url).await?;
    sqlx::query("BEGIN").execute(&mut open).await?;
    sqlx::query("SELECT epoch FROM wallet.fencing FOR SHARE")
        .execute(&mut open)
        .await?;
    sqlx::query("INSERT INTO public.agent_test VALUES (2)")
        .execute(&mut open)
        .await?;
    let s = leader
        .until(Duration::from_secs(4), "fenced", |s| s.fenced)
        .await?;
    eprintln!(
        "fenced in {:?} ms, {:?} ms before the lease expired",
        s.last_fence_took_ms, s.last_fence_before_expiry_ms
    );
    let before = s
        .last_fence_before_expiry_ms
        .context("a running lease was fenced")?;
    assert!(before > 0, "fenced after expiry: {s:?}");
    assert!(!s.held);
    let commit = sqlx::query("COMMIT").execute(&mut open).await;
    assert!(
        commit.is_err(),
        "an open transaction committed after the fence"
    );
    let (read_only, left_ms, _) = fencing(&url).await?;
    assert!(read_only);
    assert!(left_ms.context("lease_until")? <= 0);
    assert_eq!(write(&url).await?, Err("25006".to_string()), "read-only");
    let mut check = lease::client(&url).await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM public.agent_test WHERE id = 2")
        .fetch_one(&mut check)
        .await?;
    assert_eq!(count, 0, "the open transaction's insert committed");

    phase(
        "still no grant: a session that comes back reads (the lost-report does) but cannot write",
    );
    let mut late = lease::client(&url).await?;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(
        sqlx::query("SELECT 1").execute(&mut late).await.is_ok(),
        "a reading session was cut off by a renewal while the database was already read-only"
    );
    let late_write = sqlx::query("INSERT INTO public.agent_test VALUES (3)")
        .execute(&mut late)
        .await;
    assert!(
        matches!(&late_write, Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("25006")),
        "a session opened after the fence wrote: {late_write:?}"
    );
    let (read_only, left_ms, _) = fencing(&url).await?;
    assert!(
        read_only && left_ms.is_some_and(|ms| ms <= 0),
        "still fenced"
    );

    phase("a grant again (the partition healed): lease written, unfenced");
    let (r, _) = leader.request().await?;
    leader.grant(&r, 2_500).await?;
    leader
        .until(Duration::from_secs(1), "unfenced", |s| !s.fenced && s.held)
        .await?;
    // The reload reaches new sessions at once.
    let (read_only, left_ms, _) = fencing(&url).await?;
    assert!(!read_only);
    assert!(left_ms.context("lease_until")? > 1_000);
    assert_eq!(write(&url).await?, Ok(()));

    phase("refused but the writer has not moved (a failover executing, no quorum): not fenced yet");
    let (r, _) = leader.request().await?;
    leader
        .answer(
            &r,
            pb::LeaseGrant {
                granted: false,
                error: "proposal #1 moving \"wallet\"'s writer is approved".into(),
                writer_site: "a".into(),
                writer_epoch: 1,
                ..Default::default()
            },
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = leader.status.borrow().clone();
    assert!(s.refusals >= 1 && !s.fenced, "{s:?}");
    assert_eq!(write(&url).await?, Ok(()));
    // A renewal keeps the lease going again.
    let (r, _) = leader.request().await?;
    leader.grant(&r, 2_500).await?;

    phase("the leader says the writer moved (b, epoch 2): fenced at once");
    let (r, _) = leader.request().await?;
    let refused = Instant::now();
    leader
        .answer(
            &r,
            pb::LeaseGrant {
                granted: false,
                error: "a failover is executing".into(),
                writer_site: "b".into(),
                writer_epoch: 2,
                ..Default::default()
            },
        )
        .await?;
    leader
        .until(Duration::from_secs(1), "fenced", |s| s.fenced)
        .await?;
    eprintln!("fenced {:?} after the refusal", refused.elapsed());
    assert_eq!(write(&url).await?, Err("25006".to_string()));
    let (r, _) = leader.request().await?;
    leader.grant(&r, 2_500).await?;
    leader
        .until(Duration::from_secs(1), "unfenced", |s| !s.fenced)
        .await?;

    phase("FenceDatabase: a grant asked for before it never unfences; one asked for after does");
    let (before_fence, _) = leader.request().await?;
    leader
        .command(pb::AgentCommand {
            command_id: "fence-1".into(),
            epoch: 2,
            action: Some(pb::agent_command::Action::Fence(pb::FenceDatabase {
                service: "wallet".into(),
                terminate_sessions: true,
            })),
        })
        .await?;
    let result = leader.result().await?;
    assert!(result.ok, "{result:?}");
    assert!(result.lsn > 0);
    eprintln!("fence command: {}", result.detail);
    leader.grant(&before_fence, 2_500).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fencing(&url).await?.0,
        "a stale grant unfenced the database"
    );
    leader
        .command(pb::AgentCommand {
            command_id: "fence-1".into(),
            epoch: 2,
            action: Some(pb::agent_command::Action::Fence(pb::FenceDatabase {
                service: "wallet".into(),
                terminate_sessions: true,
            })),
        })
        .await?;
    assert_eq!(
        leader.result().await?,
        result,
        "a repeat runs nothing and answers the same"
    );
    leader
        .command(pb::AgentCommand {
            command_id: "fault-1".into(),
            epoch: 2,
            action: Some(pb::agent_command::Action::InjectFault(pb::InjectFault {
                fault: "readyz_fail:gift-api".into(),
                duration_ms: 100,
            })),
        })
        .await?;
    let fault = leader.result().await?;
    assert!(
        !fault.ok && fault.error.contains("unsupported"),
        "{fault:?}"
    );
    // Requests sent after the fence completed.
    loop {
        let (r, _) = leader.request().await?;
        leader.grant(&r, 2_500).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !fencing(&url).await?.0 {
            break;
        }
    }
    assert_eq!(write(&url).await?, Ok(()));

    let _ = leader.stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), leader.task).await;
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_fences_the_primary_and_promotes_the_replica() -> Result<()> {
    use invoker_api::pb;
    use lease::{fencing, write};
    use site_agent::commands::Commands;
    use site_agent::db::Db;
    use site_agent::AgentError;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-promote-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let url_a = lab.describe().endpoints.postgres["a"].clone();
    let url_b = lab.describe().endpoints.postgres["b"].clone();
    lease::prepare(&url_a).await?;
    let timeout = Duration::from_millis(500);
    let mut a = Db::new(&url_a, "wallet", timeout)?;
    let mut b = Db::new(&url_b, "wallet", timeout)?;
    // The replica has replayed the column and the table.
    let started = Instant::now();
    while b.state().await.is_err() || lease::client(&url_b).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "replica not caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    phase("the lease write: lease_until = now + remaining, only for the row's epoch");
    let s = a.state().await?;
    assert!(!s.in_recovery && s.epoch == 1 && !s.read_only, "{s:?}");
    a.write_lease(1, Duration::from_secs(5)).await?;
    let left = a.state().await?.lease_remaining_ms.context("lease")?;
    assert!((4_000..=5_000).contains(&left), "{left}");
    match a.write_lease(7, Duration::from_secs(5)).await {
        Err(AgentError::EpochMismatch {
            expected: 7,
            database: 1,
        }) => {}
        other => panic!("expected an epoch mismatch, got {other:?}"),
    }

    phase("the fence: writes fail, an open transaction's session is killed; twice is fine");
    let mut open = lease::client(&url_a).await?;
    sqlx::query("BEGIN").execute(&mut open).await?;
    sqlx::query("INSERT INTO public.agent_test VALUES (3)")
        .execute(&mut open)
        .await?;
    let report = a.fence(true).await?;
    eprintln!("fence: {report:?}");
    assert!(report.terminated >= 1 && !report.replica, "{report:?}");
    assert!(sqlx::query("COMMIT").execute(&mut open).await.is_err());
    assert_eq!(write(&url_a).await?, Err("25006".into()));
    let (read_only, left, _) = fencing(&url_a).await?;
    assert!(read_only && left.context("lease")? <= 0);
    let mut c = lease::client(&url_a).await?;
    let streaming: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication")
        .fetch_one(&mut c)
        .await?;
    assert_eq!(streaming, 1, "the fence cut the replica's stream");
    let again = a.fence(true).await?;
    assert!(!again.replica);
    assert_eq!(write(&url_a).await?, Err("25006".into()));

    phase("unfence: writes again");
    assert!(a.unfence().await?);
    assert!(!a.unfence().await?, "already off");
    assert_eq!(write(&url_a).await?, Ok(()));

    phase("promote with min_replay_lsn beyond reach: times out, stays a replica");
    let control = Arc::new(site_agent::lease::Control::default());
    let mut commands = Commands::new(
        Db::new(&url_b, "wallet", timeout)?,
        "wallet",
        control.clone(),
    );
    let promote =
        |id: &str, epoch: u64, min_replay_lsn: u64, catch_up_timeout_ms: u32| pb::AgentCommand {
            command_id: id.into(),
            epoch,
            action: Some(pb::agent_command::Action::Promote(pb::PromoteDatabase {
                service: "wallet".into(),
                min_replay_lsn,
                lease_ms: 3_000,
                catch_up_timeout_ms,
            })),
        };
    let far = commands
        .handle(promote("p-far", 2, u64::MAX / 2, 300), Instant::now())
        .await;
    assert!(!far.ok && far.error.contains("catch_up_timeout"), "{far:?}");
    assert!(
        b.state().await?.in_recovery,
        "promoted despite the catch-up timeout"
    );

    phase("the old primary fenced, the replica promoted to epoch 2 once caught up to it");
    let mut fence_commands = Commands::new(Db::new(&url_a, "wallet", timeout)?, "wallet", control);
    let fenced = fence_commands
        .handle(
            pb::AgentCommand {
                command_id: "f-1".into(),
                epoch: 2,
                action: Some(pb::agent_command::Action::Fence(pb::FenceDatabase {
                    service: "wallet".into(),
                    terminate_sessions: true,
                })),
            },
            Instant::now(),
        )
        .await;
    assert!(fenced.ok, "{fenced:?}");
    lab.pause("postgres-b")?;
    let started = Instant::now();
    let frozen = commands
        .handle(promote("p-2", 2, fenced.lsn, 5_000), Instant::now())
        .await;
    let took = started.elapsed();
    lab.resume("postgres-b")?;
    assert!(
        !frozen.ok && frozen.error.contains("database_timeout"),
        "{frozen:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "a frozen replica held the command {took:?}"
    );
    // Not remembered: the leader's repeat of the same command runs it.
    let started = Instant::now();
    let promoted = commands
        .handle(promote("p-2", 2, fenced.lsn, 5_000), Instant::now())
        .await;
    let took = started.elapsed();
    eprintln!("promote: {took:?}: {}", promoted.detail);
    assert!(promoted.ok, "{promoted:?}");
    assert!(promoted.lsn >= fenced.lsn, "{promoted:?} vs {fenced:?}");
    assert_eq!(promoted.ledger_sequence, fenced.ledger_sequence);
    let s = b.state().await?;
    assert!(!s.in_recovery && s.epoch == 2 && !s.read_only, "{s:?}");
    let left = s.lease_remaining_ms.context("lease")?;
    assert!((1_000..=3_000).contains(&left), "{left}");
    assert_eq!(write(&url_b).await?, Ok(()));
    let mut c = lease::client(&url_b).await?;
    let shadow: i64 = sqlx::query_scalar("SELECT epoch FROM shadow_wallet.fencing")
        .fetch_one(&mut c)
        .await?;
    assert_eq!(shadow, 2);
    assert!(took < Duration::from_secs(1), "promotion took {took:?}");

    phase("twice: the same result; a new command for the same epoch: ok; a lower epoch: refused");
    let repeat = commands
        .handle(promote("p-2", 2, fenced.lsn, 5_000), Instant::now())
        .await;
    assert_eq!(repeat, promoted);
    let same = commands
        .handle(promote("p-2b", 2, 0, 5_000), Instant::now())
        .await;
    assert!(same.ok && same.detail.contains("already"), "{same:?}");
    let lower = commands
        .handle(promote("p-1", 1, 0, 5_000), Instant::now())
        .await;
    assert!(
        !lower.ok && lower.error.contains("higher_epoch"),
        "{lower:?}"
    );
    assert_eq!(b.state().await?.epoch, 2);
    assert_eq!(
        write(&url_a).await?,
        Err("25006".into()),
        "the old primary stays fenced"
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_fences_its_primary_while_the_invokers_are_frozen() -> Result<()> {
    use std::time::{Duration, Instant};
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-frozen-")
        .tempdir_in("/tmp")?;
    // The lab's own agents: agent-a keeps the wallet's writer lease through the real leader.
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let lab = Lab::start(options).await?;
    let url = lab.describe().endpoints.postgres["a"].clone();
    lease::prepare(&url).await?;

    phase("agent-a holds the writer lease: lease_until is set and moves forward");
    let started = Instant::now();
    loop {
        if let (false, Some(left), 1) = lease::fencing(&url).await? {
            if left > 1_000 {
                break;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(15),
            "no lease written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    phase("all three invokers frozen: no grant; the primary is fenced before the lease ends");
    let invokers = ["invoker-1", "invoker-2", "invoker-3"];
    for n in invokers {
        lab.pause(n)?;
    }
    let frozen = Instant::now();
    loop {
        // The fence terminates client sessions, this test's own included: ask again.
        let Ok((read_only, left, _)) = lease::fencing(&url).await else {
            anyhow::ensure!(frozen.elapsed() < Duration::from_secs(5), "never fenced");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if read_only {
            assert!(
                left.context("lease")? <= 0,
                "read-only but the lease still runs"
            );
            break;
        }
        anyhow::ensure!(frozen.elapsed() < Duration::from_secs(5), "never fenced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("fenced {:?} after the freeze", frozen.elapsed());
    // Read-only shows before the sessions are terminated: a write session may be cut off.
    let mut written = lease::write(&url).await;
    for _ in 0..20 {
        if written.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        written = lease::write(&url).await;
    }
    assert_eq!(written?, Err("25006".to_string()));
    // The fence logs once its last step is done (read-only shows before).
    let log = lab.process("agent-a").context("agent-a")?.log.clone();
    let (text, line) = loop {
        let text = std::fs::read_to_string(&log)?;
        if let Some(line) = text.lines().find(|l| l.contains("local primary fenced")) {
            break (text.clone(), line.to_string());
        }
        anyhow::ensure!(
            frozen.elapsed() < Duration::from_secs(8),
            "no fence in the log: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{line}");
    // Whichever comes first fences: the timer at expiry minus the margin ("not renewed"),
    // or a renewal round that finds the lease no longer held ("not held").
    assert!(
        text.contains("writer lease not renewed: fencing local primary")
            || line.contains("reason=\"writer lease not held\""),
        "{line}"
    );
    assert!(
        line.contains("before_expiry_ms=Some(") && !line.contains("before_expiry_ms=Some(-"),
        "{line}"
    );

    phase("thawed: a grant again, the primary is unfenced");
    for n in invokers {
        lab.resume(n)?;
    }
    let thawed = Instant::now();
    loop {
        if let (false, Some(left), _) = lease::fencing(&url).await? {
            if left > 0 {
                break;
            }
        }
        anyhow::ensure!(thawed.elapsed() < Duration::from_secs(15), "never unfenced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("unfenced {:?} after the thaw", thawed.elapsed());
    assert_eq!(lease::write(&url).await?, Ok(()));
    lab.down().await?;
    Ok(())
}
