//! Transactions a wallet failover lost, and what an operator does about them.
//!
//! When the old primary comes back after a failover, it may hold ledger entries it had
//! acknowledged (the customer saw "paid", "topped up") that never reached the replica that
//! was promoted. [`lost_report`] lists them: every ledger entry on the OLD primary past a
//! sequence whose idempotency key is absent on the NEW primary, the orders that went with
//! them, and totals per kind and per user. [`compensate`] settles one entry, idempotently
//! (a row in `<wallet>.compensations` keyed by the entry's idempotency key):
//!
//! - `reapply` a lost credit: re-credited on the new primary under the same key;
//! - `reapply` a lost debit: the order is copied to the new primary if missing (same order id
//!   and client key, status `created`), debited under the same ledger key and marked paid
//!   with its outbox events, exactly as the saga does, so the normal worker delivers it;
//! - `refund` a lost debit: the customer keeps the money (the debit is not on the new
//!   primary); recorded, and the order, if `created` on the new primary, is marked
//!   `rejected` ("lost in failover, refunded");
//! - `refund` a lost credit: not re-credited; the top-up is to be paid back outside the
//!   wallet (recorded);
//! - `reapply` a lost refund: the refund is applied on the new primary (if the order's debit
//!   is there; if it is lost too, the customer is even and nothing is applied).
//!
//! Every write on the new primary checks the fencing epoch (and the writer lease) first, in
//! its transaction, like the ledger does; the compensation record commits with the change it
//! describes, or not at all.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::orders::{EVENT_ACTIVITY, EVENT_GIFT_PAID};
use crate::wallet::{writer_refusal, LEASE_EXPIRED_SQL, MAX_KEY_LEN};
use crate::{Amount, GiftError, Traffic};

/// Ledger entries read (and keys looked up on the new primary) per round trip.
const BATCH: i64 = 5_000;

/// Orders created this long before the earliest lost entry are still checked (an order is
/// created a moment before its debit).
pub const ORDER_WINDOW_MARGIN_SECS: i64 = 60;

/// The reason stored on an order whose lost debit was refunded.
pub const REFUNDED_REASON: &str = "lost in failover, refunded";

const AT_SQL: &str = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

/// A ledger entry acknowledged on the old primary and absent from the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostEntry {
    pub seq: i64,
    /// credit, debit or refund.
    pub kind: String,
    pub user_id: i64,
    pub amount: Amount,
    pub order_id: Option<String>,
    /// The ledger's key (`credit:<client key>`, `debit:<order>`, `refund:<order>`): what
    /// [`compensate`] takes.
    pub idempotency_key: String,
    pub epoch: i64,
    /// UTC, RFC 3339 with milliseconds.
    pub created_at: String,
    pub created_at_ms: i64,
    /// The action of its compensation recorded on the new primary (`reapply` never shows
    /// here: a reapplied entry is on the new primary, so it is not lost any more).
    pub compensated: Option<String>,
}

/// An order on the old primary absent from the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostOrder {
    pub order_id: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    pub user_id: i64,
    pub streamer_id: i64,
    pub gift_id: String,
    pub count: i32,
    pub amount: Amount,
    /// Its status on the old primary.
    pub status: String,
    pub created_at: String,
    pub created_at_ms: i64,
    /// Its debit is among the lost entries.
    pub lost_debit: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindTotal {
    pub count: u64,
    pub amount: Amount,
}

/// What one user's lost entries add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserTotal {
    pub user_id: i64,
    pub entries: u64,
    pub credits: Amount,
    pub debits: Amount,
    pub refunds: Amount,
    /// What the user's balance on the new primary lacks compared with the old one:
    /// credits + refunds - debits (negative: the new primary holds more).
    pub balance_delta: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostReport {
    /// real or shadow.
    pub traffic: &'static str,
    pub from_seq: i64,
    /// Ledger entries on the old primary past `from_seq` (lost or not).
    pub scanned: u64,
    pub entries: Vec<LostEntry>,
    pub orders: Vec<LostOrder>,
    /// Orders created since this instant (UTC ms) were checked.
    pub orders_checked_since_ms: Option<i64>,
    pub by_kind: BTreeMap<String, KindTotal>,
    /// Ordered by user id.
    pub by_user: Vec<UserTotal>,
}

fn lost_entry(r: &PgRow) -> LostEntry {
    LostEntry {
        seq: r.get("seq"),
        kind: r.get("kind"),
        user_id: r.get("user_id"),
        amount: r.get("amount"),
        order_id: r.get("order_id"),
        idempotency_key: r.get("idempotency_key"),
        epoch: r.get("epoch"),
        created_at: r.get("at"),
        created_at_ms: r.get("at_ms"),
        compensated: None,
    }
}

