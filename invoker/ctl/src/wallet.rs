//! `invokerctl wallet ...`: after a failover, what the old primary had that the new one lost,
//! and the compensations for it. These talk SQL to both databases (the DSNs come from the
//! executed proposal's plan), with gift-services' own queries.

use anyhow::{bail, Context, Result};
use gift_services::lost::{self, CompensationAction};
use gift_services::Traffic;
use invoker_api::pb;

/// How far below the promotion's ledger sequence the report starts: commits can land out of
/// sequence order (a lower seq committing after a higher one that the replica already had),
/// by at most the writes in flight. Generous; scanning is cheap.
pub const SEQ_WINDOW: u64 = 10_000;

#[derive(clap::Subcommand)]
pub enum WalletCmd {
    /// Ledger entries (and orders) the old primary committed that the new primary does not
    /// have: acknowledged, then lost by the failover. Needs the old primary running again
    /// (it is fenced: reading is all it does).
    LostReport {
        /// The executed failover (default: the latest one of the wallet).
        #[arg(long)]
        proposal: Option<u64>,
        /// Start after this ledger sequence on the old primary (default: the promotion's,
        /// minus a window for out-of-order commits).
        #[arg(long)]
        from_seq: Option<i64>,
        /// Report the shadow schemas instead of real traffic.
        #[arg(long)]
        shadow: bool,
    },
    /// Compensate one lost entry on the new primary, idempotently: `reapply` it (same key)
    /// or `refund` it (the customer keeps the money; the order is closed). Audited.
    Compensate {
        /// The lost entry's idempotency key (from lost-report).
        idempotency_key: String,
        #[arg(long, value_parser = ["reapply", "refund"])]
        action: String,
        #[arg(long)]
        proposal: Option<u64>,
        #[arg(long)]
        shadow: bool,
        #[command(flatten)]
        operator: crate::OperatorArgs,
        #[arg(long)]
        reason: String,
    },
}

/// The executed failover to report on: `id`, or the wallet's latest executed one.
async fn executed_failover(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    id: Option<u64>,
) -> Result<(pb::Proposal, pb::FailoverPlan, pb::FailoverExecution)> {
    let listed = admin
        .list_proposals(pb::ListProposalsRequest {
            pending_only: false,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let executed = |p: &&pb::Proposal| {
        p.service == "wallet" && p.status == pb::ProposalStatus::Executed as i32
    };
    let proposal = match id {
        Some(id) => listed
            .proposals
            .iter()
            .find(|p| p.id == id)
            .with_context(|| format!("no proposal #{id}"))?,
        None => listed
            .proposals
            .iter()
            .filter(executed)
            .max_by_key(|p| p.id)
            .context("no executed wallet failover: nothing can have been lost")?,
    };
    if !executed(&proposal) {
        bail!(
            "proposal #{} is not an executed wallet failover",
            proposal.id
        );
    }
    let plan = proposal.plan.clone().context("the proposal has no plan")?;
    let execution = proposal
        .execution
        .clone()
        .context("the proposal has no execution record")?;
    Ok((proposal.clone(), plan, execution))
}

fn connect(url: &str) -> Result<sqlx::PgPool> {
    gift_services::pool(url, 2, 30_000, 5_000).with_context(|| format!("connecting to {url}"))
}

fn traffic(shadow: bool) -> Traffic {
    if shadow {
        Traffic::Shadow
    } else {
        Traffic::Real
    }
}

pub async fn run(
    cmd: WalletCmd,
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    as_json: bool,
) -> Result<()> {
    match cmd {
        WalletCmd::LostReport {
            proposal,
            from_seq,
            shadow,
        } => {
            let (p, plan, execution) = executed_failover(admin, proposal).await?;
            let promoted_seq = execution.promote.as_ref().map_or(0, |s| s.ledger_sequence);
            let from_seq = from_seq.unwrap_or_else(|| {
                i64::try_from(promoted_seq.saturating_sub(SEQ_WINDOW)).unwrap_or(0)
            });
            let old = connect(&plan.from_dsn)?;
            let new = connect(&plan.to_dsn)?;
            let report = lost::lost_report(&old, &new, traffic(shadow), from_seq)
                .await
                .with_context(|| {
                    format!(
                        "comparing the old primary ({}) with the new one ({})",
                        plan.from_site, plan.to_site
                    )
                })?;
            if as_json {
                let mut value = serde_json::to_value(&report)?;
                if let Some(map) = value.as_object_mut() {
                    map.insert("proposal".into(), p.id.into());
                    map.insert("from_site".into(), plan.from_site.clone().into());
                    map.insert("to_site".into(), plan.to_site.clone().into());
                    map.insert("promoted_ledger_sequence".into(), promoted_seq.into());
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "failover #{}: {} (epoch {}) -> {} (epoch {}), promoted at ledger seq {}",
                    p.id,
                    plan.from_site,
                    plan.from_epoch,
                    plan.to_site,
                    plan.new_epoch,
                    promoted_seq
                );
                print!("{}", lost::render_report(&report));
            }
            Ok(())
        }
        WalletCmd::Compensate {
            idempotency_key,
            action,
            proposal,
            shadow,
            operator,
            reason,
        } => {
            let action = CompensationAction::parse(&action)?;
            let credential = operator.token()?;
            let (p, plan, _) = executed_failover(admin, proposal).await?;
            // Authenticated and audited before any money moves.
            admin
                .audit_operator_action(pb::AuditOperatorActionRequest {
                    operator: operator.operator.clone(),
                    credential,
                    action: "wallet.compensate".into(),
                    detail: format!("{} {idempotency_key} (failover #{})", action.as_str(), p.id),
                    reason,
                })
                .await
                .map_err(crate::status_error)?;
            let old = connect(&plan.from_dsn)?;
            let new = connect(&plan.to_dsn)?;
            let outcome = lost::compensate(
                &old,
                &new,
                traffic(shadow),
                &idempotency_key,
                action,
                &operator.operator,
                plan.new_epoch,
            )
            .await?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                println!("{outcome:#?}");
            }
            Ok(())
        }
    }
}
