//! The invoker cluster on real processes: three `invoker` binaries started by the lab, killed,
//! frozen (SIGSTOP), restarted. Each test is a sequence of logged phases.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drills::lab::{Lab, LabOptions, RaftOverrides};
use invoker_api::pb::admin_client::AdminClient;
use invoker_api::{pb, InvokerClient};
use invoker_domain::BUCKETS;
use tonic::transport::Channel;

const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

fn run(site: &str, count: u32) -> pb::BucketRun {
    pb::BucketRun {
        site: site.into(),
        count,
    }
}

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn start_lab(raft: RaftOverrides) -> Result<(tempfile::TempDir, Lab)> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-raft-")
        .tempdir_in("/tmp")?;
    let mut opts = LabOptions::invokers_only(dir.path());
    opts.raft = raft;
    let lab = Lab::start(opts).await.context("starting the lab")?;
    Ok((dir, lab))
}

async fn leader_admin(lab: &Lab) -> Result<AdminClient<Channel>> {
    Ok(
        InvokerClient::wait_for_leader(&lab.invoker_endpoints(), LEADER_TIMEOUT)
            .await?
            .admin(),
    )
}

fn node_admin(lab: &Lab, name: &str) -> Result<AdminClient<Channel>> {
    let addr = lab
        .process(name)
        .and_then(|p| p.main_addr())
        .with_context(|| format!("{name} has no address"))?;
    Ok(InvokerClient::connect_node(addr)?.admin())
}

fn set_all(service: &str, site: &str, reason: &str) -> pb::SetRoutingRequest {
    pb::SetRoutingRequest {
        service: service.into(),
        runs: vec![run(site, BUCKETS as u32)],
        expected_version: 0,
        actor: "e2e".into(),
        reason: reason.into(),
    }
}

fn weights(a: u32, b: u32) -> Vec<pb::BucketRun> {
    let weights = [("a".to_string(), a), ("b".to_string(), b)]
        .into_iter()
        .collect();
    invoker_api::convert::runs_to_pb(
        &invoker_domain::RoutingTable::runs_from_weights("gift-api", &weights)
            .expect("valid weights"),
    )
}

async fn get_routing(
    admin: &mut AdminClient<Channel>,
    service: &str,
    consistency: pb::ReadConsistency,
) -> Result<pb::RoutingTable> {
    Ok(admin
        .get_routing(pb::GetRoutingRequest {
            service: service.into(),
            consistency: consistency as i32,
        })
        .await?
        .into_inner())
}

async fn status_of(lab: &Lab, name: &str) -> Result<pb::ClusterStatus> {
    let mut admin = node_admin(lab, name)?;
    Ok(admin
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner())
}