/// The idempotency keys among `keys` that exist in `table` (`column`) of `pool`.
async fn present(
    pool: &PgPool,
    table: &str,
    column: &str,
    keys: &[String],
) -> Result<HashSet<String>, GiftError> {
    let mut found = HashSet::new();
    for chunk in keys.chunks(usize::try_from(BATCH).unwrap_or(5_000)) {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT {column} FROM {table} WHERE {column} = ANY($1)"
        ))
        .bind(chunk)
        .fetch_all(pool)
        .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Every ledger entry on `old` with `seq > from_seq` whose idempotency key is absent on
/// `new`, the orders on `old` absent on `new` (created since shortly before the earliest lost
/// entry, or whose debit is lost), and totals. Reads only; batched (5,000 entries and one
/// `= ANY($1)` lookup per round trip).
pub async fn lost_report(
    old: &PgPool,
    new: &PgPool,
    traffic: Traffic,
    from_seq: i64,
) -> Result<LostReport, GiftError> {
    let w = traffic.wallet_schema();
    let o = traffic.orders_schema();
    let mut entries = Vec::new();
    let mut scanned = 0u64;
    let mut after = from_seq;
    loop {
        let rows = sqlx::query(&format!(
            "SELECT seq, kind, user_id, amount, order_id, idempotency_key, epoch, {AT_SQL} AS at, \
                    (extract(epoch FROM created_at) * 1000)::bigint AS at_ms \
             FROM {w}.ledger WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(BATCH)
        .fetch_all(old)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.get("seq");
        scanned += rows.len() as u64;
        let batch: Vec<LostEntry> = rows.iter().map(lost_entry).collect();
        let keys: Vec<String> = batch.iter().map(|e| e.idempotency_key.clone()).collect();
        let on_new = present(new, &format!("{w}.ledger"), "idempotency_key", &keys).await?;
        let mut lost: Vec<LostEntry> = batch
            .into_iter()
            .filter(|e| !on_new.contains(&e.idempotency_key))
            .collect();
        if !lost.is_empty() {
            let keys: Vec<&str> = lost.iter().map(|e| e.idempotency_key.as_str()).collect();
            let done: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(&format!(
                "SELECT idempotency_key, action FROM {w}.compensations WHERE idempotency_key = ANY($1)"
            ))
            .bind(&keys)
            .fetch_all(new)
            .await?
            .into_iter()
            .collect();
            for e in &mut lost {
                e.compensated = done.get(&e.idempotency_key).cloned();
            }
        }
        entries.extend(lost);
        if rows.len() < usize::try_from(BATCH).unwrap_or(usize::MAX) {
            break;
        }
    }

    // Orders: those created since shortly before the earliest lost entry (with nothing lost
    // in the ledger: since the new primary's last entry, about the promotion point), and
    // those whose debit is lost.
    let since_ms = match entries.iter().map(|e| e.created_at_ms).min() {
        Some(ms) => Some(ms),
        None => {
            sqlx::query_scalar::<_, Option<i64>>(&format!(
                "SELECT (extract(epoch FROM max(created_at)) * 1000)::bigint FROM {w}.ledger"
            ))
            .fetch_one(new)
            .await?
        }
    }
    .map(|ms| ms - ORDER_WINDOW_MARGIN_SECS * 1000);
    let lost_debits: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == "debit")
        .filter_map(|e| e.order_id.clone())
        .collect();
    let rows = sqlx::query(&format!(
        "SELECT order_id, idempotency_key, user_id, streamer_id, gift_id, count, amount, status, \
                {AT_SQL} AS at, (extract(epoch FROM created_at) * 1000)::bigint AS at_ms \
         FROM {o}.gift_orders \
         WHERE created_at >= to_timestamp(coalesce($1, 0)::double precision / 1000) \
            OR order_id = ANY($2) \
         ORDER BY created_at, order_id"
    ))
    .bind(since_ms)
    .bind(&lost_debits)
    .fetch_all(old)
    .await?;
    let ids: Vec<String> = rows.iter().map(|r| r.get("order_id")).collect();
    let on_new = present(new, &format!("{o}.gift_orders"), "order_id", &ids).await?;
    let lost_debit_set: HashSet<&str> = lost_debits.iter().map(String::as_str).collect();
    let orders = rows
        .iter()
        .filter(|r| !on_new.contains(r.get::<&str, _>("order_id")))
        .map(|r| {
            let order_id: String = r.get("order_id");
            LostOrder {
                lost_debit: lost_debit_set.contains(order_id.as_str()),
                order_id,
                idempotency_key: r.get("idempotency_key"),
                user_id: r.get("user_id"),
                streamer_id: r.get("streamer_id"),
                gift_id: r.get("gift_id"),
                count: r.get("count"),
                amount: r.get("amount"),
                status: r.get("status"),
                created_at: r.get("at"),
                created_at_ms: r.get("at_ms"),
            }
        })
        .collect();

    let mut by_kind: BTreeMap<String, KindTotal> = BTreeMap::new();
    let mut users: BTreeMap<i64, UserTotal> = BTreeMap::new();
    for e in &entries {
        let k = by_kind.entry(e.kind.clone()).or_default();
        k.count += 1;
        k.amount += e.amount;
        let u = users.entry(e.user_id).or_insert_with(|| UserTotal {
            user_id: e.user_id,
            ..UserTotal::default()
        });
        u.entries += 1;
        match e.kind.as_str() {
            "credit" => u.credits += e.amount,
            "debit" => u.debits += e.amount,
            _ => u.refunds += e.amount,
        }
        u.balance_delta = u.credits + u.refunds - u.debits;
    }
    Ok(LostReport {
        traffic: match traffic {
            Traffic::Real => "real",
            Traffic::Shadow => "shadow",
        },
        from_seq,
        scanned,
        entries,
        orders,
        orders_checked_since_ms: since_ms,
        by_kind,
        by_user: users.into_values().collect(),
    })
}

/// Cuts `s` to `width` characters (an ellipsis marks the cut).
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// `2026-11-24T10:11:12.345Z` → `11-24 10:11:12`.
fn short_time(rfc3339: &str) -> String {
    rfc3339.get(5..19).unwrap_or(rfc3339).replace('T', " ")
}

/// `2026-11-24T10:11:12.345Z` → `10:11:12`.
fn time_of_day(rfc3339: &str) -> &str {
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

/// The report for people, within 80 columns. Idempotency keys longer than their column go on
/// a line of their own (they are what `compensate` takes).
pub fn render_report(report: &LostReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Lost by the failover ({} traffic): {} ledger entries of {} past seq {}",
        report.traffic,
        report.entries.len(),
        report.scanned,
        report.from_seq
    );
    if let (Some(first), Some(last)) = (report.entries.first(), report.entries.last()) {
        let _ = writeln!(
            out,
            "from {} to {} (UTC)",
            first.created_at, last.created_at
        );
    }
    if report.entries.is_empty() && report.orders.is_empty() {
        out.push_str("Nothing lost: every entry on the old primary is on the new one.\n");
        return out;
    }
    if !report.entries.is_empty() {
        let _ = writeln!(
            out,
            "\n{:>7} {:<6} {:>9} {:>10}  {:<8}  KEY",
            "SEQ", "KIND", "USER", "AMOUNT", "AT (UTC)"
        );
        // 7+1+6+1+9+1+10+2+8+2 = 47 columns before the key: 33 for it, enough for
        // `refund:<order id>` (32). A key that does not fit goes on a line of its own.
        for e in &report.entries {
            let key = &e.idempotency_key;
            let row = format!(
                "{:>7} {:<6} {:>9} {:>10}  {:<8}  ",
                e.seq,
                e.kind,
                e.user_id,
                e.amount,
                time_of_day(&e.created_at),
            );
            if row.chars().count() + key.chars().count() <= 80 {
                let _ = writeln!(out, "{row}{key}");
            } else {
                let _ = writeln!(out, "{}", row.trim_end());
                let _ = writeln!(out, "          key: {}", fit(key, 80 - 15));
            }
            if let Some(action) = &e.compensated {
                let _ = writeln!(out, "          compensated: {action}");
            }
        }
        out.push_str("\nBy kind:\n");
        for (kind, t) in &report.by_kind {
            let _ = writeln!(out, "  {kind:<8} {:>8} entries {:>16}", t.count, t.amount);
        }
        let _ = writeln!(
            out,
            "\nBy user (balance delta: what the new primary lacks):\n{:>12} {:>7} {:>13} {:>13} {:>13} {:>14}",
            "USER", "ENTRIES", "CREDITS", "DEBITS", "REFUNDS", "DELTA"
        );
        for u in &report.by_user {
            let _ = writeln!(
                out,
                "{:>12} {:>7} {:>13} {:>13} {:>13} {:>14}",
                u.user_id, u.entries, u.credits, u.debits, u.refunds, u.balance_delta
            );
        }
    }
    if !report.orders.is_empty() {
        let _ = writeln!(
            out,
            "\nOrders on the old primary missing on the new one: {}\n{:<25} {:>10} {:>12} {:<9} {:<5} AT (UTC)",
            report.orders.len(),
            "ORDER",
            "USER",
            "AMOUNT",
            "STATUS",
            "DEBIT",
        );
        for o in &report.orders {
            let _ = writeln!(
                out,
                "{:<25} {:>10} {:>12} {:<9} {:<5} {}",
                fit(&o.order_id, 25),
                o.user_id,
                o.amount,
                fit(&o.status, 9),
                if o.lost_debit { "lost" } else { "-" },
                short_time(&o.created_at)
            );
        }
    }
    out
}

/// What to do about one lost entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationAction {
    /// Apply the entry on the new primary under the same key.
    Reapply,
    /// Do not apply it; the customer is made whole the other way (keeps the money of a lost
    /// debit; is paid back a lost top-up outside the wallet).
    Refund,
}

