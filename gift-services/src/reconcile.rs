//! Reconciliation: proves from the database that no money was created or lost.
//!
//! Wallet ([`wallet`]):
//! - every account's balance equals its ledger: credits − debits + refunds;
//! - every refund matches a debit of the same order, user and amount.
//!
//! Orders and settlement ([`run`]), each order against the wallet ledger and settlement:
//! - a paid or delivered order has exactly one debit of its amount and one streamer credit,
//!   no refund and no reversal;
//! - a refunded order has its debit and one refund, and its credit (if any) reversed;
//! - a failed order gets its refund (repairable: the refund is safe to issue);
//! - a rejected order moved no money (a late debit is repairable: refund it);
//! - an order left `created` past the grace period is finished (repairable);
//! - no debit or refund in the ledger without its order;
//! - every streamer's income equals its credits − reversals;
//! - money is conserved: top-ups = balances + streamer income + money in transit (debits not
//!   yet credited to a streamer nor refunded), the mutable balances checked against the
//!   append-only records.
//!
//! Orders younger than the grace period are still moving through the saga: they are counted as
//! pending, not as mismatches. The report is plain data (serde): JSON for people and machines,
//! metrics for the near-real-time runner.

use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::{Amount, GiftError, Traffic};

/// Most mismatches listed per check; the count is always exact.
const MAX_LISTED: i64 = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub check: &'static str,
    pub subject: String,
    pub detail: String,
    /// Safe to repair automatically (see [`run`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repairable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalletReport {
    pub accounts: i64,
    pub ledger_entries: i64,
    /// Sum of all balances.
    pub balances: Amount,
    /// Credits − debits + refunds over the whole ledger; equals `balances` when consistent.
    pub ledger_net: Amount,
    pub mismatch_count: i64,
    pub mismatches: Vec<Mismatch>,
}

impl WalletReport {
    pub fn is_clean(&self) -> bool {
        self.mismatch_count == 0 && self.balances == self.ledger_net
    }
}

/// Reads one consistent snapshot (REPEATABLE READ) of the wallet and checks it.
pub async fn wallet(pool: &PgPool, traffic: Traffic) -> Result<WalletReport, GiftError> {
    let w = traffic.wallet_schema();
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let net = "sum(CASE l.kind WHEN 'debit' THEN -l.amount ELSE l.amount END)";
    let totals = sqlx::query(&format!(
        "SELECT (SELECT count(*) FROM {w}.accounts) AS accounts, \
                (SELECT count(*) FROM {w}.ledger) AS entries, \
                (SELECT coalesce(sum(balance), 0)::bigint FROM {w}.accounts) AS balances, \
                (SELECT coalesce({net}, 0)::bigint FROM {w}.ledger l) AS ledger_net"
    ))
    .fetch_one(&mut *tx)
    .await?;

    let mut mismatches = Vec::new();
    let mut mismatch_count = 0;

    let balance_diff = format!(
        "SELECT a.user_id, a.balance, coalesce(x.net, 0)::bigint AS net, count(*) OVER () AS total \
         FROM {w}.accounts a \
         LEFT JOIN (SELECT l.user_id, {net} AS net FROM {w}.ledger l GROUP BY l.user_id) x \
           ON x.user_id = a.user_id \
         WHERE a.balance <> coalesce(x.net, 0) \
         ORDER BY a.user_id LIMIT {MAX_LISTED}"
    );
    for row in sqlx::query(&balance_diff).fetch_all(&mut *tx).await? {
        mismatch_count = row.get::<i64, _>("total");
        let (user, balance, net): (i64, i64, i64) =
            (row.get("user_id"), row.get("balance"), row.get("net"));
        mismatches.push(Mismatch {
            check: "balance_equals_ledger",
            subject: format!("user {user}"),
            detail: format!("balance {balance}, ledger says {net}"),
            repairable: false,
        });
    }

    let orphan_refunds = format!(
        "SELECT r.order_id, r.user_id, r.amount, d.user_id AS d_user, d.amount AS d_amount, \
                count(*) OVER () AS total \
         FROM {w}.ledger r \
         LEFT JOIN {w}.ledger d ON d.order_id = r.order_id AND d.kind = 'debit' \
         WHERE r.kind = 'refund' \
           AND (d.seq IS NULL OR d.user_id <> r.user_id OR d.amount <> r.amount) \
         ORDER BY r.seq LIMIT {MAX_LISTED}"
    );
    let rows = sqlx::query(&orphan_refunds).fetch_all(&mut *tx).await?;
    if let Some(first) = rows.first() {
        mismatch_count += first.get::<i64, _>("total");
    }
    for row in rows {
        let order: String = row.get("order_id");
        let detail = match row.get::<Option<i64>, _>("d_user") {
            None => "refund without a debit".to_string(),
            Some(d_user) => format!(
                "refund of {} to user {} for a debit of {} from user {d_user}",
                row.get::<i64, _>("amount"),
                row.get::<i64, _>("user_id"),
                row.get::<Option<i64>, _>("d_amount").unwrap_or(0),
            ),
        };
        mismatches.push(Mismatch {
            check: "refund_matches_debit",
            subject: format!("order {order}"),
            detail,
            repairable: false,
        });
    }
    tx.commit().await?;
    Ok(WalletReport {
        accounts: totals.get("accounts"),
        ledger_entries: totals.get("entries"),
        balances: totals.get("balances"),
        ledger_net: totals.get("ledger_net"),
        mismatch_count,
        mismatches,
    })
}

