//! Benchmark: recovery time of site A's application tier going hard down (every site-a
//! process but its PostgreSQL primary SIGKILLed, its invoker node and etcd included) under
//! steady traffic through the edge router, over several runs, each on a fresh lab; and the
//! automatic shifts in the inter-site partition and flapping scenarios (the goal is none).
//!
//! RTO: from the kill until every 200 ms window of request due times is back at >= 99%
//! success (committed or a business rejection; errors, timeouts and refusals count against).
//! The detection floor (probe interval × failures to trip, the policy defaults) is printed
//! beside it: a shift cannot come earlier; the edge's retry on the other site can.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench-failover --runs 10 --json docs/bench/failover.json
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use drills::bench::machine;
use drills::lab::{Lab, LabOptions};
use drills::loadgen::LoadgenConfig;
use drills::scenarios::{self, KillUnderLoad};
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "RTO of site A's application tier hard down, and shifts under partition and flapping"
)]
struct Args {
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Runs of the second scenario: gift-api-a frozen (SIGSTOP), where the edge cannot
    /// re-send (nothing fails fast) and recovery waits for the policy's shift.
    #[arg(long, default_value_t = 10)]
    freeze_runs: u32,
    /// Offered requests per second through the edge (default mix: sends, reads, top-ups).
    #[arg(long, default_value_t = 100)]
    rate_per_sec: u64,
    #[arg(long, default_value_t = 12)]
    duration_secs: u64,
    #[arg(long, default_value_t = 4)]
    kill_after_secs: u64,
    #[arg(long, default_value_t = 500)]
    users: u64,
    /// Skip the partition scenario (it needs root for nft).
    #[arg(long)]
    skip_partition: bool,
    #[arg(long)]
    skip_flapping: bool,
    /// Working directory (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Run {
    rto_ms: u64,
    recovered: bool,
    failed_after_kill: u64,
    requests_after_kill: u64,
    worst_window_success: f64,
    shift_ms: Option<u64>,
    errors_by_reason: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct ShiftCount {
    scenario: String,
    automatic_shifts: usize,
    requests: u64,
    errors: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    rate_per_sec: u64,
    detection_floor_ms: u64,
    runs: Vec<Run>,
    rto_p50_ms: u64,
    rto_max_ms: u64,
    shift_p50_ms: Option<u64>,
    shift_max_ms: Option<u64>,
    freeze_runs: Vec<Run>,
    freeze_rto_p50_ms: u64,
    freeze_rto_max_ms: u64,
    no_shift_scenarios: Vec<ShiftCount>,
}

fn load(edge: &str, args: &Args, secs: u64) -> LoadgenConfig {
    let mut load = LoadgenConfig::new(vec![edge.to_string()]);
    load.rate_per_sec = args.rate_per_sec;
    load.duration_secs = secs;
    load.users = args.users;
    load.streamers = 100;
    load.timeout_ms = 2_000;
    load.initial_balance = 0;
    load
}

async fn fresh_lab(dir: &Path) -> Result<(Lab, String)> {
    let mut options = LabOptions::new(dir);
    options.agents = true;
    let lab = Lab::start(options).await?;
    let edge = scenarios::edge_url(&lab)?;
    Ok((lab, edge))
}

async fn fund(edge: &str, args: &Args) -> Result<()> {
    let mut funding = load(edge, args, 1);
    funding.initial_balance = 1_000_000;
    scenarios::fund_users(&funding).await?;
    Ok(())
}

async fn one_run(dir: &Path, args: &Args, freeze: bool) -> Result<Run> {
    let (mut lab, edge) = fresh_lab(dir).await?;
    let result = async {
        fund(&edge, args).await?;
        let victims = if freeze {
            vec!["gift-api-a".to_string()]
        } else {
            scenarios::site_a_application_tier(&lab)
        };
        let plan = KillUnderLoad {
            load: load(&edge, args, args.duration_secs),
            kill_after: Duration::from_secs(args.kill_after_secs),
            victims,
            freeze,
            shift_within: Duration::from_secs(15),
        };
        let outcome = scenarios::kill_under_load(&mut lab, &plan).await?;
        anyhow::Ok(Run {
            rto_ms: outcome.recovery.rto_ms,
            recovered: outcome.recovery.recovered,
            failed_after_kill: outcome.recovery.failed_after_event,
            requests_after_kill: outcome.recovery.requests_after_event,
            worst_window_success: outcome.recovery.worst_window_rate,
            shift_ms: outcome
                .shift_after
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            errors_by_reason: outcome.report.errors_by_reason,
        })
    }
    .await;
    if freeze {
        lab.resume("gift-api-a")?;
    }
    lab.down().await?;
    result
}

fn summary(label: &str, i: u32, of: u32, run: &Run, took: Duration) {
    eprintln!(
        "{label} run {i}/{of}: RTO {} ms, {} of {} failed after the event, shift after {:?} ms ({took:?} in all)",
        run.rto_ms, run.failed_after_kill, run.requests_after_kill, run.shift_ms
    );
}

async fn partition(dir: &Path, args: &Args) -> Result<ShiftCount> {
    let (lab, edge) = fresh_lab(dir).await?;
    let result = async {
        fund(&edge, args).await?;
        let traffic = tokio::spawn({
            let load = load(&edge, args, 12);
            async move { drills::loadgen::run(&load).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        {
            let _partition = scenarios::Partition::between_a_and_b()?;
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        let report = traffic.await??;
        let shifts = scenarios::policy_shifts(&lab).await?;
        anyhow::Ok(ShiftCount {
            scenario: "inter-site partition (nft DROP between a and b for 8 s)".into(),
            automatic_shifts: shifts.values().sum(),
            requests: report.requests,
            errors: report.errors,
        })
    }
    .await;
    lab.down().await?;
    result
}

async fn flapping(
    dir: &Path,
    args: &Args,
    down: Duration,
    up: Duration,
    cycles: u32,
) -> Result<ShiftCount> {
    let (lab, edge) = fresh_lab(dir).await?;
    let result = async {
        fund(&edge, args).await?;
        let secs = (down + up).as_secs() * u64::from(cycles) + 3;
        let traffic = tokio::spawn({
            let load = load(&edge, args, secs);
            async move { drills::loadgen::run(&load).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        scenarios::flap(&lab, "gift-api-a", cycles, down, up).await?;
        let report = traffic.await??;
        let shifts = scenarios::policy_shifts(&lab).await?;
        anyhow::Ok(ShiftCount {
            scenario: format!(
                "gift-api-a flapping: SIGSTOP {} ms / SIGCONT {} ms × {cycles}",
                down.as_millis(),
                up.as_millis()
            ),
            automatic_shifts: shifts.values().sum(),
            requests: report.requests,
            errors: report.errors,
        })
    }
    .await;
    lab.down().await?;
    result
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bench-failover-{}", std::process::id())),
    };
    let defaults = failover_policy::PolicyConfig::from_toml_str(
        "[services.gift-api]\nclass = \"stateless\"\n",
    )
    .context("the policy defaults")?;
    let service = &defaults.services["gift-api"];
    let detection_floor_ms = service.probe_interval_ms * u64::from(service.failures_to_trip);

    let mut runs = Vec::new();
    for i in 1..=args.runs {
        let started = Instant::now();
        let run = one_run(&base.join(format!("run-{i}")), &args, false).await?;
        summary("tier-down", i, args.runs, &run, started.elapsed());
        runs.push(run);
    }
    let mut freeze_runs = Vec::new();
    for i in 1..=args.freeze_runs {
        let started = Instant::now();
        let run = one_run(&base.join(format!("freeze-{i}")), &args, true).await?;
        summary(
            "gift-api-a frozen",
            i,
            args.freeze_runs,
            &run,
            started.elapsed(),
        );
        freeze_runs.push(run);
    }
    let mut no_shift = Vec::new();
    if !args.skip_partition {
        let p = partition(&base.join("partition"), &args).await?;
        eprintln!("{}: {} automatic shifts", p.scenario, p.automatic_shifts);
        no_shift.push(p);
    }
    if !args.skip_flapping {
        for (name, down, up, cycles) in [
            (
                "flap-fast",
                Duration::from_millis(500),
                Duration::from_millis(1500),
                6,
            ),
            (
                "flap-slow",
                Duration::from_secs(2),
                Duration::from_secs(2),
                4,
            ),
        ] {
            let f = flapping(&base.join(name), &args, down, up, cycles).await?;
            eprintln!("{}: {} automatic shifts", f.scenario, f.automatic_shifts);
            no_shift.push(f);
        }
    }

    let mut rtos: Vec<u64> = runs.iter().map(|r| r.rto_ms).collect();
    rtos.sort_unstable();
    let mut shifts: Vec<u64> = runs.iter().filter_map(|r| r.shift_ms).collect();
    shifts.sort_unstable();
    let mut freeze_rtos: Vec<u64> = freeze_runs.iter().map(|r| r.rto_ms).collect();
    freeze_rtos.sort_unstable();
    let report = Report {
        machine: machine(),
        rate_per_sec: args.rate_per_sec,
        detection_floor_ms,
        rto_p50_ms: percentile(&rtos, 0.5),
        rto_max_ms: rtos.last().copied().unwrap_or(0),
        shift_p50_ms: (!shifts.is_empty()).then(|| percentile(&shifts, 0.5)),
        shift_max_ms: shifts.last().copied(),
        runs,
        freeze_rto_p50_ms: percentile(&freeze_rtos, 0.5),
        freeze_rto_max_ms: freeze_rtos.last().copied().unwrap_or(0),
        freeze_runs,
        no_shift_scenarios: no_shift,
    };
    println!();
    println!("machine: {}", report.machine);
    println!(
        "site a application tier hard down, {} runs at {} requests/s through the edge",
        report.runs.len(),
        report.rate_per_sec
    );
    println!(
        "{:>4} {:>8} {:>10} {:>10} {:>9}",
        "run", "RTO ms", "failed", "after kill", "shift ms"
    );
    for (i, r) in report.runs.iter().enumerate() {
        println!(
            "{:>4} {:>8} {:>10} {:>10} {:>9}",
            i + 1,
            r.rto_ms,
            r.failed_after_kill,
            r.requests_after_kill,
            r.shift_ms
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into())
        );
    }
    println!(
        "RTO p50 {} ms, max {} ms (goal: p50 <= 2000, max <= 3000); shift p50 {:?} ms, max {:?} ms; detection floor {} ms",
        report.rto_p50_ms, report.rto_max_ms, report.shift_p50_ms, report.shift_max_ms, report.detection_floor_ms
    );
    if !report.freeze_runs.is_empty() {
        println!(
            "gift-api-a frozen (SIGSTOP), {} runs: RTO p50 {} ms, max {} ms; RTOs {:?}; shifts {:?}",
            report.freeze_runs.len(),
            report.freeze_rto_p50_ms,
            report.freeze_rto_max_ms,
            report.freeze_runs.iter().map(|r| r.rto_ms).collect::<Vec<_>>(),
            report.freeze_runs.iter().map(|r| r.shift_ms).collect::<Vec<_>>()
        );
    }
    for s in &report.no_shift_scenarios {
        println!(
            "{}: {} automatic shifts ({} requests, {} errors)",
            s.scenario, s.automatic_shifts, s.requests, s.errors
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            format!("{}\n", serde_json::to_string_pretty(&report)?),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
