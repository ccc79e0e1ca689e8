//! `site-agent`: probes its site (and the peer site) every `probe_interval_ms`.
//!
//! `--once` runs one round and prints it (JSON with `--json`), exit 0. Otherwise it probes
//! until SIGTERM, streams every round to the invoker leader (when `invoker_endpoints` is set)
//! and logs every change of an instance's or a database's health.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use site_agent::probe::{Prober, Round};
use site_agent::{AgentConfig, AgentError};
use telemetry::service::{run_service, Failure, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    version,
    about = "The site agent: probes local instances, the site's PostgreSQL and the peer site"
)]
struct Args {
    /// TOML configuration; keys can be overridden with SITE_AGENT_* variables.
    #[arg(long, short, env = "SITE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// One round, printed, then exit.
    #[arg(long)]
    once: bool,
    /// With --once: JSON.
    #[arg(long)]
    json: bool,
}

fn print_round(round: &Round, json: bool) {
    if json {
        match serde_json::to_string_pretty(round) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("site-agent: {e}"),
        }
        return;
    }
    println!(
        "{} (site {}) round {}",
        round.agent_id, round.site, round.seq
    );
    for i in &round.instances {
        println!(
            "  {:<10} {:<16} {:<28} {} {} µs {}",
            i.service,
            i.instance,
            i.address,
            if i.healthy { "healthy" } else { "FAILING" },
            i.latency_us,
            i.error.as_deref().unwrap_or("")
        );
    }
    for d in &round.databases {
        println!(
            "  database {}: {:?} lsn {:?} received {:?} replayed {:?} lag {:?} ms ledger {:?} epoch {:?} {}",
            d.site,
            d.role,
            d.current_wal_lsn,
            d.receive_lsn,
            d.replay_lsn,
            d.replay_lag_ms,
            d.ledger_sequence,
            d.fencing_epoch,
            d.error.as_deref().unwrap_or("")
        );
    }
    for p in &round.peers {
        println!(
            "  peer {} {:<28} {}",
            p.target_site,
            p.target,
            if p.reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            }
        );
    }
    for e in &round.discovery_errors {
        println!("  registry: {e}");
    }
}

async fn run(
    config: AgentConfig,
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<(), Failure> {
    let interval = Duration::from_millis(config.probe_interval_ms);
    let (rounds_tx, rounds_rx) = tokio::sync::watch::channel(None);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A site agent with its own database keeps the writer lease and runs the leader's
    // commands; the witness (no database) only reports.
    let (lease_status, _lease_status_rx) = tokio::sync::watch::channel(Default::default());
    let (channels, controller) = match config.own_database_url() {
        Some(url) => {
            let (outgoing_tx, outgoing_rx) = tokio::sync::mpsc::channel(64);
            let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(64);
            let controller = site_agent::lease::controller(
                &config,
                url,
                incoming_rx,
                outgoing_tx,
                lease_status,
                stop_rx.clone(),
            )
            .map_err(|e| Failure::Config(e.to_string()))?;
            (
                Some(site_agent::session::Channels {
                    outgoing: outgoing_rx,
                    incoming: incoming_tx,
                }),
                Some(tokio::spawn(controller)),
            )
        }
        // The witness reads every site's database: it renews the writer's lease from outside
        // (never fences), so the writer site's agent dying alone does not stop payments.
        None => match site_agent::peer_lease::PeerLease::from_config(&config)
            .map_err(|e| Failure::Config(e.to_string()))?
        {
            Some(peer) => {
                let (outgoing_tx, outgoing_rx) = tokio::sync::mpsc::channel(64);
                let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(64);
                let task = tokio::spawn(peer.run(incoming_rx, outgoing_tx, stop_rx.clone()));
                (
                    Some(site_agent::session::Channels {
                        outgoing: outgoing_rx,
                        incoming: incoming_tx,
                    }),
                    Some(task),
                )
            }
            None => (None, None),
        },
    };
    let session = tokio::spawn(site_agent::session::run_with(
        config.identity(),
        rounds_rx,
        channels,
        stop_rx,
    ));
    let mut prober = Prober::new(config).map_err(|e| Failure::Config(e.to_string()))?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health: BTreeMap<String, bool> = BTreeMap::new();
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        let round = prober.round().await;
        let seen = round
            .instances
            .iter()
            .map(|i| {
                (
                    format!("{}/{}", i.service, i.instance),
                    i.healthy,
                    i.error.clone(),
                )
            })
            .chain(
                round
                    .peers
                    .iter()
                    .map(|p| (format!("peer {}", p.target), p.reachable, p.error.clone())),
            )
            .chain(round.databases.iter().map(|d| {
                (
                    format!("database {}", d.site),
                    d.error.is_none(),
                    d.error.clone(),
                )
            }));
        let seen: Vec<_> = seen.collect();
        // The session sends the newest round; probing never waits for it.
        rounds_tx.send_replace(Some(site_agent::session::to_report(&round)));
        for (name, ok, error) in seen {
            if health.insert(name.clone(), ok) != Some(ok) {
                if ok {
                    tracing::info!(target = %name, "healthy");
                } else {
                    tracing::warn!(target = %name, error = ?error, "failing");
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    if let Some(controller) = controller {
        let _ = tokio::time::timeout(Duration::from_secs(2), controller).await;
    }
    tracing::info!("site-agent stopped cleanly");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = AgentConfig::load(args.config.as_deref()).map_err(|e| match e {
        AgentError::Config(m) => m,
        other => other.to_string(),
    });
    if args.once {
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                eprintln!("site-agent: invalid configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("site-agent: {e}");
                return ExitCode::FAILURE;
            }
        };
        return runtime.block_on(async {
            match Prober::new(config) {
                Ok(mut prober) => {
                    print_round(&prober.round().await, args.json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("site-agent: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        });
    }
    run_service("site-agent", |c: &AgentConfig| c.agent_id(), config, run)
}