/// What a reconciliation run looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scope {
    pub traffic: &'static str,
    /// Only orders updated within this many seconds (near-real-time); `None`: all (batch).
    pub window_secs: Option<u64>,
    /// Orders updated more recently than this are still in the saga: pending, not mismatches.
    pub grace_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conservation {
    /// Sum of all top-ups (credit ledger entries).
    pub top_ups: Amount,
    /// Sum of account balances.
    pub balances: Amount,
    /// Sum of streamer income.
    pub streamer_income: Amount,
    /// Debits − refunds − (streamer credits − reversals): paid, not yet credited nor refunded.
    pub in_transit: Amount,
    /// `top_ups == balances + streamer_income + in_transit`, and `in_transit >= 0`.
    pub conserved: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Repair {
    pub check: &'static str,
    pub order_id: String,
    pub action: &'static str,
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub scope: Scope,
    pub checked_at_unix_ms: u64,
    pub orders_checked: i64,
    /// Orders within the grace period, not judged yet.
    pub orders_pending: i64,
    pub wallet: WalletReport,
    pub conservation: Conservation,
    /// Order, settlement and ledger-link mismatches (the wallet's own are in `wallet`).
    pub mismatch_count: i64,
    pub mismatches: Vec<Mismatch>,
    /// What was repaired in this run (the mismatches above are as found, before repair).
    pub repairs: Vec<Repair>,
}

impl Report {
    /// Nothing wrong (repaired mismatches count as wrong: they were found).
    pub fn is_clean(&self) -> bool {
        self.mismatch_count == 0 && self.wallet.is_clean() && self.conservation.conserved
    }

    /// Everything found was repaired and nothing else is wrong.
    pub fn is_clean_after_repair(&self) -> bool {
        self.wallet.is_clean()
            && self.conservation.conserved
            && self.mismatches.iter().all(|m| {
                m.repairable
                    && self
                        .repairs
                        .iter()
                        .any(|r| r.order_id == m.subject_order() && r.result == "done")
            })
            && self.mismatch_count == i64::try_from(self.mismatches.len()).unwrap_or(i64::MAX)
    }

    /// Mismatches per check, for metrics.
    pub fn counts_by_check(&self) -> std::collections::BTreeMap<&'static str, i64> {
        let mut counts = std::collections::BTreeMap::new();
        for m in self.mismatches.iter().chain(&self.wallet.mismatches) {
            *counts.entry(m.check).or_insert(0) += 1;
        }
        counts
    }
}

impl Mismatch {
    fn subject_order(&self) -> &str {
        self.subject.strip_prefix("order ").unwrap_or(&self.subject)
    }
}

/// Per-order verdict, computed in SQL so that only mismatching orders leave the database.
const ORDER_CHECK: &str = "
  CASE
    WHEN o.status IN ('paid', 'delivered') AND d.seq IS NULL THEN 'paid_without_debit'
    WHEN d.seq IS NOT NULL AND (d.amount <> o.amount OR d.user_id <> o.user_id) THEN 'debit_differs_from_order'
    WHEN o.status IN ('paid', 'delivered') AND r.seq IS NOT NULL THEN 'refund_on_paid_order'
    WHEN o.status IN ('paid', 'delivered') AND c.order_id IS NULL AND NOT young THEN 'paid_without_settlement_credit'
    WHEN c.order_id IS NOT NULL AND (c.amount <> o.amount OR c.streamer_id <> o.streamer_id) THEN 'credit_differs_from_order'
    WHEN o.status IN ('paid', 'delivered') AND v.order_id IS NOT NULL THEN 'reversal_on_paid_order'
    WHEN o.status = 'refunded' AND (d.seq IS NULL OR r.seq IS NULL) THEN 'refunded_without_debit_and_refund'
    WHEN o.status = 'refunded' AND c.order_id IS NOT NULL AND v.order_id IS NULL THEN 'refunded_credit_not_reversed'
    WHEN o.status = 'failed' AND d.seq IS NULL THEN 'failed_without_debit'
    WHEN o.status = 'failed' AND r.seq IS NULL AND NOT young THEN 'failed_without_refund'
    WHEN o.status IN ('rejected', 'created') AND c.order_id IS NOT NULL THEN 'unpaid_order_credited'
    WHEN o.status = 'rejected' AND d.seq IS NOT NULL AND r.seq IS NULL AND NOT young THEN 'rejected_with_debit'
    WHEN o.status = 'created' AND NOT young THEN 'stuck_created'
  END";

