//! Benchmark: a wallet failover with human sign-off, from the approval to the first gift the
//! new primary commits, over several runs, each on a fresh lab; and beside it, in the same
//! run, the floor: the same promotion done by hand with PostgreSQL's own tooling.
//!
//! Each run: start the lab (agents on), fund a user, SIGKILL every site-a process (PostgreSQL
//! primary included), wait for the wallet failover proposal and for the old writer's lease
//! to run out (what on-call sees before approving), then approve and send a gift through the
//! edge every 10 ms until one commits: **approval → first committed gift**. Then the floor on
//! the same machine: rebuild a as b's replica, SIGKILL b's PostgreSQL, wait 3 s (as the
//! measured replica had lost its primary a while before), and time `psql -c "select
//! pg_promote(true, 60)"` followed by `psql -c "insert ..."` on a: **promotion by hand →
//! first committed write**, no control plane.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench-wallet-failover --runs 10 --json docs/bench/wallet-failover.json
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use drills::bench::machine;
use drills::lab::{Lab, LabOptions};
use drills::loadgen::LoadgenConfig;
use drills::scenarios;
use drills::wallet_failover as wf;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Wallet failover: approval → first committed gift, beside pg_promote by hand")]
struct Args {
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Working directory (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Run {
    /// Kill → proposal committed.
    proposal_ms: u64,
    /// Proposal seen → the old lease ran out (on-call waits for it before approving).
    lease_wait_ms: u64,
    /// Approval sent → first gift committed through the edge.
    approval_to_first_gift_ms: u64,
    /// The executor's own account: begin → complete.
    execution_ms: i64,
    /// The agent's promotion, as it reported it.
    promote_detail: String,
    /// Floor: `pg_promote` by hand → first committed write (two psql calls).
    floor_ms: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    runs: Vec<Run>,
    approval_to_first_gift_p50_ms: u64,
    approval_to_first_gift_max_ms: u64,
    floor_p50_ms: u64,
    floor_max_ms: u64,
    /// p50 over p50.
    ratio_p50: f64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn one_run(dir: &Path) -> Result<Run> {
    let mut options = LabOptions::new(dir);
    options.agents = true;
    let mut lab = Lab::start(options).await?;
    let result = async {
        let edge = scenarios::edge_url(&lab)?;
        let mut funding = LoadgenConfig::new(vec![edge.clone()]);
        funding.users = 20;
        funding.initial_balance = 1_000_000;
        scenarios::fund_users(&funding).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        lab.psql(
            "postgres-a",
            "gift",
            "create table if not exists bench_floor (at timestamptz not null default now())",
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;

        for victim in scenarios::site_a_entirely(&lab) {
            lab.kill(&victim)?;
        }
        let killed = Instant::now();
        let (proposal, term) = wf::wait_for_proposal(&lab, Duration::from_secs(15)).await?;
        let proposal_ms = ms(killed.elapsed());
        let lease_wait_ms = ms(wf::wait_lease_expired(&lab, Duration::from_secs(15)).await?);

        let approved = Instant::now();
        wf::approve(&lab, &proposal, term)
            .await?
            .map_err(|s| anyhow::anyhow!("approval refused: {s:?}"))?;
        let first = wf::first_committed_gift(&edge, 3, approved, Duration::from_secs(15)).await?;
        let executed = wf::wait_executed(&lab, proposal.id, Duration::from_secs(15)).await?;
        let execution = executed.execution.unwrap_or_default();

        // The floor, on the same machine: a as b's replica, b gone, promoted by hand.
        lab.rebuild_replica("a", "b").await?;
        lab.kill("postgres-b")?;
        // As in the measured failover, the replica has lost its primary a while before it is
        // promoted (there: the proposal and the lease wait).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let promoted = Instant::now();
        lab.psql("postgres-a", "gift", "select pg_promote(true, 60)")
            .await?;
        lab.psql(
            "postgres-a",
            "gift",
            "insert into bench_floor default values",
        )
        .await?;
        let floor = promoted.elapsed();

        anyhow::Ok(Run {
            proposal_ms,
            lease_wait_ms,
            approval_to_first_gift_ms: ms(first),
            execution_ms: execution.finished_at_ms - execution.started_at_ms,
            promote_detail: execution.promote.map(|p| p.detail).unwrap_or_default(),
            floor_ms: ms(floor),
        })
    }
    .await;
    lab.down().await?;
    result
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bench-wallet-failover-{}", std::process::id())),
    };
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        let started = Instant::now();
        let run = one_run(&base.join(format!("run-{i}"))).await?;
        eprintln!(
            "run {i}/{}: approval -> first gift {} ms (execution {} ms), floor {} ms; proposal after {} ms, lease wait {} ms ({:.0} s)",
            args.runs,
            run.approval_to_first_gift_ms,
            run.execution_ms,
            run.floor_ms,
            run.proposal_ms,
            run.lease_wait_ms,
            started.elapsed().as_secs_f64()
        );
        runs.push(run);
    }
    let mut ours: Vec<u64> = runs.iter().map(|r| r.approval_to_first_gift_ms).collect();
    ours.sort_unstable();
    let mut floor: Vec<u64> = runs.iter().map(|r| r.floor_ms).collect();
    floor.sort_unstable();
    let (p50, floor_p50) = (percentile(&ours, 0.5), percentile(&floor, 0.5));
    let report = Report {
        machine: machine(),
        approval_to_first_gift_p50_ms: p50,
        approval_to_first_gift_max_ms: ours.last().copied().unwrap_or(0),
        floor_p50_ms: floor_p50,
        floor_max_ms: floor.last().copied().unwrap_or(0),
        ratio_p50: if floor_p50 > 0 {
            p50 as f64 / floor_p50 as f64
        } else {
            0.0
        },
        runs,
    };
    println!();
    println!("machine: {}", report.machine);
    println!(
        "{:>4} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "run", "approve→", "execution", "floor", "proposal", "lease"
    );
    println!(
        "{:>4} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "", "gift ms", "ms", "ms", "ms", "wait ms"
    );
    for (i, r) in report.runs.iter().enumerate() {
        println!(
            "{:>4} {:>10} {:>10} {:>9} {:>10} {:>9}",
            i + 1,
            r.approval_to_first_gift_ms,
            r.execution_ms,
            r.floor_ms,
            r.proposal_ms,
            r.lease_wait_ms
        );
    }
    println!(
        "approval -> first committed gift: p50 {} ms, max {} ms (goal: p50 <= 1000 ms and <= 3x the floor); floor (pg_promote by hand -> first write): p50 {} ms, max {} ms; ratio {:.2}",
        report.approval_to_first_gift_p50_ms,
        report.approval_to_first_gift_max_ms,
        report.floor_p50_ms,
        report.floor_max_ms,
        report.ratio_p50
    );
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            format!("{}\n", serde_json::to_string_pretty(&report)?),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
