//! The wallet failover with human sign-off, on the full lab under load: real invokers, etcd,
//! PostgreSQL primary (a) and streaming replica (b), wallets and gift-apis following the
//! published writer, site agents holding and enforcing the writer lease, the edge.
//!
//! Site A is SIGKILLed, isolated with nftables, or its PostgreSQL SIGSTOPped; the on-call
//! operator approves; the tests check what moved, what was lost, and that the lost-report
//! says exactly that.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use drills::loadgen::{self, LoadgenConfig, Mix};
use drills::scenarios;
use drills::wallet_failover as wf;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn wallet_lab(
    prefix: &str,
    invoker_env: &[(&str, &str)],
) -> Result<(tempfile::TempDir, Lab)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    options.invoker_env = invoker_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lab = Lab::start(options).await?;
    Ok((dir, lab))
}

/// Sends only (and top-ups), `rate`/s through the edge for `secs`.
fn load(edge: &str, rate: u64, secs: u64) -> LoadgenConfig {
    let mut load = LoadgenConfig::new(vec![edge.to_string()]);
    load.rate_per_sec = rate;
    load.duration_secs = secs;
    load.users = 300;
    load.streamers = 50;
    load.mix = Mix::new(1, 0, 0).expect("sends only");
    load.timeout_ms = 2_000;
    load.initial_balance = 0;
    load
}

