//! `lab`: start, inspect and stop the local two-site lab.
//!
//! ```text
//! lab up [--dir DIR] [--detach] [--invokers-only]   # foreground until Ctrl-C / SIGTERM
//! lab status [--dir DIR] [--json]
//! lab endpoints [--dir DIR]                          # comma-separated invoker endpoints
//! lab endpoints --postgres a | --gift-api b           # one site's database / gift-api URL
//! lab endpoints --edge                               # the edge router's URL (send traffic here)
//! lab down [--dir DIR]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use drills::lab::{self, Components, Lab, LabDescription, LabError, LabOptions, ProcState};
use invoker_api::InvokerClient;

const DEFAULT_DIR: &str = "/tmp/gift-lab";

#[derive(Parser)]
#[command(
    version,
    about = "The local two-site lab: every component as a child process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct DirArg {
    /// The lab directory (data, logs, pid files, lab.json).
    #[arg(long, env = "LAB_DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the lab and wait until it is healthy; stays in the foreground until Ctrl-C or
    /// SIGTERM, then stops everything (unless --detach).
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Print the summary and exit, leaving the lab running (`lab down` stops it).
        #[arg(long)]
        detach: bool,
        /// Start only the three invoker nodes.
        #[arg(long)]
        invokers_only: bool,
        /// Do not apply the lab topology.
        #[arg(long)]
        no_topology: bool,
        /// Do not start the site agents (so the invoker runs no automatic failover).
        #[arg(long)]
        no_agents: bool,
        /// Seconds to wait for the lab to become healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Show every process of the lab, whether it runs, and the invoker leader.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the invoker endpoints, comma-separated (for `invokerctl --endpoints`), or with
    /// --postgres / --gift-api one site's database URL or gift-api URL, or with --edge the
    /// edge router's URL.
    Endpoints {
        #[command(flatten)]
        dir: DirArg,
        /// The PostgreSQL URL of this site (`a` is the primary).
        #[arg(long, value_name = "SITE", conflicts_with_all = ["gift_api", "edge"])]
        postgres: Option<String>,
        /// The gift-api base URL of this site.
        #[arg(long, value_name = "SITE", conflicts_with = "edge")]
        gift_api: Option<String>,
        /// The edge router's URL: traffic sent there goes to the site its uid is routed to.
        #[arg(long)]
        edge: bool,
    },
    /// SIGKILL every process of one site (a drill): its invoker node, etcd, wallet, gift-api,
    /// agent and, unless --keep-postgres, its PostgreSQL.
    Kill {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        site: String,
        /// Leave the site's PostgreSQL running ("application tier hard down").
        #[arg(long)]
        keep_postgres: bool,
    },
    /// Stop every process of the lab (works from the pid files, even after a crash).
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init("lab", "lab").context("initialising logging")?;
    match cli.command {
        Command::Up {
            dir,
            detach,
            invokers_only,
            no_topology,
            no_agents,
            timeout,
        } => {
            let mut opts = LabOptions::new(dir.dir);
            if invokers_only {
                opts.components = Components::InvokersOnly;
            }
            opts.apply_topology = !no_topology;
            opts.agents = !no_agents;
            opts.health_timeout = Duration::from_secs(timeout.max(1));
            up(opts, detach).await
        }
        Command::Status { dir, json } => status(&dir.dir, json).await,
        Command::Endpoints {
            dir,
            postgres,
            gift_api,
            edge,
        } => {
            let desc = load(&dir.dir)?;
            let pick =
                |map: &std::collections::BTreeMap<String, String>, site: &str, what: &str| {
                    map.get(site).cloned().with_context(|| {
                        format!(
                            "no {what} in site {site:?} (sites: {:?})",
                            map.keys().collect::<Vec<_>>()
                        )
                    })
                };
            let line = match (postgres, gift_api) {
                (Some(site), _) => pick(&desc.endpoints.postgres, &site, "PostgreSQL")?,
                (_, Some(site)) => pick(&desc.endpoints.gift_api, &site, "gift-api")?,
                _ if edge => desc.endpoints.edge.clone().with_context(|| {
                    "this lab has no edge router (it runs with the full lab only)".to_string()
                })?,
                _ => desc.endpoints.invokers.join(","),
            };
            println!("{line}");
            Ok(())
        }
        Command::Kill {
            dir,
            site,
            keep_postgres,
        } => {
            let killed = drills::lab::kill_site_dir(&dir.dir, &site, keep_postgres)?;
            if killed.is_empty() {
                eprintln!("nothing of site {site:?} was running");
            } else {
                println!("killed (SIGKILL): {}", killed.join(", "));
            }
            Ok(())
        }
        Command::Down { dir } => down(&dir.dir),
    }
}

fn load(dir: &Path) -> Result<LabDescription> {
    LabDescription::load(dir).with_context(|| {
        format!(
            "no lab description in {} (start one with `lab up --dir {}`)",
            dir.display(),
            dir.display()
        )
    })
}

