//! Reconciliation: proves from the database that no money was created or lost.
//!
//! This version checks the wallet on its own (the order and settlement checks join it as
//! those services land):
//! - every account's balance equals its ledger: credits − debits + refunds;
//! - every refund matches a debit of the same order, user and amount.
//!
//! The report is plain data (serde) so that it can be printed as JSON and exported as metrics.

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