async fn funded(edge: &str) -> Result<()> {
    let mut funding = load(edge, 50, 1);
    funding.initial_balance = 1_000_000;
    scenarios::fund_users(&funding).await?;
    // The replica must have the balances before anything happens to the primary.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// Cuts a's WAL stream to b (by its ports: on loopback it leaves from 127.0.0.1), so that
/// what a commits from now on never reaches b.
async fn wal_stream(lab: &Lab) -> Result<scenarios::Partition> {
    let client_port: u16 = lab
        .psql(
            "postgres-a",
            "postgres",
            "select client_port from pg_stat_replication limit 1",
        )
        .await?
        .trim()
        .parse()
        .context("the replica's port")?;
    let a_port: u16 = lab.describe().endpoints.postgres["a"]
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .context("a's port")?;
    Ok(scenarios::Partition::tcp_stream(a_port, client_port)?)
}

/// The order ids among `ids` that have a debit in `postgres` (`postgres-a` / `postgres-b`).
async fn debited(lab: &Lab, postgres: &str, ids: &[String]) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    for chunk in ids.chunks(500) {
        let list = chunk
            .iter()
            .map(|id| format!("'{}'", id.replace('\'', "")))
            .collect::<Vec<_>>()
            .join(",");
        let out = lab
            .psql(
                postgres,
                "gift",
                &format!(
                    "select order_id from wallet.ledger where kind = 'debit' and order_id in ({list})"
                ),
            )
            .await?;
        found.extend(
            out.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    Ok(found)
}

/// Every ledger key a's primary has and b's has not, computed here with SQL, independently of
/// the lost-report.
async fn keys_only_on_a(lab: &Lab) -> Result<BTreeSet<String>> {
    let on_a = lab
        .psql(
            "postgres-a",
            "gift",
            "select idempotency_key from wallet.ledger order by seq",
        )
        .await?;
    let keys_a: Vec<String> = on_a.lines().map(|l| l.trim().to_string()).collect();
    let mut only_on_a = BTreeSet::new();
    for chunk in keys_a.chunks(500) {
        let list = chunk
            .iter()
            .map(|k| format!("'{}'", k.replace('\'', "")))
            .collect::<Vec<_>>()
            .join(",");
        let on_b = lab
            .psql(
                "postgres-b",
                "gift",
                &format!(
                    "select idempotency_key from wallet.ledger where idempotency_key in ({list})"
                ),
            )
            .await?;
        let on_b: BTreeSet<&str> = on_b.lines().map(str::trim).collect();
        only_on_a.extend(chunk.iter().filter(|k| !on_b.contains(k.as_str())).cloned());
    }
    Ok(only_on_a)
}

/// The newest 200 audit entries.
async fn audit(lab: &Lab) -> Result<invoker_api::pb::ListAuditResponse> {
    Ok(
        invoker_api::InvokerClient::connect_leader(&lab.invoker_endpoints())
            .await?
            .admin()
            .list_audit(invoker_api::pb::ListAuditRequest {
                limit: 200,
                before_seq: 0,
            })
            .await?
            .into_inner(),
    )
}

/// The lost-report's entries as (kind, order id or key).
fn lost_entries(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["entries"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    (
                        e["kind"].as_str().unwrap_or("").to_string(),
                        e["order_id"].as_str().unwrap_or("").to_string(),
                        e["idempotency_key"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `invokerctl --json wallet compensate KEY --action ACTION` as the lab's on-call operator.
fn compensate(lab: &Lab, key: &str, action: &str) -> Result<serde_json::Value> {
    let oncall = lab.describe().oncall.clone().context("on-call")?;
    let out = std::process::Command::new(drills::lab::find_bin("invokerctl")?)
        .args(["--json", "--endpoints", &lab.invoker_endpoints().join(",")])
        .args(["wallet", "compensate", key, "--action", action])
        .args(["--operator", &oncall.operator, "--reason", "e2e"])
        .arg("--token-file")
        .arg(&oncall.token_file)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "compensate {key} {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs `reconcile --json` on `url`; the order ids its mismatches name.
fn reconcile_mismatches(url: &str) -> Result<(serde_json::Value, BTreeSet<String>)> {
    let out = std::process::Command::new(drills::lab::find_bin("reconcile")?)
        .args(["--json", "--grace-secs", "2", "--database-url", url])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reconcile output: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let subjects = report["mismatches"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["subject"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok((report, subjects))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_site_a_down_approved_under_load() -> Result<()> {
    let (_dir, mut lab) = wallet_lab("e2e-wf-down-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;

    phase("gift sends at 50/s through the edge; a's WAL stream to b cut for 1 s (b lags), then every site-a process SIGKILLed");
    let load_task = tokio::spawn(loadgen::run_owned(load(&edge, 50, 24)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // On loopback the replica is never a commit behind: drop the WAL stream's packets so
    // that the failover does lose acknowledged gifts (what a commits meanwhile stays in its
    // send buffer and dies with it), which the lost-report must then name exactly.
    let cut = wal_stream(&lab).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for victim in scenarios::site_a_entirely(&lab) {
        lab.kill(&victim)?;
    }
    let killed = Instant::now();
    drop(cut);

    phase("a wallet failover proposal within 3 s, with its data-loss estimate and plan");
    let (proposal, term) = wf::wait_for_proposal(&lab, Duration::from_secs(10)).await?;
    let proposal_after = killed.elapsed();
    eprintln!(
        "proposal #{} after {proposal_after:?}: {:?}",
        proposal.id, proposal.data_loss
    );
    assert!(
        proposal_after <= Duration::from_secs(3),
        "{proposal_after:?}"
    );
    let loss = proposal.data_loss.context("data-loss estimate")?;
    assert!(
        loss.primary_last_lsn > 0 && loss.replica_receive_lsn > 0,
        "{loss:?}"
    );
    let plan = proposal.plan.clone().context("plan")?;
    assert_eq!(
        (
            plan.from_site.as_str(),
            plan.to_site.as_str(),
            plan.new_epoch
        ),
        ("a", "b", 2)
    );

    phase("while it is pending: sends fail fast with payments_unavailable; balances are read");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    // Until the pending proposal reaches b's etcd and gift-api (milliseconds), a send fails
    // for want of the primary; after, for the pending failover. Both charge nobody, fast.
    let pending_seen = Instant::now();
    for i in 0.. {
        let started = Instant::now();
        let key = format!("e2e-wf-pending-{i}");
        let (status, body) = wf::send_gift(&http, &edge, 7, &key).await?;
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "payments_unavailable", "{body}");
        assert!(took < Duration::from_millis(600), "{took:?}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        if message.contains("temporarily unavailable") {
            eprintln!(
                "payments paused {:?} after the proposal was seen: {message}",
                pending_seen.elapsed()
            );
            break;
        }
        assert!(
            pending_seen.elapsed() < Duration::from_secs(3),
            "the pending failover never paused payments: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let balance = http.get(format!("{edge}/v1/wallet/7")).send().await?;
    assert_eq!(balance.status(), 200);

    phase("the old lease runs out (what on-call sees before approving); approve");
    let waited = wf::wait_lease_expired(&lab, Duration::from_secs(10)).await?;
    eprintln!("old lease expired {waited:?} after the proposal was seen");
    let approved = Instant::now();
    let decided = wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    assert_eq!(
        decided.status,
        invoker_api::pb::ProposalStatus::Approved as i32
    );

    phase("the first gift commits through site b within 1 s of the approval");
    let first = wf::first_committed_gift(&edge, 11, approved, Duration::from_secs(10)).await?;
    eprintln!("first committed gift {first:?} after the approval");
    assert!(first <= Duration::from_secs(1), "{first:?}");
    let executed = wf::wait_executed(&lab, proposal.id, Duration::from_secs(10)).await?;
    let execution = executed.execution.clone().context("execution")?;
    eprintln!("execution: {execution:?}");
    assert!(
        !execution.fence.as_ref().context("fence step")?.ok,
        "site a was dead"
    );
    assert!(execution.promote.as_ref().context("promote step")?.ok);

    let report = load_task.await??;
    eprintln!(
        "load: {} requests, {} committed, {} errors {:?}, rejected {:?}",
        report.requests,
        report.committed,
        report.errors,
        report.errors_by_reason,
        report.rejected_by_code
    );

    phase("the old primary returns: it commits no wallet write (lease expired, old epoch)");
    lab.restart("postgres-a").await?;
    let fencing = lab
        .psql(
            "postgres-a",
            "gift",
            "select epoch, lease_until, clock_timestamp() from wallet.fencing",
        )
        .await?;
    eprintln!("a's fencing row: {fencing}");
    let attack = lab
        .psql(
            "postgres-a",
            "gift",
            "insert into wallet.ledger (user_id, kind, amount, idempotency_key, epoch) \
             values (7, 'credit', 1, 'e2e-wf-stale-writer', 1)",
        )
        .await;
    assert!(
        attack.is_err(),
        "a write on the old primary committed: {attack:?}"
    );
    eprintln!("refused on the old primary: {}", attack.unwrap_err());

    phase("lost-report: exactly the acknowledged gifts whose debit b does not have");
    let lost = wf::lost_report(&lab)?;
    let entries = lost_entries(&lost);
    eprintln!("lost-report: {} entries: {entries:?}", entries.len());
    let lost_debits: BTreeSet<String> = entries
        .iter()
        .filter(|(kind, _, _)| kind == "debit")
        .map(|(_, order, _)| order.clone())
        .collect();
    let on_b = debited(&lab, "postgres-b", &report.committed_order_ids).await?;
    let acknowledged_lost: BTreeSet<String> = report
        .committed_order_ids
        .iter()
        .filter(|id| !on_b.contains(*id))
        .cloned()
        .collect();
    // Every acknowledged gift is on a or on b: the report names those only on a.
    let on_a = debited(&lab, "postgres-a", &report.committed_order_ids).await?;
    for id in &acknowledged_lost {
        assert!(
            on_a.contains(id),
            "acknowledged order {id} is on neither primary"
        );
    }
    // Exactly what a has and b has not (checked with SQL here), and every acknowledged gift
    // among it. It may hold more than the acknowledged ones: a debit a committed whose send
    // the client saw fail (the order's next step died with a), which is lost all the same.
    let reported_keys: BTreeSet<String> = entries.iter().map(|(_, _, key)| key.clone()).collect();
    assert_eq!(
        reported_keys,
        keys_only_on_a(&lab).await?,
        "the lost-report must list exactly what only a has"
    );
    let unreported: Vec<&String> = acknowledged_lost.difference(&lost_debits).collect();
    assert!(
        unreported.is_empty(),
        "acknowledged gifts lost but not reported: {unreported:?}"
    );
    eprintln!(
        "{} lost debits reported: {} acknowledged to the client, {} whose send had failed",
        lost_debits.len(),
        acknowledged_lost.len(),
        lost_debits.len() - acknowledged_lost.len()
    );
    assert!(
        !acknowledged_lost.is_empty(),
        "the cut WAL stream lost no acknowledged gift: the checks above proved little"
    );

    phase("compensation: one lost gift re-applied (twice: once), one refunded; both audited");
    let mut lost_gifts = lost_debits.iter();
    let reapplied = lost_gifts.next().context("a lost gift")?.clone();
    let refunded = lost_gifts.next().context("a second lost gift")?.clone();
    let first = compensate(&lab, &format!("debit:{reapplied}"), "reapply")?;
    assert_eq!(first["already_done"], false, "{first:#}");
    let again = compensate(&lab, &format!("debit:{reapplied}"), "reapply")?;
    assert_eq!(again["already_done"], true, "{again:#}");
    let conflicting = compensate(&lab, &format!("debit:{reapplied}"), "refund");
    assert!(
        conflicting.is_err(),
        "another action on a compensated entry: {conflicting:?}"
    );
    compensate(&lab, &format!("debit:{refunded}"), "refund")?;
    let on_b = debited(&lab, "postgres-b", &[reapplied.clone(), refunded.clone()]).await?;
    assert!(on_b.contains(&reapplied), "the re-applied debit is on b");
    assert!(
        !on_b.contains(&refunded),
        "the refunded gift charged nobody"
    );
    let audit = audit(&lab).await?;
    let compensations = audit
        .entries
        .iter()
        .filter(|e| e.action == "wallet.compensate")
        .count();
    assert!(compensations >= 3, "{:?}", audit.entries);

    phase("reconciliation on b: no double debit, no mismatch outside the lost-report");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // First its repairs: an order whose debit reached b but whose `paid` step died with a is
    // left `created`; the repair finishes it through the saga (as the outbox worker would once
    // it counts as abandoned). Then the check.
    let wallet_b = lab
        .process("wallet-b")
        .and_then(|p| p.main_addr())
        .context("wallet-b's address")?
        .to_string();
    let repaired = std::process::Command::new(drills::lab::find_bin("reconcile")?)
        .args(["--json", "--repair", "--grace-secs", "2", "--database-url"])
        .arg(&lab.describe().endpoints.postgres["b"])
        .args(["--wallet", &wallet_b])
        .output()?;
    eprintln!(
        "reconcile --repair: {}",
        String::from_utf8_lossy(&repaired.stdout)
            .lines()
            .filter(|l| l.contains("\"check\"") || l.contains("\"action\""))
            .collect::<Vec<_>>()
            .join(" ")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (reconciled, subjects) = reconcile_mismatches(&lab.describe().endpoints.postgres["b"])?;
    let lost_keys: BTreeSet<String> = entries
        .iter()
        .flat_map(|(_, order, key)| [order.clone(), key.clone()])
        .collect();
    for subject in &subjects {
        assert!(
            lost_keys
                .iter()
                .any(|k| !k.is_empty() && subject.contains(k.as_str())),
            "mismatch outside the lost-report: {subject} in {reconciled:#}"
        );
    }
    let doubles = lab
        .psql(
            "postgres-b",
            "gift",
            "select count(*) from (select order_id from wallet.ledger where kind = 'debit' \
             group by order_id having count(*) > 1) d",
        )
        .await?;
    assert_eq!(doubles.trim(), "0");

    phase("rebuild the old primary as b's replica: redundancy is back");
    lab.rebuild_replica("a", "b").await?;
    let in_recovery = lab
        .psql("postgres-a", "gift", "select pg_is_in_recovery()")
        .await?;
    assert_eq!(in_recovery.trim(), "t");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_isolated_site_a_fences_itself_before_its_lease_expires() -> Result<()>
{
    let (_dir, lab) = wallet_lab("e2e-wf-isolated-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;
    let load_task = tokio::spawn(loadgen::run_owned(load(&edge, 50, 20)));
    tokio::time::sleep(Duration::from_secs(3)).await;

    phase("site a cut off from b and the witness (nft), alive");
    let (_, _, lease_end_before) = wf::wallet_lease(&lab).await?.context("a lease")?;
    // On loopback the WAL stream leaves from 127.0.0.1, which the range partition does not
    // cut: cut it by its ports as well, so that what a commits from now on stays on a.
    let stream = wal_stream(&lab).await?;
    let partition = scenarios::Partition::isolate_site_a()?;
    let cut = Instant::now();
    // The host still reaches a's PostgreSQL (127.0.0.1 is not cut): watch it fence.
    let fenced_after = loop {
        let ro = lab
            .psql("postgres-a", "gift", "show default_transaction_read_only")
            .await;
        if ro.as_deref().is_ok_and(|v| v.trim() == "on") {
            break cut.elapsed();
        }
        anyhow::ensure!(
            cut.elapsed() < Duration::from_secs(10),
            "a's primary was never fenced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fenced_at_ms = unix_ms();
    // The lease the quorum side holds: the last renewal a's agent got before the cut.
    let (site, epoch, lease_end) = wf::wallet_lease(&lab).await?.context("a lease")?;
    eprintln!(
        "a fenced {fenced_after:?} after the cut; the quorum's lease of {site} epoch {epoch} \
         ends {} ms after the fence (it ended {} ms after the cut began)",
        lease_end - fenced_at_ms,
        lease_end - lease_end_before
    );
    assert_eq!((site.as_str(), epoch), ("a", 1));
    assert!(fenced_at_ms < lease_end, "fenced after the lease expired");
    let lease_until_passed = lab
        .psql(
            "postgres-a",
            "gift",
            "select lease_until <= clock_timestamp() from wallet.fencing",
        )
        .await?;
    assert_eq!(
        lease_until_passed.trim(),
        "t",
        "the fence ends the lease in the database too"
    );

    phase("on-call opens the failover (or takes the policy's); approve once the old lease is over");
    // On loopback the witness agent's database connection leaves from 127.0.0.1, which the
    // partition cannot cut: it still sees a's primary answer, so the policy (rightly, from
    // what it sees) holds its proposal back. On-call then opens a forced failover by hand.
    let (proposal, term) = match wf::wait_for_proposal(&lab, Duration::from_secs(4)).await {
        Ok(open) => open,
        Err(_) => wf::open_switchover(&lab, "b", false).await?,
    };
    wf::wait_lease_expired(&lab, Duration::from_secs(10)).await?;
    wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    wf::wait_executed(&lab, proposal.id, Duration::from_secs(15)).await?;
    let first = wf::first_committed_gift(&edge, 11, Instant::now(), Duration::from_secs(5)).await?;
    eprintln!("gifts commit on b again ({first:?} after execution)");
    let report = load_task.await??;
    eprintln!(
        "load: {} committed, {} errors {:?}",
        report.committed, report.errors, report.errors_by_reason
    );

    phase("nothing committed on a's primary is missing from the lost-report");
    drop(partition);
    drop(stream);
    let lost = wf::lost_report(&lab)?;
    let reported: BTreeSet<String> = lost_entries(&lost)
        .into_iter()
        .map(|(_, _, key)| key)
        .collect();
    // Independently of the report: every ledger key on a, checked against b.
    let only_on_a = keys_only_on_a(&lab).await?;
    assert_eq!(
        reported, only_on_a,
        "the lost-report must list every entry only a has"
    );
    eprintln!("{} entries only on a, all reported", only_on_a.len());
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_planned_switchover_loses_nothing() -> Result<()> {
    let (_dir, lab) = wallet_lab("e2e-wf-switchover-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;
    let load_task = tokio::spawn(loadgen::run_owned(load(&edge, 50, 16)));
    tokio::time::sleep(Duration::from_secs(4)).await;

    phase("a planned switchover to b, opened and approved by on-call, under load");
    let (proposal, term) = wf::open_switchover(&lab, "b", true).await?;
    assert!(proposal.kind.starts_with("switchover"), "{}", proposal.kind);
    let approved = Instant::now();
    wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let executed = wf::wait_executed(&lab, proposal.id, Duration::from_secs(20)).await?;
    eprintln!(
        "executed {:?} after the approval: {:?}",
        approved.elapsed(),
        executed.execution
    );
    let execution = executed.execution.context("execution")?;
    let fence = execution.fence.context("fence")?;
    let promote = execution.promote.context("promote")?;
    assert!(
        fence.ok,
        "a planned switchover fences the old primary first"
    );
    assert!(
        promote.lsn >= fence.lsn,
        "promoted before catching up: {promote:?} vs {fence:?}"
    );

    let report = load_task.await??;
    eprintln!(
        "load: {} committed, {} errors {:?}, read-back missing {}",
        report.committed, report.errors, report.errors_by_reason, report.readback.missing
    );
    assert!(report.committed > 0);

    phase("every acknowledged gift is on b; the lost-report is empty");
    let on_b = debited(&lab, "postgres-b", &report.committed_order_ids).await?;
    let missing: Vec<&String> = report
        .committed_order_ids
        .iter()
        .filter(|id| !on_b.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged gifts missing on b: {missing:?}"
    );
    assert_eq!(report.readback.missing, 0);
    let lost = wf::lost_report(&lab)?;
    assert!(lost_entries(&lost).is_empty(), "{lost:#}");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_a_new_leader_resumes_an_execution_cut_short() -> Result<()> {
    let (_dir, mut lab) = wallet_lab("e2e-wf-resume-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;

    phase("b's agent frozen, so the promotion hangs; a planned switchover approved");
    lab.pause("agent-b")?;
    let (proposal, term) = wf::open_switchover(&lab, "b", true).await?;
    wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let started = Instant::now();
    let begun = loop {
        let p = wf::proposal(&lab, proposal.id).await?;
        if let Some(e) = p.execution.as_ref().filter(|e| e.fence.is_some()) {
            break e.clone();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "no fence step: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(begun.promote.is_none(), "promoted with b's agent frozen");
    assert!(begun.fence.as_ref().is_some_and(|f| f.ok), "{begun:?}");

    phase("the leader SIGKILLed mid-execution; b's agent thawed; a new leader finishes");
    let (leader_id, leader) = lab.invoker_leader(Duration::from_secs(5)).await?;
    lab.kill(&leader)?;
    lab.resume("agent-b")?;
    let executed = wf::wait_executed(&lab, proposal.id, Duration::from_secs(30)).await?;
    let execution = executed.execution.context("execution")?;
    let (new_leader_id, _) = lab.invoker_leader(Duration::from_secs(5)).await?;
    eprintln!(
        "begun in term {} by node {leader_id}; finished by node {new_leader_id}: {execution:?}",
        execution.term
    );
    assert_ne!(leader_id, new_leader_id);
    assert!(execution.promote.as_ref().is_some_and(|p| p.ok));
    assert_eq!(
        wf::wallet_lease(&lab).await?.map(|l| (l.0, l.1)),
        Some(("b".to_string(), 2))
    );
    let audit = audit(&lab).await?;
    let moves = audit
        .entries
        .iter()
        .filter(|e| e.action.starts_with("writer.move wallet"))
        .count();
    assert_eq!(moves, 1, "the writer moved once: {:?}", audit.entries);
    wf::first_committed_gift(&edge, 11, Instant::now(), Duration::from_secs(5)).await?;
    let lost = wf::lost_report(&lab)?;
    assert!(lost_entries(&lost).is_empty(), "{lost:#}");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_frozen_old_primary_commits_nothing_when_resumed() -> Result<()> {
    let (_dir, lab) = wallet_lab("e2e-wf-frozen-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;
    let load_task = tokio::spawn(loadgen::run_owned(load(&edge, 50, 25)));
    tokio::time::sleep(Duration::from_secs(4)).await;

    phase("a's PostgreSQL SIGSTOPped under load (in-flight wallet transactions hang)");
    lab.pause("postgres-a")?;
    let frozen_at_ms = unix_ms();
    // A forced failover by on-call (the policy may open one itself: take whichever is open).
    let (proposal, term) = match wf::wait_for_proposal(&lab, Duration::from_secs(5)).await {
        Ok(open) => open,
        Err(_) => wf::open_switchover(&lab, "b", false).await?,
    };
    wf::wait_lease_expired(&lab, Duration::from_secs(10)).await?;
    wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let executed = wf::wait_executed(&lab, proposal.id, Duration::from_secs(20)).await?;
    eprintln!("executed: {:?}", executed.execution);
    wf::first_committed_gift(&edge, 11, Instant::now(), Duration::from_secs(5)).await?;

    phase("a's PostgreSQL resumed: the hung transactions commit nothing");
    let resumed_at_ms = unix_ms();
    lab.resume("postgres-a")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = lab
        .psql(
            "postgres-a",
            "gift",
            &format!(
                "select count(*) from wallet.ledger where pg_xact_commit_timestamp(xmin) >= \
                 to_timestamp({frozen_at_ms} / 1000.0)"
            ),
        )
        .await?;
    eprintln!("frozen at {frozen_at_ms}, resumed at {resumed_at_ms}: {late} entries committed on a since the freeze");
    assert_eq!(
        late.trim(),
        "0",
        "the old primary committed wallet writes after it was frozen"
    );
    let report = load_task.await??;
    eprintln!(
        "load: {} committed, {} errors {:?}",
        report.committed, report.errors, report.errors_by_reason
    );
    lab.down().await?;
    Ok(())
}

/// Zero-loss mode on or off through the admin API.
async fn set_zero_loss(lab: &Lab, on: bool) -> Result<()> {
    invoker_api::InvokerClient::connect_leader(&lab.invoker_endpoints())
        .await?
        .admin()
        .set_replication_mode(invoker_api::pb::SetReplicationModeRequest {
            service: "wallet".into(),
            synchronous: on,
            actor: "e2e".into(),
            reason: "zero-loss drill".into(),
        })
        .await?;
    Ok(())
}

/// Waits until `postgres`'s `synchronous_standby_names` is `want`.
async fn wait_sync_names(lab: &Lab, postgres: &str, want: &str, within: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let got = lab
            .psql(postgres, "postgres", "show synchronous_standby_names")
            .await
            .unwrap_or_default();
        if got.trim() == want {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "{postgres}: synchronous_standby_names is {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn relax_decisions(lab: &Lab) -> Result<Vec<(String, String, String)>> {
    let audit = audit(lab).await?;
    Ok(audit
        .entries
        .into_iter()
        .filter(|e| e.action == "replication.relax wallet")
        .map(|e| (e.actor, e.after, e.reason))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_zero_loss_mode_loses_no_acknowledged_gift_and_relaxes_without_a_standby(
) -> Result<()> {
    let (_dir, mut lab) = wallet_lab("e2e-wf-zero-loss-", &[]).await?;
    let edge = scenarios::edge_url(&lab)?;
    funded(&edge).await?;

    phase("zero-loss mode on: a's primary waits for b's standby");
    set_zero_loss(&lab, true).await?;
    wait_sync_names(&lab, "postgres-a", "*", Duration::from_secs(5)).await?;

    phase("under load: a's WAL stream to b cut for 1 s (commits wait), then site a SIGKILLed");
    let load_task = tokio::spawn(loadgen::run_owned(load(&edge, 50, 20)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cut = wal_stream(&lab).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for victim in scenarios::site_a_entirely(&lab) {
        lab.kill(&victim)?;
    }
    drop(cut);
    let (proposal, term) = wf::wait_for_proposal(&lab, Duration::from_secs(10)).await?;
    wf::wait_lease_expired(&lab, Duration::from_secs(10)).await?;
    wf::approve(&lab, &proposal, term)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    wf::wait_executed(&lab, proposal.id, Duration::from_secs(15)).await?;
    // The new primary has no standby: relaxed by the failover itself, so gifts commit.
    let first = wf::first_committed_gift(&edge, 11, Instant::now(), Duration::from_secs(5)).await?;
    eprintln!("gifts commit on b {first:?} after the execution");
    let report = load_task.await??;
    eprintln!(
        "load: {} committed, {} errors {:?}",
        report.committed, report.errors, report.errors_by_reason
    );

    phase("every acknowledged gift is on b; what only a has was never acknowledged");
    lab.restart("postgres-a").await?;
    let on_b = debited(&lab, "postgres-b", &report.committed_order_ids).await?;
    let missing: Vec<&String> = report
        .committed_order_ids
        .iter()
        .filter(|id| !on_b.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged gifts lost in zero-loss mode: {missing:?}"
    );
    let acknowledged: BTreeSet<&String> = report.committed_order_ids.iter().collect();
    let lost = lost_entries(&wf::lost_report(&lab)?);
    eprintln!(
        "{} entries only on a (committed there, never acknowledged)",
        lost.len()
    );
    for (_, order, _) in &lost {
        assert!(
            !acknowledged.contains(order),
            "{order} was acknowledged and lost"
        );
    }

    phase("a rebuilt as b's standby: the controller restores zero-loss mode");
    lab.rebuild_replica("a", "b").await?;
    wait_sync_names(&lab, "postgres-b", "*", Duration::from_secs(20)).await?;

    phase("the standby SIGKILLed: commits would wait forever; the controller relaxes, recorded");
    lab.kill("postgres-a")?;
    let killed = Instant::now();
    let back = wf::first_committed_gift(&edge, 13, killed, Duration::from_secs(15)).await?;
    eprintln!("a gift committed {back:?} after the standby died");
    let decisions = relax_decisions(&lab).await?;
    eprintln!("relax decisions: {decisions:#?}");
    assert!(
        decisions
            .iter()
            .any(|(actor, after, reason)| actor == "controller"
                && after == "relaxed"
                && reason.contains("no standby")),
        "{decisions:?}"
    );
    assert!(
        decisions
            .iter()
            .any(|(actor, after, _)| actor == "controller" && after == "strict"),
        "{decisions:?}"
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_wallet_failover_expired_proposal_cannot_be_approved() -> Result<()> {
    // Proposals expire after 3 s in this lab.
    let (_dir, lab) = wallet_lab(
        "e2e-wf-expired-",
        &[("INVOKER_APPROVALS__PROPOSAL_TTL_MS", "3000")],
    )
    .await?;
    let (proposal, term) = wf::open_switchover(&lab, "b", true).await?;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let refused = wf::approve(&lab, &proposal, term).await?.unwrap_err();
    eprintln!("refused: {}", refused.message());
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );
    let again = wf::proposal(&lab, proposal.id).await?;
    assert_ne!(
        again.status,
        invoker_api::pb::ProposalStatus::Approved as i32
    );
    assert_eq!(
        wf::wallet_lease(&lab).await?.map(|l| l.0),
        Some("a".to_string())
    );
    let audit = audit(&lab).await?;
    assert!(
        audit.entries.iter().any(|e| e.action
            == format!("proposal.approve #{} refused", proposal.id)
            && e.after.contains("expired")),
        "{:?}",
        audit.entries
    );
    lab.down().await?;
    Ok(())
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