async fn up(opts: LabOptions, detach: bool) -> Result<()> {
    let dir = opts.dir.clone();
    eprintln!("starting the lab in {} ...", dir.display());
    // Dropping the start future (on Ctrl-C) kills whatever it had started.
    let lab = tokio::select! {
        lab = Lab::start(opts) => lab.map_err(explain)?,
        () = telemetry::shutdown_signal() => bail!("interrupted while starting; stopped what had started"),
    };
    print_summary(lab.describe());
    if detach {
        let desc = lab.detach();
        println!(
            "detached; stop it with: lab down --dir {}",
            desc.dir.display()
        );
        return Ok(());
    }
    println!("running in the foreground; Ctrl-C stops everything");
    let mut lab = lab;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let signal = telemetry::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = tick.tick() => {
                for (name, status) in lab.poll_exits() {
                    eprintln!("warning: {name} exited ({status})");
                }
            }
        }
    }
    eprintln!("stopping the lab ...");
    lab.down().await?;
    eprintln!("stopped");
    Ok(())
}

/// Keeps the lab error (it names what failed and how to fix it) under a short context.
fn explain(e: LabError) -> anyhow::Error {
    anyhow::Error::new(e).context("the lab did not start")
}

fn print_summary(desc: &LabDescription) {
    let secs = desc.healthy_after_ms.unwrap_or(0) as f64 / 1000.0;
    println!(
        "lab healthy after {secs:.2} s in {} ({} processes)",
        desc.dir.display(),
        desc.processes.len()
    );
    print_table(desc, None);
    println!("invoker endpoints: {}", desc.endpoints.invokers.join(","));
    for (site, url) in &desc.endpoints.postgres {
        println!("postgres {site}: {url}");
    }
    for (site, url) in &desc.endpoints.etcd {
        println!("etcd {site}: {url}");
    }
    for (site, url) in &desc.endpoints.gift_api {
        println!("gift-api {site}: {url}");
    }
    if let Some(url) = &desc.endpoints.edge {
        println!(
            "edge router: {url} (admin {})",
            desc.endpoints.edge_admin.as_deref().unwrap_or("-")
        );
    }
    if let Some(t) = &desc.topology {
        println!("topology: {}", t.display());
    }
    println!("logs: {}", desc.dir.join(lab::LOGS_DIR).display());
}

fn print_table(desc: &LabDescription, states: Option<&[ProcState]>) {
    println!(
        "{:<11} {:<8} {:<7} {:>7} {:<8} ADDRESS",
        "NAME", "KIND", "SITE", "PID", "STATE"
    );
    for (i, p) in desc.processes.iter().enumerate() {
        let state = states
            .and_then(|s| s.get(i).copied())
            .unwrap_or_else(|| p.state());
        println!(
            "{:<11} {:<8} {:<7} {:>7} {:<8} {}",
            p.name,
            p.kind.to_string(),
            p.site,
            p.pid,
            state.to_string(),
            p.main_addr().unwrap_or("-")
        );
    }
}

/// The leader as the cluster sees it, or why it could not be found.
async fn leader(desc: &LabDescription) -> Result<invoker_api::pb::ClusterStatus, String> {
    let find = async {
        let client = InvokerClient::connect_leader(&desc.endpoints.invokers)
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), find).await {
        Ok(result) => result,
        Err(_) => Err("no answer within 5 s".into()),
    }
}

async fn status(dir: &Path, json: bool) -> Result<()> {
    let desc = load(dir)?;
    let states: Vec<ProcState> = desc.processes.iter().map(|p| p.state()).collect();
    let any_invoker = desc
        .processes
        .iter()
        .zip(&states)
        .any(|(p, s)| p.kind == lab::ProcessKind::Invoker && *s == ProcState::Running);
    let leader = if any_invoker {
        leader(&desc).await
    } else {
        Err("no invoker is running".into())
    };
    let leader_name = |id: u64| {
        desc.processes
            .iter()
            .find(|p| p.node_id == Some(id))
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("invoker-{id}"))
    };
    if json {
        let processes: Vec<serde_json::Value> = desc
            .processes
            .iter()
            .zip(&states)
            .map(|(p, s)| {
                serde_json::json!({
                    "name": p.name, "kind": p.kind, "site": p.site, "pid": p.pid,
                    "state": s, "listen": p.listen, "log": p.log,
                })
            })
            .collect();
        let leader = match &leader {
            Ok(s) => serde_json::json!({
                "id": s.leader_id, "name": leader_name(s.leader_id), "addr": s.leader_addr,
                "term": s.term, "commit_index": s.commit_index, "members": s.members.len(),
            }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let out = serde_json::json!({
            "dir": desc.dir, "started_at": desc.started_at,
            "healthy_after_ms": desc.healthy_after_ms, "processes": processes,
            "leader": leader, "endpoints": desc.endpoints,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "lab in {} (started {}, {})",
        desc.dir.display(),
        desc.started_at,
        match desc.healthy_after_ms {
            Some(ms) => format!("healthy after {:.2} s", ms as f64 / 1000.0),
            None => "never became healthy".into(),
        }
    );
    print_table(&desc, Some(&states));
    match leader {
        Ok(s) => println!(
            "leader: {} (node {}, {}) term {} commit {}",
            leader_name(s.leader_id),
            s.leader_id,
            s.leader_addr,
            s.term,
            s.commit_index
        ),
        Err(e) => println!("leader: unknown ({e})"),
    }
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let report =
        lab::down_dir(dir).with_context(|| format!("stopping the lab in {}", dir.display()))?;
    for name in &report.stopped {
        println!("stopped {name}");
    }
    for name in &report.killed {
        println!("killed  {name} (did not stop within {:?})", lab::DOWN_GRACE);
    }
    if report.stopped.is_empty() && report.killed.is_empty() {
        println!("nothing was running in {}", dir.display());
    }
    Ok(())
}