impl CompensationAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CompensationAction::Reapply => "reapply",
            CompensationAction::Refund => "refund",
        }
    }

    pub fn parse(s: &str) -> Result<CompensationAction, GiftError> {
        match s {
            "reapply" => Ok(CompensationAction::Reapply),
            "refund" => Ok(CompensationAction::Refund),
            other => Err(GiftError::InvalidInput(format!(
                "compensation action must be reapply or refund, got {other:?}"
            ))),
        }
    }
}

/// A compensation as recorded on the new primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompensationRecord {
    /// The lost ledger entry's idempotency key.
    pub idempotency_key: String,
    pub action: String,
    /// The lost entry's kind.
    pub kind: String,
    pub order_id: Option<String>,
    pub user_id: i64,
    pub amount: Amount,
    pub operator: String,
    /// The fencing epoch it was written under.
    pub epoch: i64,
    /// What was done, for people.
    pub note: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompensationOutcome {
    pub record: CompensationRecord,
    /// An earlier call did it; this one changed nothing.
    pub already_done: bool,
}

async fn record(
    new: &PgPool,
    traffic: Traffic,
    key: &str,
) -> Result<Option<CompensationRecord>, GiftError> {
    let w = traffic.wallet_schema();
    let row = sqlx::query(&format!(
        "SELECT idempotency_key, action, kind, order_id, user_id, amount, operator, epoch, note, \
                to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at_text \
         FROM {w}.compensations WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(new)
    .await?;
    Ok(row.map(|r| CompensationRecord {
        idempotency_key: r.get("idempotency_key"),
        action: r.get("action"),
        kind: r.get("kind"),
        order_id: r.get("order_id"),
        user_id: r.get("user_id"),
        amount: r.get("amount"),
        operator: r.get("operator"),
        epoch: r.get("epoch"),
        note: r.get("note"),
        at: r.get("at_text"),
    }))
}

/// The earlier record as this call's answer: the same action is a replay, another is refused.
fn earlier(
    found: CompensationRecord,
    action: CompensationAction,
) -> Result<CompensationOutcome, GiftError> {
    if found.action == action.as_str() {
        Ok(CompensationOutcome {
            record: found,
            already_done: true,
        })
    } else {
        Err(GiftError::Refused(format!(
            "entry {:?} was already compensated with {} by {} at {} ({}); {} is refused",
            found.idempotency_key,
            found.action,
            found.operator,
            found.at,
            found.note,
            action.as_str()
        )))
    }
}

fn refused<T>(m: impl Into<String>) -> Result<T, GiftError> {
    Err(GiftError::Refused(m.into()))
}

/// A database error that says the new primary may not be written becomes a clear refusal.
fn writer_refused(e: GiftError) -> GiftError {
    match &e {
        GiftError::Database(db) => match writer_refusal(db) {
            Some(r) => GiftError::Refused(format!("the new primary refused the write: {r}")),
            None => e,
        },
        _ => e,
    }
}

/// What a compensation transaction came to.
enum Applied {
    Done(String),
    /// Another call recorded (or applied) this key first: its record is the answer.
    LostRace,
}

struct Compensation<'a> {
    traffic: Traffic,
    entry: &'a LostEntry,
    action: CompensationAction,
    operator: &'a str,
    epoch: i64,
}

impl Compensation<'_> {
    /// The fencing check every write on the new primary starts with.
    async fn fence(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), GiftError> {
        let w = self.traffic.wallet_schema();
        let row = sqlx::query(&format!(
            "SELECT epoch, {LEASE_EXPIRED_SQL} AS expired FROM {w}.fencing FOR SHARE"
        ))
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else {
            return refused("the new primary has no fencing row");
        };
        let database: i64 = row.get("epoch");
        if database != self.epoch {
            return refused(format!(
                "stale fencing epoch: you gave {}, the new primary has {database}",
                self.epoch
            ));
        }
        if row.get::<Option<bool>, _>("expired") == Some(true) {
            return refused("the new primary's writer lease has expired");
        }
        Ok(())
    }

    /// Records the compensation; false if another call recorded this key first.
    async fn insert_record(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        note: &str,
    ) -> Result<bool, GiftError> {
        let w = self.traffic.wallet_schema();
        let e = self.entry;
        let row = sqlx::query(&format!(
            "INSERT INTO {w}.compensations \
               (idempotency_key, action, kind, order_id, user_id, amount, operator, epoch, note) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key"
        ))
        .bind(&e.idempotency_key)
        .bind(self.action.as_str())
        .bind(&e.kind)
        .bind(&e.order_id)
        .bind(e.user_id)
        .bind(e.amount)
        .bind(self.operator)
        .bind(self.epoch)
        .bind(note)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// Appends the entry to the new primary's ledger under its own key and moves the balance
    /// by `delta`; false if the key is there already (a concurrent call).
    async fn append(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        delta: Amount,
    ) -> Result<Option<i64>, GiftError> {
        let w = self.traffic.wallet_schema();
        let e = self.entry;
        let seq: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO {w}.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING seq"
        ))
        .bind(e.user_id)
        .bind(&e.kind)
        .bind(e.amount)
        .bind(&e.order_id)
        .bind(&e.idempotency_key)
        .bind(self.epoch)
        .fetch_optional(&mut **tx)
        .await?;
        if seq.is_some() {
            sqlx::query(&format!(
                "UPDATE {w}.accounts SET balance = balance + $2, updated_at = now() WHERE user_id = $1"
            ))
            .bind(e.user_id)
            .bind(delta)
            .execute(&mut **tx)
            .await?;
        }
        Ok(seq)
    }

    async fn lock_account(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<Option<Amount>, GiftError> {
        let w = self.traffic.wallet_schema();
        Ok(sqlx::query_scalar(&format!(
            "SELECT balance FROM {w}.accounts WHERE user_id = $1 FOR UPDATE"
        ))
        .bind(self.entry.user_id)
        .fetch_optional(&mut **tx)
        .await?)
    }

    /// The order's status on the new primary (locked), if it is there.
    async fn order_status(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        order_id: &str,
    ) -> Result<Option<String>, GiftError> {
        let o = self.traffic.orders_schema();
        Ok(sqlx::query_scalar(&format!(
            "SELECT status FROM {o}.gift_orders WHERE order_id = $1 FOR UPDATE"
        ))
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?)
    }

    async fn reapply_credit(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<Applied, GiftError> {
        let w = self.traffic.wallet_schema();
        let e = self.entry;
        sqlx::query(&format!(
            "INSERT INTO {w}.accounts (user_id, balance) VALUES ($1, 0) ON CONFLICT (user_id) DO NOTHING"
        ))
        .bind(e.user_id)
        .execute(&mut **tx)
        .await?;
        self.lock_account(tx).await?;
        let Some(seq) = self.append(tx, e.amount).await? else {
            return Ok(Applied::LostRace);
        };
        Ok(Applied::Done(format!(
            "re-credited {} to user {} on the new primary (seq {seq}, same key)",
            e.amount, e.user_id
        )))
    }

    async fn reapply_debit(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        old_order: Option<&OldOrder>,
    ) -> Result<Applied, GiftError> {
        let e = self.entry;
        let o = self.traffic.orders_schema();
        let mut note = String::new();
        let order_id = e.order_id.as_deref().unwrap_or_default();
        match self.order_status(tx, order_id).await? {
            Some(status) if status == "created" => {}
            Some(status) => {
                return refused(format!(
                    "order {order_id} is {status} on the new primary, not created: reapplying its \
                     debit would not match it; refund instead, or settle the order first"
                ))
            }
            None => match old_order {
                Some(old) => {
                    // The client may have retried on the new primary: its key then names
                    // another order there, and a second debit would charge twice.
                    let other: Option<(String, String)> = sqlx::query_as(&format!(
                        "SELECT order_id, status FROM {o}.gift_orders WHERE idempotency_key = $1"
                    ))
                    .bind(&old.idempotency_key)
                    .fetch_optional(&mut **tx)
                    .await?;
                    if let Some((other, status)) = other {
                        return refused(format!(
                            "the client's idempotency key of order {order_id} names order {other} \
                             ({status}) on the new primary: the client retried after the failover; \
                             reapplying would charge twice; refund instead"
                        ));
                    }
                    sqlx::query(&format!(
                        "INSERT INTO {o}.gift_orders \
                           (order_id, idempotency_key, user_id, streamer_id, room_id, gift_id, count, \
                            amount, status, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'created', \
                                 to_timestamp($9::double precision / 1000))"
                    ))
                    .bind(order_id)
                    .bind(&old.idempotency_key)
                    .bind(old.user_id)
                    .bind(old.streamer_id)
                    .bind(old.room_id)
                    .bind(&old.gift_id)
                    .bind(old.count)
                    .bind(old.amount)
                    .bind(old.created_at_ms)
                    .execute(&mut **tx)
                    .await?;
                    note.push_str("order copied from the old primary; ");
                }
                None => note.push_str("no order on either primary (a bare debit); "),
            },
        }
        let Some(balance) = self.lock_account(tx).await? else {
            return refused(format!(
                "user {} has no account on the new primary: compensate the user's lost credit first",
                e.user_id
            ));
        };
        if balance < e.amount {
            return refused(format!(
                "insufficient funds on the new primary: user {} has {balance}, the debit is {}; \
                 nothing recorded (refund instead, or reapply after a top-up)",
                e.user_id, e.amount
            ));
        }
        let Some(seq) = self.append(tx, -e.amount).await? else {
            return Ok(Applied::LostRace);
        };
        let _ = write!(
            note,
            "debited {} from user {} (seq {seq})",
            e.amount, e.user_id
        );
        if self.order_status(tx, order_id).await?.is_some() {
            // As the saga's mark_paid: paid and its outbox events, together.
            sqlx::query(&format!(
                "WITH paid AS (UPDATE {o}.gift_orders SET status = 'paid', reason = NULL, updated_at = now() \
                               WHERE order_id = $1 AND status = 'created' RETURNING order_id) \
                 INSERT INTO {o}.outbox (order_id, kind, payload) \
                 SELECT order_id, kind, '{{}}'::jsonb FROM paid, unnest($2::text[]) AS kind \
                 ON CONFLICT (order_id, kind) DO NOTHING"
            ))
            .bind(order_id)
            .bind([EVENT_GIFT_PAID, EVENT_ACTIVITY])
            .execute(&mut **tx)
            .await?;
            let _ = write!(
                note,
                "; order {order_id} paid, its outbox events queued for delivery"
            );
        }
        Ok(Applied::Done(note))
    }

    async fn refund_debit(&self, tx: &mut Transaction<'_, Postgres>) -> Result<Applied, GiftError> {
        let e = self.entry;
        let o = self.traffic.orders_schema();
        let order_id = e.order_id.as_deref().unwrap_or_default();
        let mut note = format!(
            "not re-debited: user {} keeps {} (the debit is not on the new primary)",
            e.user_id, e.amount
        );
        match self.order_status(tx, order_id).await? {
            Some(status) if status == "created" => {
                sqlx::query(&format!(
                    "UPDATE {o}.gift_orders SET status = 'rejected', reason = $2, updated_at = now() \
                     WHERE order_id = $1 AND status = 'created'"
                ))
                .bind(order_id)
                .bind(REFUNDED_REASON)
                .execute(&mut **tx)
                .await?;
                let _ = write!(
                    note,
                    "; order {order_id} marked rejected ({REFUNDED_REASON})"
                );
            }
            Some(status) => {
                let _ = write!(
                    note,
                    "; order {order_id} is {status} on the new primary, left as is"
                );
            }
            None => {
                let _ = write!(note, "; order {order_id} is not on the new primary");
            }
        }
        Ok(Applied::Done(note))
    }

    async fn reapply_refund(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<Applied, GiftError> {
        let e = self.entry;
        let w = self.traffic.wallet_schema();
        let order_id = e.order_id.as_deref().unwrap_or_default();
        let debit: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT amount FROM {w}.ledger WHERE order_id = $1 AND kind = 'debit'"
        ))
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?;
        if debit.is_none() {
            return Ok(Applied::Done(format!(
                "nothing applied: the debit of order {order_id} is not on the new primary either, \
                 so user {} is even there",
                e.user_id
            )));
        }
        self.lock_account(tx).await?;
        let Some(seq) = self.append(tx, e.amount).await? else {
            return Ok(Applied::LostRace);
        };
        Ok(Applied::Done(format!(
            "refunded {} to user {} on the new primary (seq {seq}); the order's status and \
             settlement are left to the outbox worker and reconciliation",
            e.amount, e.user_id
        )))
    }

    async fn apply(
        &self,
        new: &PgPool,
        old_order: Option<&OldOrder>,
    ) -> Result<Applied, GiftError> {
        let mut tx = new.begin().await?;
        self.fence(&mut tx).await?;
        let applied = match (self.entry.kind.as_str(), self.action) {
            ("credit", CompensationAction::Reapply) => self.reapply_credit(&mut tx).await?,
            ("credit", CompensationAction::Refund) => Applied::Done(format!(
                "not re-credited: the top-up of {} to user {} is to be paid back to the customer \
                 outside the wallet",
                self.entry.amount, self.entry.user_id
            )),
            ("debit", CompensationAction::Reapply) => {
                self.reapply_debit(&mut tx, old_order).await?
            }
            ("debit", CompensationAction::Refund) => self.refund_debit(&mut tx).await?,
            ("refund", CompensationAction::Reapply) => self.reapply_refund(&mut tx).await?,
            ("refund", CompensationAction::Refund) => return refused(
                "a lost refund gave money back to the customer: use reapply to apply it on the \
                     new primary too",
            ),
            (kind, _) => return refused(format!("unknown ledger kind {kind:?}")),
        };
        let Applied::Done(note) = applied else {
            return Ok(Applied::LostRace);
        };
        if !self.insert_record(&mut tx, &note).await? {
            return Ok(Applied::LostRace);
        }
        tx.commit().await?;
        Ok(Applied::Done(note))
    }
}

