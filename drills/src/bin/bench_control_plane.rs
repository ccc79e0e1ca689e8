//! Benchmark: invoker write throughput and commit latency against a 3-node etcd cluster.
//!
//! Both run on this machine in the same run: the lab's three invoker nodes (raft over gRPC,
//! redb log fsync'd) and a three-member etcd cluster (etcd's own WAL fsync), each on the
//! per-site loopback ranges. Every client writes sequentially (closed loop); N clients run at
//! once. The invoker write is a `SetRouting` that moves all 1024 buckets to the other site;
//! the etcd write is a `put` whose value has the same size as that request's protobuf encoding.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench-control-plane --seconds 5 --json docs/bench/control-plane.json
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use drills::bench::machine;
use drills::lab::{Lab, LabOptions};
use hdrhistogram::Histogram;
use invoker_api::{pb, InvokerClient};
use prost::Message;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Invoker vs etcd: write throughput and commit latency at several concurrencies")]
struct Args {
    /// Measured seconds per concurrency level (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,
    /// Working directory (default: a new temporary directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Leader-failover rounds (SIGKILL the leader, time until a write commits again).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
}

#[derive(Debug, Clone, Serialize)]
struct LevelResult {
    system: String,
    clients: usize,
    writes: u64,
    errors: u64,
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    value_bytes: usize,
    seconds_per_level: u64,
    levels: Vec<LevelResult>,
    ratios: Vec<Ratio>,
    failover_ms: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    clients: usize,
    throughput_invoker_over_etcd: f64,
    p99_invoker_over_etcd: f64,
}

fn set_request(i: u64) -> pb::SetRoutingRequest {
    // Alternate between two tables so that every write changes state.
    let site = if i.is_multiple_of(2) { "a" } else { "b" };
    pb::SetRoutingRequest {
        service: "gift-api".into(),
        runs: vec![pb::BucketRun {
            site: site.into(),
            count: invoker_domain::BUCKETS as u32,
        }],
        expected_version: 0,
        actor: "bench".into(),
        reason: "benchmark".into(),
    }
}

/// Runs `clients` closed-loop writers for warm-up + `seconds`; returns the measured level.
async fn run_level<F, Fut>(
    system: &str,
    clients: usize,
    seconds: u64,
    write: F,
) -> Result<LevelResult>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let write = Arc::new(write);
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut ok, mut errors, mut i) = (0u64, 0u64, 0u64);
            loop {
                let elapsed = start.elapsed();
                if elapsed >= warmup + measure {
                    break;
                }
                let t = Instant::now();
                let result = write(c, i).await;
                i += 1;
                if elapsed < warmup {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        hist.record(t.elapsed().as_micros().max(1) as u64)?;
                    }
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((hist, ok, errors))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut writes, mut errors) = (0, 0);
    for task in tasks {
        let (h, ok, err) = task.await??;
        hist.add(&h)?;
        writes += ok;
        errors += err;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(LevelResult {
        system: system.into(),
        clients,
        writes,
        errors,
        writes_per_sec: writes as f64 / measure.as_secs_f64(),
        p50_ms: ms(hist.value_at_quantile(0.50)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
    })
}

/// A three-member etcd cluster on the site ranges, killed when dropped.
struct EtcdCluster {
    children: Vec<tokio::process::Child>,
    client_urls: Vec<String>,
}

async fn start_etcd(dir: &std::path::Path) -> Result<EtcdCluster> {
    let bin = drills::lab::etcd_bin()?;
    let hosts = ["127.0.1.20", "127.0.2.20", "127.0.3.20"];
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for host in hosts {
        let peer = std::net::TcpListener::bind((host, 0))?.local_addr()?.port();
        let client = std::net::TcpListener::bind((host, 0))?.local_addr()?.port();
        peers.push(format!("http://{host}:{peer}"));
        clients.push(format!("http://{host}:{client}"));
    }
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("bench{i}={p}"))
        .collect();
    let mut children = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("etcd-bench{i}.log")))?;
        children.push(
            tokio::process::Command::new(&bin)
                .args(["--name", &format!("bench{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-bench{i}")))
                .args(["--listen-client-urls", &clients[i]])
                .args(["--advertise-client-urls", &clients[i]])
                .args(["--listen-peer-urls", &peers[i]])
                .args(["--initial-advertise-peer-urls", &peers[i]])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "bench"])
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect(clients.clone(), None).await {
            if c.put("/bench/ready", "1", None).await.is_ok() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "etcd cluster did not take a write within 30 s (logs in {})",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(EtcdCluster {
        children,
        client_urls: clients,
    })
}

