//! `invokerctl`: the operators' CLI for the invoker control plane.

mod output;
mod wallet;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use invoker_api::{convert, pb, InvokerClient};
use invoker_domain::{runs_from_buckets, BucketRun, RoutingTable, Topology, BUCKETS};

#[derive(Parser)]
#[command(
    version,
    about = "Operate the invoker control plane",
    max_term_width = 100
)]
struct Cli {
    /// Invoker endpoints (host:port), comma-separated; the leader is found among them.
    #[arg(long, env = "INVOKER_ENDPOINTS", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Print machine-readable JSON (read commands).
    #[arg(long, global = true)]
    json: bool,
    /// Who is acting, recorded in the audit log (default: $USER@host).
    #[arg(long, env = "INVOKER_ACTOR", global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Members, leader, term, commit index, and each service's routing share per site.
    Status,
    /// Read or change a service's routing table.
    #[command(subcommand)]
    Routing(RoutingCmd),
    /// The audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Add or remove raft members.
    #[command(subcommand)]
    Members(MembersCmd),
    /// Declare sites and services from a TOML file (idempotent; never prunes).
    Apply {
        file: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The failover policy on the leader: classification of each site and service, decisions
    /// being committed (or, paused, what it would do) and recent decisions with evidence.
    Policy,
    /// Put the failover policy in dry-run: it records "would ..." and acts on nothing.
    Pause {
        #[arg(long)]
        reason: String,
    },
    /// Let the failover policy act again.
    Resume {
        #[arg(long)]
        reason: String,
    },
    /// Admit a site's requests to a service only up to a rate at the edge (429 beyond).
    Throttle {
        service: String,
        site: String,
        /// Requests per second; 0 or --lift removes the throttle.
        #[arg(long, required_unless_present = "lift")]
        max_rps: Option<u64>,
        #[arg(long, conflicts_with = "max_rps")]
        lift: bool,
        #[arg(long)]
        reason: String,
    },
    /// Approve a pending proposal: shows it (estimate, evidence, digest) and asks you to type
    /// `approve` unless --yes. The approval is bound to the digest and term shown.
    Approve {
        id: u64,
        #[command(flatten)]
        operator: OperatorArgs,
        /// Do not ask (scripts); the proposal is still printed.
        #[arg(long)]
        yes: bool,
    },
    /// Reject a pending proposal.
    Reject {
        id: u64,
        #[command(flatten)]
        operator: OperatorArgs,
        #[arg(long)]
        reason: String,
    },
    /// Open proposals (awaiting a decision or executing): strong-service failovers and
    /// switchovers, with their data-loss estimate, plan and execution.
    Proposals {
        /// Include decided and finished proposals too.
        #[arg(long)]
        all: bool,
    },
    /// Zero-loss mode of a strong service: its primary commits only once a standby in the
    /// other site has the commit (the controller relaxes it, recorded, while none streams).
    Replication {
        service: String,
        /// Synchronous replication on (zero-loss mode).
        #[arg(
            long,
            conflicts_with = "asynchronous",
            required_unless_present = "asynchronous"
        )]
        synchronous: bool,
        /// Back to asynchronous replication.
        #[arg(long = "async")]
        asynchronous: bool,
        #[arg(long)]
        reason: String,
    },
    /// After a wallet failover: the lost-transaction report and compensations.
    #[command(subcommand)]
    Wallet(wallet::WalletCmd),
    /// Open a writer move by hand; it needs approval like any proposal. Planned (default):
    /// fences the old primary, waits for the replica to catch up, loses nothing.
    Switchover {
        /// The strong service (wallet).
        service: String,
        /// The site that becomes the writer.
        #[arg(long)]
        to: String,
        /// A forced failover instead: the old primary is fenced only if reachable, and what
        /// it had not replicated is lost (see `wallet lost-report` afterwards).
        #[arg(long)]
        forced: bool,
        #[command(flatten)]
        operator: OperatorArgs,
        #[arg(long)]
        reason: String,
    },
}

/// Who approves: an operator configured on the invoker, and their token.
#[derive(clap::Args)]
pub(crate) struct OperatorArgs {
    /// Operator name as configured in the invoker's [[approvals.operators]].
    #[arg(long, env = "INVOKER_OPERATOR")]
    pub(crate) operator: String,
    /// File holding the operator's token (or set INVOKER_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl OperatorArgs {
    pub(crate) fn token(&self) -> Result<String> {
        match &self.token_file {
            Some(path) => Ok(std::fs::read_to_string(path)
                .with_context(|| format!("reading the token from {}", path.display()))?
                .trim()
                .to_string()),
            None => std::env::var("INVOKER_TOKEN")
                .context("no token: pass --token-file or set INVOKER_TOKEN"),
        }
    }
}