/// Mismatches that are safe to repair, and how.
fn repair_action(check: &str) -> Option<&'static str> {
    match check {
        "failed_without_refund" | "rejected_with_debit" => Some("refund"),
        "stuck_created" => Some("finish"),
        "paid_without_settlement_credit" => Some("settle"),
        _ => None,
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks orders, settlement, the wallet and conservation; with `repair`, repairs the safe
/// mismatches through the saga (each repair is idempotent) and records what it did.
pub async fn run(
    pool: &PgPool,
    traffic: Traffic,
    window_secs: Option<u64>,
    grace_secs: u64,
    repair: Option<&crate::saga::Saga>,
) -> Result<Report, GiftError> {
    let wallet_report = wallet(pool, traffic).await?;
    let (o, w, s) = (
        traffic.orders_schema(),
        traffic.wallet_schema(),
        traffic.settlement_schema(),
    );
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let window = window_secs.map_or_else(
        || "true".to_string(),
        |secs| format!("o.updated_at >= now() - make_interval(secs => {secs})"),
    );
    let joined = format!(
        "FROM (SELECT o.*, o.updated_at >= now() - make_interval(secs => {grace_secs}) AS young \
               FROM {o}.gift_orders o) o \
         LEFT JOIN {w}.ledger d ON d.order_id = o.order_id AND d.kind = 'debit' \
         LEFT JOIN {w}.ledger r ON r.order_id = o.order_id AND r.kind = 'refund' \
         LEFT JOIN {s}.credits c ON c.order_id = o.order_id \
         LEFT JOIN {s}.reversals v ON v.order_id = o.order_id \
         WHERE {window}"
    );
    let counts = sqlx::query(&format!(
        "SELECT count(*) AS checked, count(*) FILTER (WHERE young AND status IN ('created', 'paid', 'failed')) AS pending {joined}"
    ))
    .fetch_one(&mut *tx)
    .await?;
    let rows = sqlx::query(&format!(
        "SELECT * FROM (SELECT o.order_id, o.status, o.amount, {ORDER_CHECK} AS verdict, \
                d.amount AS debit, r.amount AS refund, c.amount AS credit, v.amount AS reversal \
                {joined}) x WHERE verdict IS NOT NULL ORDER BY order_id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut mismatches = Vec::new();
    let mut found = Vec::new();
    let mut mismatch_count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    for row in &rows {
        let verdict: String = row.get("verdict");
        let check = ORDER_CHECKS
            .iter()
            .copied()
            .find(|c| *c == verdict)
            .unwrap_or("order_check");
        let order_id: String = row.get("order_id");
        let detail = format!(
            "status {}, amount {}, debit {:?}, refund {:?}, credit {:?}, reversal {:?}",
            row.get::<String, _>("status"),
            row.get::<i64, _>("amount"),
            row.get::<Option<i64>, _>("debit"),
            row.get::<Option<i64>, _>("refund"),
            row.get::<Option<i64>, _>("credit"),
            row.get::<Option<i64>, _>("reversal"),
        );
        found.push((check, order_id.clone()));
        if i64::try_from(mismatches.len()).unwrap_or(i64::MAX) < MAX_LISTED * 10 {
            mismatches.push(Mismatch {
                check,
                subject: format!("order {order_id}"),
                detail,
                repairable: repair_action(check).is_some(),
            });
        }
    }

    let ledger_window = window_secs.map_or_else(
        || "true".to_string(),
        |secs| format!("l.created_at >= now() - make_interval(secs => {secs})"),
    );
    let orphans = sqlx::query(&format!(
        "SELECT l.seq, l.kind, l.order_id, count(*) OVER () AS total FROM {w}.ledger l \
         WHERE l.kind IN ('debit', 'refund') AND {ledger_window} \
           AND NOT EXISTS (SELECT 1 FROM {o}.gift_orders g WHERE g.order_id = l.order_id) \
         ORDER BY l.seq LIMIT {MAX_LISTED}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    if let Some(first) = orphans.first() {
        mismatch_count += first.get::<i64, _>("total");
    }
    for row in &orphans {
        mismatches.push(Mismatch {
            check: "ledger_entry_without_order",
            subject: format!("ledger seq {}", row.get::<i64, _>("seq")),
            detail: format!(
                "{} for unknown order {:?}",
                row.get::<String, _>("kind"),
                row.get::<Option<String>, _>("order_id")
            ),
            repairable: false,
        });
    }

    let income = sqlx::query(&format!(
        "SELECT i.streamer_id, i.balance, \
                (coalesce((SELECT sum(amount) FROM {s}.credits c WHERE c.streamer_id = i.streamer_id), 0) \
               - coalesce((SELECT sum(amount) FROM {s}.reversals v WHERE v.streamer_id = i.streamer_id), 0))::bigint AS expected, \
                count(*) OVER () AS total \
         FROM {s}.income i \
         WHERE i.balance <> coalesce((SELECT sum(amount) FROM {s}.credits c WHERE c.streamer_id = i.streamer_id), 0) \
                          - coalesce((SELECT sum(amount) FROM {s}.reversals v WHERE v.streamer_id = i.streamer_id), 0) \
         ORDER BY i.streamer_id LIMIT {MAX_LISTED}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    if let Some(first) = income.first() {
        mismatch_count += first.get::<i64, _>("total");
    }
    for row in &income {
        mismatches.push(Mismatch {
            check: "income_equals_credits",
            subject: format!("streamer {}", row.get::<i64, _>("streamer_id")),
            detail: format!(
                "income {}, credits − reversals {}",
                row.get::<i64, _>("balance"),
                row.get::<i64, _>("expected")
            ),
            repairable: false,
        });
    }

    let totals = sqlx::query(&format!(
        "SELECT \
           (SELECT coalesce(sum(amount), 0) FROM {w}.ledger WHERE kind = 'credit')::bigint AS top_ups, \
           (SELECT coalesce(sum(amount), 0) FROM {w}.ledger WHERE kind = 'debit')::bigint AS debits, \
           (SELECT coalesce(sum(amount), 0) FROM {w}.ledger WHERE kind = 'refund')::bigint AS refunds, \
           (SELECT coalesce(sum(balance), 0) FROM {w}.accounts)::bigint AS balances, \
           (SELECT coalesce(sum(balance), 0) FROM {s}.income)::bigint AS income, \
           (SELECT coalesce(sum(amount), 0) FROM {s}.credits)::bigint AS credits, \
           (SELECT coalesce(sum(amount), 0) FROM {s}.reversals)::bigint AS reversals"
    ))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let get = |name: &str| totals.get::<i64, _>(name);
    let in_transit = get("debits") - get("refunds") - (get("credits") - get("reversals"));
    let conservation = Conservation {
        top_ups: get("top_ups"),
        balances: get("balances"),
        streamer_income: get("income"),
        in_transit,
        conserved: in_transit >= 0
            && get("top_ups") == get("balances") + get("income") + in_transit,
    };

    let mut repairs = Vec::new();
    if let Some(saga) = repair {
        for (check, order_id) in &found {
            let Some(action) = repair_action(check) else {
                continue;
            };
            let result = repair_order(saga, action, order_id).await;
            repairs.push(Repair {
                check,
                order_id: order_id.clone(),
                action,
                result,
            });
        }
    }
    Ok(Report {
        scope: Scope {
            traffic: match traffic {
                Traffic::Real => "real",
                Traffic::Shadow => "shadow",
            },
            window_secs,
            grace_secs,
        },
        checked_at_unix_ms: now_unix_ms(),
        orders_checked: counts.get("checked"),
        orders_pending: counts.get("pending"),
        wallet: wallet_report,
        conservation,
        mismatch_count,
        mismatches,
        repairs,
    })
}

/// Every check name [`ORDER_CHECK`] can produce (static names for the report and metrics).
const ORDER_CHECKS: &[&str] = &[
    "paid_without_debit",
    "debit_differs_from_order",
    "refund_on_paid_order",
    "paid_without_settlement_credit",
    "credit_differs_from_order",
    "reversal_on_paid_order",
    "refunded_without_debit_and_refund",
    "refunded_credit_not_reversed",
    "failed_without_debit",
    "failed_without_refund",
    "unpaid_order_credited",
    "rejected_with_debit",
    "stuck_created",
];

async fn repair_order(saga: &crate::saga::Saga, action: &str, order_id: &str) -> String {
    let order = match saga.orders.get(order_id).await {
        Ok(Some(order)) => order,
        Ok(None) => return "order vanished".into(),
        Err(e) => return format!("error: {e}"),
    };
    let result = match action {
        "refund" => saga.refund(&order).await.map(|step| match step {
            crate::saga::Step::Finished => "done".to_string(),
            crate::saga::Step::Retry(why) => format!("not yet: {why}"),
        }),
        "finish" => saga
            .finish_abandoned(&order)
            .await
            .map(|()| "done".to_string()),
        "settle" => saga
            .settlement
            .credit(&order)
            .await
            .map(|_| "done".to_string()),
        other => Ok(format!("no repair for {other}")),
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}