/// Waits for a leader other than `old`; returns (id, name, elapsed).
async fn new_leader(lab: &Lab, old: u64) -> Result<(u64, String, Duration)> {
    let started = Instant::now();
    while started.elapsed() < LEADER_TIMEOUT {
        if let Ok((id, name)) = lab.invoker_leader(Duration::from_secs(1)).await {
            if id != old {
                return Ok((id, name, started.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no new leader within {LEADER_TIMEOUT:?}")
}

/// Waits until `check` holds for `name`'s status.
async fn wait_status(
    lab: &Lab,
    name: &str,
    what: &str,
    check: impl Fn(&pb::ClusterStatus) -> bool,
) -> Result<pb::ClusterStatus> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < LEADER_TIMEOUT {
        match status_of(lab, name).await {
            Ok(s) if check(&s) => return Ok(s),
            Ok(s) => last = Some(s),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{name}: {what} not reached; last status {last:?}")
}

#[tokio::test]
async fn e2e_three_nodes_elect_one_leader() -> Result<()> {
    let (_dir, lab) = start_lab(RaftOverrides::default()).await?;
    phase("every node agrees on one leader and three voters");
    let (leader, _) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    for name in ["invoker-1", "invoker-2", "invoker-3"] {
        let s = wait_status(&lab, name, "knows the leader", |s| s.leader_id == leader).await?;
        assert_eq!(s.members.len(), 3, "{name}: {s:?}");
        assert!(s.members.iter().all(|m| m.voter));
        let sites: Vec<&str> = s.members.iter().map(|m| m.site.as_str()).collect();
        assert_eq!(sites, ["a", "b", "witness"]);
    }
    phase("the lab's topology is there");
    let mut admin = leader_admin(&lab).await?;
    let t = get_routing(&mut admin, "gift-api", pb::ReadConsistency::Linearizable).await?;
    assert_eq!(t.runs.iter().map(|r| r.count).sum::<u32>(), BUCKETS as u32);
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_sigkill_leader_keeps_committed_routing() -> Result<()> {
    let (_dir, mut lab) = start_lab(RaftOverrides::default()).await?;
    let mut admin = leader_admin(&lab).await?;
    phase("commit a routing change");
    let set = admin
        .set_routing(set_all("gift-api", "b", "drain a before the kill"))
        .await?
        .into_inner();
    assert!(set.changed);
    let version = set.table.context("table")?.version;

    phase("SIGKILL the leader");
    let (old, old_name) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    lab.kill(&old_name)?;
    let (new, _, elapsed) = new_leader(&lab, old).await?;
    eprintln!("new leader {new} after {elapsed:?} (from the kill, as seen by a client)");
    assert_ne!(new, old);

    phase("the change committed before the kill is still there");
    let mut admin = leader_admin(&lab).await?;
    let t = get_routing(&mut admin, "gift-api", pb::ReadConsistency::Linearizable).await?;
    assert_eq!(t.version, version);
    assert!(t.runs == [run("b", BUCKETS as u32)]);

    phase("and the cluster of two keeps taking writes");
    let set = admin
        .set_routing(set_all("gift-api", "a", "back to a"))
        .await?
        .into_inner();
    assert_eq!(set.table.context("table")?.version, version + 1);
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_sigstop_leader_then_it_rejoins_as_follower() -> Result<()> {
    let (_dir, lab) = start_lab(RaftOverrides::default()).await?;
    let mut admin = leader_admin(&lab).await?;
    admin
        .set_routing(set_all("gift-api", "b", "before the freeze"))
        .await?;

    phase("SIGSTOP the leader");
    let (old, old_name) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    lab.pause(&old_name)?;
    let (new, _, elapsed) = new_leader(&lab, old).await?;
    eprintln!("new leader {new} after {elapsed:?}");

    phase("write through the new leader while the old one is frozen");
    let mut admin = leader_admin(&lab).await?;
    let t = get_routing(&mut admin, "gift-api", pb::ReadConsistency::Linearizable).await?;
    assert!(
        t.runs == [run("b", BUCKETS as u32)],
        "change before the freeze lost"
    );
    let set = admin
        .set_routing(pb::SetRoutingRequest {
            runs: weights(25, 75),
            ..set_all("gift-api", "", "during the freeze")
        })
        .await?
        .into_inner();
    let latest = set.table.context("table")?;

    phase("SIGCONT: the old leader rejoins as a follower and catches up");
    lab.resume(&old_name)?;
    let s = wait_status(
        &lab,
        &old_name,
        "follower of the new leader, caught up",
        |s| {
            s.leader_id == new
                && s.state == pb::NodeState::Follower as i32
                && s.last_applied >= set.log_index
        },
    )
    .await?;
    assert!(s.term > 0);
    let mut old_admin = node_admin(&lab, &old_name)?;
    let local = get_routing(&mut old_admin, "gift-api", pb::ReadConsistency::Local).await?;
    assert_eq!(local, latest, "the rejoined node serves the latest table");
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_all_nodes_restarted_recover_state_from_disk() -> Result<()> {
    let (_dir, mut lab) = start_lab(RaftOverrides::default()).await?;
    let mut admin = leader_admin(&lab).await?;
    phase("write a few changes");
    for (i, (a, b)) in [(10, 90), (60, 40), (33, 67)].into_iter().enumerate() {
        admin
            .set_routing(pb::SetRoutingRequest {
                runs: weights(a, b),
                ..set_all("gift-api", "", &format!("change {i}"))
            })
            .await?;
    }
    let before = admin
        .get_state(pb::GetStateRequest { consistency: 0 })
        .await?
        .into_inner();
    let audit_before = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            before_seq: 0,
        })
        .await?
        .into_inner();

    phase("SIGKILL all three nodes, then start them again");
    for name in ["invoker-1", "invoker-2", "invoker-3"] {
        lab.kill(name)?;
    }
    for name in ["invoker-1", "invoker-2", "invoker-3"] {
        lab.restart(name).await?;
    }

    phase("the state is back, identical");
    let mut admin = leader_admin(&lab).await?;
    let after = admin
        .get_state(pb::GetStateRequest { consistency: 0 })
        .await?
        .into_inner();
    assert_eq!(after, before);
    let audit_after = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            before_seq: 0,
        })
        .await?
        .into_inner();
    assert_eq!(audit_after, audit_before);
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_write_sent_to_a_follower_succeeds() -> Result<()> {
    let (_dir, lab) = start_lab(RaftOverrides::default()).await?;
    let (leader, _) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    let follower = ["invoker-1", "invoker-2", "invoker-3"]
        .into_iter()
        .find(|n| lab.process(n).and_then(|p| p.node_id) != Some(leader))
        .context("a follower")?;
    phase(&format!("set routing through {follower}"));
    let mut admin = node_admin(&lab, follower)?;
    let set = admin
        .set_routing(set_all("gift-api", "b", "through a follower"))
        .await?
        .into_inner();
    assert!(set.changed);
    phase("the leader has it");
    let mut leader_admin = leader_admin(&lab).await?;
    let t = get_routing(
        &mut leader_admin,
        "gift-api",
        pb::ReadConsistency::Linearizable,
    )
    .await?;
    assert_eq!(Some(t), set.table);
    phase("and a linearizable read through the follower sees it too");
    let t = get_routing(&mut admin, "gift-api", pb::ReadConsistency::Linearizable).await?;
    assert!(t.runs == [run("b", BUCKETS as u32)]);
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_lagging_node_catches_up_through_a_snapshot() -> Result<()> {
    let raft = RaftOverrides {
        snapshot_logs_since_last: Some(50),
        logs_kept_after_snapshot: Some(0),
        ..RaftOverrides::default()
    };
    let (_dir, mut lab) = start_lab(raft).await?;
    let (leader, _) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    let lagger = ["invoker-1", "invoker-2", "invoker-3"]
        .into_iter()
        .find(|n| lab.process(n).and_then(|p| p.node_id) != Some(leader))
        .context("a follower")?;
    let lagger_log_before = status_of(&lab, lagger).await?.last_log_index;

    phase(&format!("stop {lagger}, write 300 entries"));
    lab.stop(lagger).await?;
    let mut admin = leader_admin(&lab).await?;
    let mut last = None;
    for i in 0..300u32 {
        let a = i % 101;
        let set = admin
            .set_routing(pb::SetRoutingRequest {
                runs: weights(a, 100 - a + 1),
                ..set_all("gift-api", "", &format!("bulk {i}"))
            })
            .await?
            .into_inner();
        last = Some(set);
    }
    let last = last.context("writes")?;
    let leader_status = admin
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    eprintln!(
        "leader: snapshot at {}, purged up to {}, lagger had log up to {lagger_log_before}",
        leader_status.snapshot_index, leader_status.purged_index
    );
    assert!(
        leader_status.purged_index > lagger_log_before,
        "the leader must have purged the entries the lagger lacks, so only a snapshot can help"
    );

    phase(&format!(
        "restart {lagger}: it must install a snapshot and catch up"
    ));
    lab.restart(lagger).await?;
    let s = wait_status(&lab, lagger, "caught up", |s| {
        s.last_applied >= last.log_index
    })
    .await?;
    assert!(s.snapshot_index > lagger_log_before, "{s:?}");
    let mut lag_admin = node_admin(&lab, lagger)?;
    let local = get_routing(&mut lag_admin, "gift-api", pb::ReadConsistency::Local).await?;
    assert_eq!(Some(local), last.table);
    let log = std::fs::read_to_string(&lab.process(lagger).context("lagger")?.log)?;
    assert!(
        log.contains("snapshot installed"),
        "no snapshot install in {lagger}'s log"
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_add_and_remove_a_member() -> Result<()> {
    let (dir, lab) = start_lab(RaftOverrides::default()).await?;
    phase("start a fourth node with no initial members");
    let port = std::net::TcpListener::bind("127.0.1.9:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.1.9:{port}");
    let config = dir.path().join("invoker-4.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 4\nsite = \"a\"\nlisten_addr = \"{addr}\"\ndata_dir = \"{}\"\n",
            dir.path().join("invoker-4-data").display()
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("invoker-4.log"))?;
    let mut node4 = tokio::process::Command::new(env!("CARGO_BIN_EXE_invoker"))
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;

    phase("add it");
    let mut admin = leader_admin(&lab).await?;
    let reply = admin
        .add_member(pb::AddMemberRequest {
            id: 4,
            addr: addr.clone(),
            site: "a".into(),
            actor: "e2e".into(),
            reason: "grow".into(),
        })
        .await?
        .into_inner();
    assert!(
        reply.members.iter().any(|m| m.id == 4 && m.voter),
        "{reply:?}"
    );
    let set = admin
        .set_routing(set_all("gift-api", "b", "after the add"))
        .await?
        .into_inner();
    let mut node4_admin = InvokerClient::connect_node(&addr)?.admin();
    let started = Instant::now();
    loop {
        let s = node4_admin
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner();
        if s.last_applied >= set.log_index {
            break;
        }
        assert!(
            started.elapsed() < LEADER_TIMEOUT,
            "node 4 never caught up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let local = get_routing(&mut node4_admin, "gift-api", pb::ReadConsistency::Local).await?;
    assert_eq!(Some(local), set.table);

    phase("remove it; removing an unknown member is refused");
    let reply = admin
        .remove_member(pb::RemoveMemberRequest {
            id: 4,
            actor: "e2e".into(),
            reason: "shrink".into(),
        })
        .await?
        .into_inner();
    assert!(!reply.members.iter().any(|m| m.id == 4), "{reply:?}");
    assert_eq!(reply.members.len(), 3);
    let err = admin
        .remove_member(pb::RemoveMemberRequest {
            id: 42,
            actor: "e2e".into(),
            reason: "typo".into(),
        })
        .await
        .expect_err("unknown member");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 10,
            before_seq: 0,
        })
        .await?
        .into_inner();
    let actions: Vec<&str> = audit.entries.iter().map(|a| a.action.as_str()).collect();
    assert!(
        actions.contains(&"membership.add 4") && actions.contains(&"membership.remove 4"),
        "{actions:?}"
    );
    node4.kill().await?;
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_linearizable_read_after_leader_change_sees_latest_write() -> Result<()> {
    let (_dir, mut lab) = start_lab(RaftOverrides::default()).await?;
    let mut admin = leader_admin(&lab).await?;
    let set = admin
        .set_routing(pb::SetRoutingRequest {
            runs: weights(1, 3),
            ..set_all("gift-api", "", "latest before the kill")
        })
        .await?
        .into_inner();
    let latest = set.table.context("table")?;
    let (old, old_name) = lab.invoker_leader(LEADER_TIMEOUT).await?;
    lab.kill(&old_name)?;

    phase("read through each survivor right away: every answer is the latest write");
    let survivors: Vec<String> = ["invoker-1", "invoker-2", "invoker-3"]
        .into_iter()
        .filter(|n| *n != old_name)
        .map(String::from)
        .collect();
    let started = Instant::now();
    let mut answered = 0;
    while answered < 10 {
        assert!(started.elapsed() < LEADER_TIMEOUT, "no linearizable answer");
        for name in &survivors {
            let mut node = node_admin(&lab, name)?;
            match get_routing(&mut node, "gift-api", pb::ReadConsistency::Linearizable).await {
                Ok(t) => {
                    assert_eq!(t, latest, "{name} answered a stale table");
                    answered += 1;
                }
                // During the election nobody can confirm leadership: refusing is correct.
                Err(e) => eprintln!("{name}: {e}"),
            }
        }
    }
    let (new, _, _) = new_leader(&lab, old).await?;
    assert_ne!(new, old);
    lab.down().await?;
    Ok(())
}