/// Waits until every node names the same leader, that leader agrees, and every node has
/// applied what the leader has: a round never starts in the middle of an election.
async fn wait_stable(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut statuses = Vec::new();
        for endpoint in lab.invoker_endpoints() {
            if let Ok(status) = InvokerClient::connect_node(&endpoint)?.status().await {
                statuses.push(status);
            }
        }
        let leader = statuses.first().map(|s| s.leader_id).unwrap_or(0);
        let leader_applied = statuses
            .iter()
            .find(|s| s.node_id == leader)
            .map(|s| s.last_applied);
        let stable = statuses.len() == 3
            && leader != 0
            && statuses.iter().all(|s| s.leader_id == leader)
            && leader_applied
                .is_some_and(|applied| statuses.iter().all(|s| s.last_applied >= applied));
        if stable {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("cluster not stable within 30 s: {statuses:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGKILL the leader, time until a write commits through the survivors, restart it.
async fn failover_round(lab: &mut Lab) -> Result<u64> {
    let endpoints = lab.invoker_endpoints();
    wait_stable(lab).await?;
    // Stay stable for a moment: a just-restarted node must not be mid-catch-up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_stable(lab).await?;
    let (_, name) = lab.invoker_leader(Duration::from_secs(20)).await?;
    lab.kill(&name)?;
    let killed = Instant::now();
    let mut i = 0;
    loop {
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no write committed within 30 s of killing {name}");
        }
        if let Ok(client) = InvokerClient::connect_leader(&endpoints).await {
            let mut req = tonic::Request::new(set_request(i));
            req.set_timeout(Duration::from_millis(500));
            if client.admin().set_routing(req).await.is_ok() {
                break;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = killed.elapsed().as_millis() as u64;
    lab.restart(&name).await?;
    Ok(elapsed)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _guard = telemetry::init("bench-control-plane", "bench")?;
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let value_bytes = set_request(0).encoded_len();
    eprintln!(
        "machine: {}; value size {value_bytes} bytes; dir {}",
        machine(),
        dir.display()
    );

    let mut lab = Lab::start(LabOptions::invokers_only(dir.join("lab"))).await?;
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let etcd = start_etcd(&etcd_dir).await?;

    let mut levels = Vec::new();
    for &clients in &args.clients {
        let leader =
            InvokerClient::wait_for_leader(&lab.invoker_endpoints(), Duration::from_secs(20))
                .await?;
        // One connection per client, as for etcd below.
        let conns = (0..clients)
            .map(|_| InvokerClient::connect_node(leader.endpoint()).map(|c| c.admin()))
            .collect::<Result<Vec<_>, _>>()?;
        let conns = Arc::new(conns);
        let inv = run_level("invoker", clients, args.seconds, move |c, i| {
            let mut admin = conns[c].clone();
            async move {
                admin.set_routing(set_request(i)).await?;
                Ok(())
            }
        })
        .await?;
        eprintln!("{inv:?}");

        let mut etcd_clients = Vec::new();
        for _ in 0..clients {
            etcd_clients.push(
                etcd_client::Client::connect(etcd.client_urls.clone(), None)
                    .await?
                    .kv_client(),
            );
        }
        let etcd_clients = Arc::new(etcd_clients);
        let value = vec![b'x'; value_bytes];
        let et = run_level("etcd", clients, args.seconds, move |c, _i| {
            let mut kv = etcd_clients[c].clone();
            let value = value.clone();
            async move {
                kv.put(format!("/bench/{c}"), value, None).await?;
                Ok(())
            }
        })
        .await?;
        eprintln!("{et:?}");
        levels.push(inv);
        levels.push(et);
    }

    let mut failover_ms = Vec::new();
    for round in 0..args.failovers {
        let ms = failover_round(&mut lab).await?;
        eprintln!(
            "failover round {round}: first committed write {ms} ms after SIGKILL of the leader"
        );
        failover_ms.push(ms);
    }

    let ratios: Vec<Ratio> = args
        .clients
        .iter()
        .filter_map(|&c| {
            let i = levels
                .iter()
                .find(|l| l.system == "invoker" && l.clients == c)?;
            let e = levels
                .iter()
                .find(|l| l.system == "etcd" && l.clients == c)?;
            Some(Ratio {
                clients: c,
                throughput_invoker_over_etcd: i.writes_per_sec
                    / e.writes_per_sec.max(f64::MIN_POSITIVE),
                p99_invoker_over_etcd: i.p99_ms / e.p99_ms.max(f64::MIN_POSITIVE),
            })
        })
        .collect();
    let report = Report {
        machine: machine(),
        value_bytes,
        seconds_per_level: args.seconds,
        levels,
        ratios,
        failover_ms,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    drop(etcd.children);
    lab.down().await?;
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bench-control-plane-{}", std::process::id()));
    Ok(dir)
}

fn print_table(r: &Report) {
    println!(
        "machine: {}   value: {} bytes   {} s per level",
        r.machine, r.value_bytes, r.seconds_per_level
    );
    println!(
        "{:<8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "system", "clients", "writes/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for l in &r.levels {
        println!(
            "{:<8} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            l.system, l.clients, l.writes_per_sec, l.p50_ms, l.p99_ms, l.max_ms, l.errors
        );
    }
    for ratio in &r.ratios {
        println!(
            "clients {:>3}: invoker/etcd throughput {:.2}x, p99 {:.2}x",
            ratio.clients, ratio.throughput_invoker_over_etcd, ratio.p99_invoker_over_etcd
        );
    }
    if !r.failover_ms.is_empty() {
        let mut sorted = r.failover_ms.clone();
        sorted.sort();
        println!(
            "leader SIGKILL -> next committed write: median {} ms, max {} ms over {} rounds",
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            sorted.len()
        );
    }
}