#[derive(Subcommand)]
enum RoutingCmd {
    /// Show a service's table (share per site and version).
    Get {
        service: String,
        /// Print all 1024 buckets (with --json they are always included).
        #[arg(long)]
        buckets: bool,
    },
    /// Shift a service's traffic. Exactly one of --weights, --all or --file.
    Set {
        service: String,
        /// Weights per site, e.g. a=30,b=70.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["all", "file"])]
        weights: Vec<String>,
        /// Send every bucket to this site.
        #[arg(long, conflicts_with = "file")]
        all: Option<String>,
        /// A JSON array of exactly 1024 site ids.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Why (mandatory; recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Refuse unless the table is at this version (compare-and-swap).
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

#[derive(Subcommand)]
enum MembersCmd {
    /// List members (same as the first part of `status`).
    List,
    /// Add a node as a voter (it must be running; it catches up first).
    Add {
        id: u64,
        addr: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        reason: String,
    },
    /// Remove a voter.
    Remove {
        id: u64,
        #[arg(long)]
        reason: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("invokerctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invokerctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

async fn run(cli: Cli) -> Result<()> {
    if cli.endpoints.is_empty() {
        bail!("no endpoints: pass --endpoints host:port[,host:port...] or set INVOKER_ENDPOINTS");
    }
    let actor = cli.actor.clone().unwrap_or_else(default_actor);
    let client = InvokerClient::connect_leader(&cli.endpoints)
        .await
        .context("finding the leader")?;
    let mut admin = client.admin();
    match cli.command {
        Cmd::Status => {
            let status = client.status().await?;
            output::status(&status, cli.json)
        }
        Cmd::Members(MembersCmd::List) => {
            let status = client.status().await?;
            output::members(&status, cli.json)
        }
        Cmd::Routing(RoutingCmd::Get { service, buckets }) => {
            let table = admin
                .get_routing(pb::GetRoutingRequest {
                    service,
                    consistency: pb::ReadConsistency::Linearizable as i32,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::routing(&table, cli.json, buckets)
        }
        Cmd::Routing(RoutingCmd::Set {
            service,
            weights,
            all,
            file,
            reason,
            expected_version,
        }) => {
            let runs = runs_from_args(&service, &weights, all, file)?;
            let reply = admin
                .set_routing(pb::SetRoutingRequest {
                    service,
                    runs: convert::runs_to_pb(&runs),
                    expected_version: expected_version.unwrap_or(0),
                    actor,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::routing_set(&reply, cli.json)
        }
        Cmd::Audit { limit } => {
            let reply = admin
                .list_audit(pb::ListAuditRequest {
                    limit,
                    before_seq: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::audit(&reply.entries, cli.json)
        }
        Cmd::Members(MembersCmd::Add {
            id,
            addr,
            site,
            reason,
        }) => {
            let reply = admin
                .add_member(pb::AddMemberRequest {
                    id,
                    addr,
                    site,
                    actor,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::membership(&reply, cli.json)
        }
        Cmd::Members(MembersCmd::Remove { id, reason }) => {
            let reply = admin
                .remove_member(pb::RemoveMemberRequest { id, actor, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            output::membership(&reply, cli.json)
        }
        Cmd::Apply { file, reason } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let topology =
                Topology::from_toml(&text).with_context(|| format!("in {}", file.display()))?;
            let reason = reason.unwrap_or_else(|| format!("apply {}", file.display()));
            let reply = admin
                .apply_topology(pb::ApplyTopologyRequest {
                    topology: Some(convert::topology_to_pb(&topology)),
                    actor,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::applied(&reply, cli.json)
        }
        Cmd::Policy => {
            let view = admin
                .get_policy_view(pb::GetPolicyViewRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            output::policy(&view, cli.json)
        }
        Cmd::Pause { reason } => set_policy_mode(&mut admin, true, actor, reason, cli.json).await,
        Cmd::Resume { reason } => set_policy_mode(&mut admin, false, actor, reason, cli.json).await,
        Cmd::Throttle {
            service,
            site,
            max_rps,
            lift,
            reason,
        } => {
            let reply = admin
                .set_throttle(pb::SetThrottleRequest {
                    service,
                    site,
                    max_rps: if lift { 0 } else { max_rps.unwrap_or(0) },
                    actor,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::routing_set(&reply, cli.json)
        }
        Cmd::Approve { id, operator, yes } => {
            let credential = operator.token()?;
            let listed = admin
                .list_proposals(pb::ListProposalsRequest {
                    pending_only: false,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let proposal = listed
                .proposals
                .iter()
                .find(|p| p.id == id)
                .cloned()
                .with_context(|| format!("no proposal #{id}"))?;
            output::proposals(
                &pb::ListProposalsResponse {
                    proposals: vec![proposal.clone()],
                    term: listed.term,
                },
                false,
            )?;
            if !yes {
                eprintln!(
                    "type \"approve\" to approve proposal #{id} as {}:",
                    operator.operator
                );
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                if line.trim() != "approve" {
                    bail!("not approved");
                }
            }
            let reply = admin
                .approve_proposal(pb::ApproveProposalRequest {
                    id,
                    digest: proposal.digest,
                    term: listed.term,
                    approver: operator.operator,
                    credential,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::proposal_decided(&reply, cli.json)
        }
        Cmd::Reject {
            id,
            operator,
            reason,
        } => {
            let credential = operator.token()?;
            let reply = admin
                .reject_proposal(pb::RejectProposalRequest {
                    id,
                    approver: operator.operator,
                    credential,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::proposal_decided(&reply, cli.json)
        }
        Cmd::Wallet(cmd) => wallet::run(cmd, &mut admin, cli.json).await,
        Cmd::Replication {
            service,
            synchronous,
            asynchronous: _,
            reason,
        } => {
            let reply = admin
                .set_replication_mode(pb::SetReplicationModeRequest {
                    service: service.clone(),
                    synchronous,
                    actor,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"service": service, "synchronous": reply.synchronous,
                        "relaxed": reply.relaxed, "changed": reply.changed,
                        "log_index": reply.log_index})
                );
            } else {
                println!(
                    "{service}: {} replication{}{}",
                    if reply.synchronous {
                        "synchronous (zero-loss)"
                    } else {
                        "asynchronous"
                    },
                    if reply.relaxed {
                        ", relaxed by the controller"
                    } else {
                        ""
                    },
                    if reply.changed { "" } else { " (unchanged)" }
                );
            }
            Ok(())
        }
        Cmd::Switchover {
            service,
            to,
            forced,
            operator,
            reason,
        } => {
            let credential = operator.token()?;
            let reply = admin
                .open_switchover(pb::OpenSwitchoverRequest {
                    service,
                    to_site: to,
                    planned: !forced,
                    operator: operator.operator,
                    credential,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let term = client.status().await?.term;
            output::proposals(
                &pb::ListProposalsResponse {
                    proposals: reply.proposal.into_iter().collect(),
                    term,
                },
                cli.json,
            )
        }
        Cmd::Proposals { all } => {
            let reply = admin
                .list_proposals(pb::ListProposalsRequest { pending_only: !all })
                .await
                .map_err(status_error)?
                .into_inner();
            output::proposals(&reply, cli.json)
        }
    }
}

async fn set_policy_mode(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    paused: bool,
    actor: String,
    reason: String,
    json: bool,
) -> Result<()> {
    let reply = admin
        .set_policy_mode(pb::SetPolicyModeRequest {
            paused,
            actor,
            reason,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    output::policy_mode(&reply, json)
}

/// Turns `--weights`, `--all` or `--file` into runs of buckets. The server checks they cover
/// exactly 1024 buckets.
fn runs_from_args(
    service: &str,
    weights: &[String],
    all: Option<String>,
    file: Option<PathBuf>,
) -> Result<Vec<BucketRun>> {
    match (weights.is_empty(), all, file) {
        (false, None, None) => {
            let mut parsed = BTreeMap::new();
            for pair in weights {
                let (site, weight) = pair
                    .split_once('=')
                    .with_context(|| format!("weight {pair:?} is not site=number"))?;
                let weight: u32 = weight
                    .trim()
                    .parse()
                    .with_context(|| format!("weight {pair:?} is not a whole number"))?;
                if parsed.insert(site.trim().to_string(), weight).is_some() {
                    bail!("site {site:?} is given twice in --weights");
                }
            }
            Ok(RoutingTable::runs_from_weights(service, &parsed)?)
        }
        (true, Some(site), None) => Ok(vec![BucketRun::new(site, BUCKETS as u32)]),
        (true, None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let buckets: Vec<String> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a JSON array of site ids (one per bucket)",
                    path.display()
                )
            })?;
            Ok(runs_from_buckets(&buckets))
        }
        _ => bail!("give exactly one of --weights, --all or --file"),
    }
}