/// The order of a lost debit, as the old primary has it.
struct OldOrder {
    idempotency_key: String,
    user_id: i64,
    streamer_id: i64,
    room_id: i64,
    gift_id: String,
    count: i32,
    amount: Amount,
    created_at_ms: i64,
}

/// Settles one lost ledger entry (by its ledger idempotency key, as [`lost_report`] lists
/// it) on the new primary, as `operator`, writing under fencing `epoch`. Idempotent: a second
/// call returns the earlier record (`already_done`); another action for the same key is
/// refused ([`GiftError::Refused`]), as is an entry that is not lost, insufficient funds for a
/// reapplied debit, a stale epoch, an expired lease or a fenced database (nothing is recorded
/// then).
pub async fn compensate(
    old: &PgPool,
    new: &PgPool,
    traffic: Traffic,
    idempotency_key: &str,
    action: CompensationAction,
    operator: &str,
    epoch: u64,
) -> Result<CompensationOutcome, GiftError> {
    if idempotency_key.is_empty() || idempotency_key.len() > MAX_KEY_LEN {
        return Err(GiftError::InvalidInput(format!(
            "idempotency key must be 1-{MAX_KEY_LEN} bytes"
        )));
    }
    if operator.trim().is_empty() || operator.len() > 200 {
        return Err(GiftError::InvalidInput(
            "operator must be 1-200 characters".into(),
        ));
    }
    let epoch = i64::try_from(epoch)
        .ok()
        .filter(|e| *e >= 1)
        .ok_or_else(|| GiftError::InvalidInput(format!("epoch {epoch} is out of range")))?;
    if let Some(found) = record(new, traffic, idempotency_key).await? {
        return earlier(found, action);
    }
    let w = traffic.wallet_schema();
    let o = traffic.orders_schema();
    let row = sqlx::query(&format!(
        "SELECT seq, kind, user_id, amount, order_id, idempotency_key, epoch, {AT_SQL} AS at, \
                (extract(epoch FROM created_at) * 1000)::bigint AS at_ms \
         FROM {w}.ledger WHERE idempotency_key = $1"
    ))
    .bind(idempotency_key)
    .fetch_optional(old)
    .await?;
    let Some(entry) = row.as_ref().map(lost_entry) else {
        return refused(format!(
            "no ledger entry with key {idempotency_key:?} on the old primary"
        ));
    };
    let on_new: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {w}.ledger WHERE idempotency_key = $1)"
    ))
    .bind(idempotency_key)
    .fetch_one(new)
    .await?;
    if on_new {
        // A concurrent compensation may have committed its entry and its record together
        // after the record check above: then this is a repeat, not an entry never lost.
        if let Some(found) = record(new, traffic, idempotency_key).await? {
            return earlier(found, action);
        }
        return refused(format!(
            "entry {idempotency_key:?} is on the new primary: it was not lost, nothing to compensate"
        ));
    }
    let old_order = match (&entry.kind[..], &entry.order_id) {
        ("debit", Some(order_id)) => sqlx::query(&format!(
            "SELECT idempotency_key, user_id, streamer_id, room_id, gift_id, count, amount, \
                    (extract(epoch FROM created_at) * 1000)::bigint AS at_ms \
             FROM {o}.gift_orders WHERE order_id = $1"
        ))
        .bind(order_id)
        .fetch_optional(old)
        .await?
        .map(|r| OldOrder {
            idempotency_key: r.get("idempotency_key"),
            user_id: r.get("user_id"),
            streamer_id: r.get("streamer_id"),
            room_id: r.get("room_id"),
            gift_id: r.get("gift_id"),
            count: r.get("count"),
            amount: r.get("amount"),
            created_at_ms: r.get("at_ms"),
        }),
        _ => None,
    };
    let compensation = Compensation {
        traffic,
        entry: &entry,
        action,
        operator,
        epoch,
    };
    match compensation
        .apply(new, old_order.as_ref())
        .await
        .map_err(writer_refused)?
    {
        Applied::Done(_) => match record(new, traffic, idempotency_key).await? {
            Some(found) => Ok(CompensationOutcome {
                record: found,
                already_done: false,
            }),
            None => refused("the compensation committed but its record cannot be read back"),
        },
        Applied::LostRace => match record(new, traffic, idempotency_key).await? {
            Some(found) => earlier(found, action),
            None => refused(format!(
                "entry {idempotency_key:?} appeared on the new primary while compensating \
                 (a concurrent write): nothing recorded; run the report again"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> LostReport {
        LostReport {
            traffic: "real",
            from_seq: 10,
            scanned: 3,
            entries: vec![
                LostEntry {
                    seq: 11,
                    kind: "credit".into(),
                    user_id: 123_456_789,
                    amount: 1_000_000_000_000,
                    order_id: None,
                    idempotency_key: "credit:topup-1".into(),
                    epoch: 1,
                    created_at: "2026-11-24T10:11:12.345Z".into(),
                    created_at_ms: 0,
                    compensated: None,
                },
                LostEntry {
                    seq: 12,
                    kind: "debit".into(),
                    user_id: 7,
                    amount: 50,
                    order_id: Some("o0123456789abcdef01234567".into()),
                    idempotency_key: "debit:o0123456789abcdef01234567".into(),
                    epoch: 1,
                    created_at: "2026-11-24T10:11:13.000Z".into(),
                    created_at_ms: 0,
                    compensated: Some("refund".into()),
                },
            ],
            orders: vec![LostOrder {
                order_id: "o0123456789abcdef01234567".into(),
                idempotency_key: "k".into(),
                user_id: 7,
                streamer_id: 8,
                gift_id: "heart".into(),
                count: 1,
                amount: 50,
                status: "delivered".into(),
                created_at: "2026-11-24T10:11:13.000Z".into(),
                created_at_ms: 0,
                lost_debit: true,
            }],
            orders_checked_since_ms: Some(0),
            by_kind: BTreeMap::from([(
                "credit".to_string(),
                KindTotal {
                    count: 1,
                    amount: 1_000_000_000_000,
                },
            )]),
            by_user: vec![UserTotal {
                user_id: 123_456_789,
                entries: 1,
                credits: 1_000_000_000_000,
                debits: 0,
                refunds: 0,
                balance_delta: 1_000_000_000_000,
            }],
        }
    }

    #[test]
    fn the_human_report_fits_80_columns_and_keeps_whole_keys() {
        let text = render_report(&report());
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(text.contains("credit:topup-1"), "{text}");
        assert!(text.contains("compensated: refund"), "{text}");
        assert!(text.contains("debit:o0123456789abcdef01234567"), "{text}");
        assert!(text.contains("11-24 10:11:13"), "{text}");
        assert!(text.contains("  10:11:12  credit:topup-1"), "{text}");
    }

    #[test]
    fn actions_parse() {
        assert_eq!(
            CompensationAction::parse("reapply").unwrap(),
            CompensationAction::Reapply
        );
        assert_eq!(
            CompensationAction::parse("refund").unwrap(),
            CompensationAction::Refund
        );
        assert!(CompensationAction::parse("undo").is_err());
    }
}
