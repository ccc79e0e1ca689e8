//! Benchmark: committed gift sends per second end to end (HTTP gift-api → wallet gRPC →
//! PostgreSQL, both lab sites, outbox worker running) at p99 ≤ 20 ms, against pgbench TPC-B
//! with 8 clients on the same PostgreSQL primary in the same run.
//!
//! Gift sends: open-loop loadgen steps at rising rates (send-only mix, Zipf users); the result
//! is the highest step with zero errors and send p99 within the bound. pgbench runs before and
//! after the gift steps (its own database `pgbench`, scale 10); the ratio uses their mean.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench-gifts --json docs/bench/gifts.json
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use drills::bench::machine;
use drills::lab::{pg_bin_dir, Lab, LabOptions};
use drills::loadgen::{self, LoadgenConfig, Mix};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Gift sends/s through gift-api at p99 <= 20 ms vs pgbench TPC-B (8 clients)")]
struct Args {
    /// Offered send rates to try, in order; stops after the first step over the bound.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,150,200,250,300,350,400,500,600,800"
    )]
    rates: Vec<u64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Latency bound on the send p99.
    #[arg(long, default_value_t = 20.0)]
    p99_bound_ms: f64,
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    #[arg(long, default_value_t = 1_000)]
    streamers: u64,
    /// Zipf exponent for users and streamers (hot keys); 0 = uniform.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    #[arg(long, default_value_t = 10)]
    pgbench_scale: u32,
    #[arg(long, default_value_t = 20)]
    pgbench_secs: u64,
    /// Working directory (default: a new temporary directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Step {
    offered_per_sec: u64,
    committed_sends_per_sec: f64,
    errors: u64,
    rejected: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    within_bound: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    p99_bound_ms: f64,
    users: u64,
    zipf_s: f64,
    steps: Vec<Step>,
    /// The best step within the bound (committed sends/s).
    sends_per_sec: f64,
    pgbench_clients: u32,
    pgbench_scale: u32,
    pgbench_tps: Vec<f64>,
    pgbench_tps_mean: f64,
    ratio_sends_over_pgbench: f64,
    goal_ratio: f64,
}

async fn pgbench(lab: &Lab, args: &[String]) -> Result<String> {
    let bin = pg_bin_dir()?.join("pgbench");
    let sql = lab
        .process("postgres-a")
        .and_then(|p| p.main_addr())
        .context("postgres-a address")?
        .to_string();
    let (host, port) = sql.rsplit_once(':').context("postgres address")?;
    let output = tokio::process::Command::new(&bin)
        .args(["-h", host, "-p", port, "-U", "postgres"])
        .args(args)
        .arg("pgbench")
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("pgbench {args:?} failed: {text}");
    }
    Ok(text)
}

/// `tps = 3520.123456 (without initial connection time)`.
fn parse_tps(text: &str) -> Result<f64> {
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps line in pgbench output: {text}"))
}

async fn pgbench_run(lab: &Lab, a: &Args) -> Result<f64> {
    let text = pgbench(
        lab,
        &[
            "-c".into(),
            a.pgbench_clients.to_string(),
            "-j".into(),
            "2".into(),
            "-T".into(),
            a.pgbench_secs.to_string(),
            "-M".into(),
            "prepared".into(),
        ],
    )
    .await?;
    let tps = parse_tps(&text)?;
    eprintln!("pgbench TPC-B, {} clients: {tps:.0} TPS", a.pgbench_clients);
    Ok(tps)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile_dir()?;
            temp.clone()
        }
    };
    let started = Instant::now();
    let lab = Lab::start(LabOptions::new(&dir)).await?;
    eprintln!("lab healthy after {:?}", started.elapsed());
    let result = run(&lab, &args).await;
    lab.down().await?;
    let report = result?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bench-gifts-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn run(lab: &Lab, args: &Args) -> Result<Report> {
    lab.psql("postgres-a", "postgres", "CREATE DATABASE pgbench")
        .await?;
    pgbench(
        lab,
        &[
            "-i".into(),
            "-q".into(),
            "-s".into(),
            args.pgbench_scale.to_string(),
        ],
    )
    .await?;
    let mut tps = vec![pgbench_run(lab, args).await?];
    // pgbench leaves dirty buffers behind; without a checkpoint here the first gift step
    // pays for pgbench's writes (p99 34 ms instead of 8 ms at 100 sends/s when measured).
    lab.psql("postgres-a", "postgres", "CHECKPOINT").await?;

    let targets = lab
        .describe()
        .endpoints
        .gift_api
        .values()
        .cloned()
        .collect::<Vec<_>>();
    let mut steps = Vec::new();
    // Warm-up (not reported): funds every user once, generously, and lets the pools open
    // their connections; the steps skip the set-up.
    let mut warm_up = LoadgenConfig::new(targets.clone());
    warm_up.rate_per_sec = args.rates.first().copied().unwrap_or(100).min(100);
    warm_up.duration_secs = 5;
    warm_up.users = args.users;
    warm_up.streamers = args.streamers;
    warm_up.zipf_s = args.zipf_s;
    warm_up.mix = Mix::new(100, 0, 0)?;
    warm_up.initial_balance = 1_000_000_000;
    let report = loadgen::run(&warm_up).await?;
    eprintln!(
        "warm-up: {:.0} sends/s, p99 {:.1} ms",
        report.committed_sends_per_sec(),
        report.send_p99_ms()
    );
    for rate in &args.rates {
        let mut config = LoadgenConfig::new(targets.clone());
        config.rate_per_sec = *rate;
        config.duration_secs = args.step_secs;
        config.users = args.users;
        config.streamers = args.streamers;
        config.zipf_s = args.zipf_s;
        config.mix = Mix::new(100, 0, 0)?;
        config.run_id = loadgen::random_run_id();
        config.initial_balance = 0;
        let report = loadgen::run(&config).await?;
        let send = report
            .op(loadgen::Op::Send)
            .context("send statistics")?
            .clone();
        let within = report.errors == 0 && report.send_p99_ms() <= args.p99_bound_ms;
        eprintln!(
            "offered {rate}/s: {:.0} sends/s, p99 {:.1} ms, errors {}{}",
            report.committed_sends_per_sec(),
            report.send_p99_ms(),
            report.errors,
            if within { "" } else { "  (over the bound)" }
        );
        steps.push(Step {
            offered_per_sec: *rate,
            committed_sends_per_sec: report.committed_sends_per_sec(),
            errors: report.errors,
            rejected: report.rejected,
            p50_ms: send.latency_ms.p50,
            p99_ms: send.latency_ms.p99,
            max_ms: send.latency_ms.max,
            within_bound: within,
        });
        if !within {
            break;
        }
    }
    tps.push(pgbench_run(lab, args).await?);
    let sends_per_sec = steps
        .iter()
        .filter(|s| s.within_bound)
        .map(|s| s.committed_sends_per_sec)
        .fold(0.0, f64::max);
    let mean = tps.iter().sum::<f64>() / tps.len() as f64;
    Ok(Report {
        machine: machine(),
        p99_bound_ms: args.p99_bound_ms,
        users: args.users,
        zipf_s: args.zipf_s,
        steps,
        sends_per_sec,
        pgbench_clients: args.pgbench_clients,
        pgbench_scale: args.pgbench_scale,
        pgbench_tps: tps,
        pgbench_tps_mean: mean,
        ratio_sends_over_pgbench: if mean > 0.0 {
            sends_per_sec / mean
        } else {
            0.0
        },
        goal_ratio: 0.6,
    })
}
