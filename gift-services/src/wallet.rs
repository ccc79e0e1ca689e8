//! The wallet's ledger operations: credit (top-up), debit (a gift's payment), refund.
//!
//! Every write is one transaction that, in this order:
//! 1. reads the fencing row `FOR SHARE` and refuses unless it holds this writer's epoch (a
//!    promotion that writes a new epoch waits for in-flight writes, and every later write sees
//!    it) and its writer lease (`lease_until`, when set) has not passed;
//! 2. locks the account row `FOR UPDATE` (so retries of one order serialise on it);
//! 3. returns the earlier result if this operation already happened (idempotency);
//! 4. checks the balance, appends the ledger entry and updates the balance. The database's
//!    constraints (unique keys, one debit / one refund per order, balance >= 0) back every
//!    one of these checks.
//!
//! At COMMIT, a deferred constraint trigger on the ledger checks the lease again: a
//! transaction whose database was frozen across a failover commits nothing when it resumes
//! ([`Rejection::LeaseExpired`]). A fenced (read-only) database refuses the first locking read
//! ([`Rejection::Fenced`]). Both are definite: nothing was committed.
//!
//! Any other database error is returned as [`GiftError::Database`]: the outcome is then unknown
//! (indeterminate) and the caller retries with the same order or idempotency key, which is
//! always safe.

use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::{Amount, GiftError, Traffic, MAX_AMOUNT};

/// SQL (over a row of `<wallet>.fencing`) that is true when the writer lease has passed.
/// `lease_until` NULL means no lease is enforced.
pub const LEASE_EXPIRED_SQL: &str = "(lease_until IS NOT NULL AND lease_until < clock_timestamp())";

/// Longest accepted order id / idempotency key.
pub const MAX_KEY_LEN: usize = 200;

/// A committed or refused wallet operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done, now or earlier (`duplicate`: this call found the earlier result and changed
    /// nothing). `balance` is the account's balance after the operation (now, for a duplicate).
    Committed {
        seq: i64,
        balance: Amount,
        duplicate: bool,
    },
    /// Refused; nothing was written.
    Rejected(Rejection),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("insufficient funds: balance {balance}, amount {amount}")]
    InsufficientFunds { balance: Amount, amount: Amount },
    #[error("unknown account {0}")]
    UnknownAccount(i64),
    #[error("stale fencing epoch: this writer has epoch {writer}, the database has {database}")]
    StaleEpoch { writer: u64, database: u64 },
    #[error("order {0} has no debit to refund")]
    NoDebit(String),
    #[error("{0}")]
    Conflict(String),
    /// The database's writer lease (`fencing.lease_until`) has passed: at the start of the
    /// transaction, or at COMMIT (the deferred trigger). Nothing was committed.
    #[error("the writer lease of this database has expired; nothing was committed")]
    LeaseExpired,
    /// The database is fenced (read-only: SQLSTATE 25006). Nothing was committed.
    #[error("the database is fenced (read-only); nothing was committed")]
    Fenced,
}

impl Rejection {
    /// A stable label for metrics and API error codes.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InsufficientFunds { .. } => "insufficient_funds",
            Rejection::UnknownAccount(_) => "unknown_account",
            Rejection::StaleEpoch { .. } => "stale_epoch",
            Rejection::NoDebit(_) => "no_debit",
            Rejection::Conflict(_) => "conflict",
            Rejection::LeaseExpired => "lease_expired",
            Rejection::Fenced => "fenced",
        }
    }

    /// True when the refusal says "this database may not be written now" (a failover is under
    /// way) rather than anything about the request: nothing happened, try again later.
    pub fn is_writer_refusal(&self) -> bool {
        matches!(
            self,
            Rejection::StaleEpoch { .. } | Rejection::LeaseExpired | Rejection::Fenced
        )
    }
}

/// SQLSTATE the lease trigger raises at COMMIT (see `migrations/*_lease.sql`).
pub const LEASE_EXPIRED_SQLSTATE: &str = "GF001";
/// SQLSTATE of a write (or `FOR SHARE`) in a read-only transaction: a fenced database.
pub const READ_ONLY_SQLSTATE: &str = "25006";

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// A database error that proves nothing was committed because this database may not be
/// written: the lease trigger refused the COMMIT, or the database is read-only (fenced).
pub fn writer_refusal(e: &sqlx::Error) -> Option<Rejection> {
    match sqlstate(e).as_deref() {
        Some(LEASE_EXPIRED_SQLSTATE) => Some(Rejection::LeaseExpired),
        Some(READ_ONLY_SQLSTATE) => Some(Rejection::Fenced),
        _ => None,
    }
}

/// Writes to one database as the writer of one fencing epoch.
#[derive(Clone, Debug)]
pub struct Ledger {
    pool: PgPool,
    traffic: Traffic,
    epoch: u64,
}

fn check_amount(amount: Amount) -> Result<(), GiftError> {
    if amount <= 0 || amount > MAX_AMOUNT {
        return Err(GiftError::InvalidInput(format!(
            "amount {amount} is out of range (1..={MAX_AMOUNT} minor units)"
        )));
    }
    Ok(())
}

fn check_user(user_id: i64) -> Result<(), GiftError> {
    if user_id <= 0 {
        return Err(GiftError::InvalidInput(format!(
            "user id {user_id} must be positive"
        )));
    }
    Ok(())
}

fn check_key(what: &str, key: &str) -> Result<(), GiftError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(GiftError::InvalidInput(format!(
            "{what} must be 1-{MAX_KEY_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// Why a transaction stops early: a refusal, or a finished idempotent replay.
enum Early {
    Done(Outcome),
    Failed(sqlx::Error),
}

impl From<sqlx::Error> for Early {
    fn from(e: sqlx::Error) -> Self {
        Early::Failed(e)
    }
}

type Step<T> = Result<T, Early>;

fn rejected<T>(r: Rejection) -> Step<T> {
    Err(Early::Done(Outcome::Rejected(r)))
}

impl Ledger {
    pub fn new(pool: PgPool, traffic: Traffic, epoch: u64) -> Ledger {
        Ledger {
            pool,
            traffic,
            epoch,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn schema(&self) -> &'static str {
        self.traffic.wallet_schema()
    }

    /// Refuses unless the database's fencing row holds this writer's epoch. Holds a share
    /// lock on the row until the transaction ends.
    async fn check_epoch(&self, tx: &mut Transaction<'_, Postgres>) -> Step<()> {
        let sql = format!(
            "SELECT epoch, {LEASE_EXPIRED_SQL} AS expired FROM {}.fencing FOR SHARE",
            self.schema()
        );
        let Some(row) = sqlx::query(&sql).fetch_optional(&mut **tx).await? else {
            return rejected(Rejection::StaleEpoch {
                writer: self.epoch,
                database: 0,
            });
        };
        self.judge_fencing(row.get::<Option<i64>, _>("epoch"), row.get("expired"))
    }

    /// The fencing row's verdict: this writer's epoch and a lease still running, or a refusal.
    fn judge_fencing(&self, database: Option<i64>, expired: Option<bool>) -> Step<()> {
        let database = u64::try_from(database.unwrap_or(0)).unwrap_or(0);
        if database != self.epoch {
            return rejected(Rejection::StaleEpoch {
                writer: self.epoch,
                database,
            });
        }
        if expired == Some(true) {
            return rejected(Rejection::LeaseExpired);
        }
        Ok(())
    }

    /// Locks the account; its balance, or a refusal if it does not exist.
    async fn lock_account(&self, tx: &mut Transaction<'_, Postgres>, user_id: i64) -> Step<Amount> {
        let sql = format!(
            "SELECT balance FROM {}.accounts WHERE user_id = $1 FOR UPDATE",
            self.schema()
        );
        match sqlx::query_scalar::<_, i64>(&sql)
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?
        {
            Some(balance) => Ok(balance),
            None => rejected(Rejection::UnknownAccount(user_id)),
        }
    }

    async fn append(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        user_id: i64,
        kind: &str,
        amount: Amount,
        order_id: Option<&str>,
        key: &str,
    ) -> Step<i64> {
        let sql = format!(
            "INSERT INTO {}.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING seq",
            self.schema()
        );
        let seq: Option<i64> = sqlx::query_scalar(&sql)
            .bind(user_id)
            .bind(kind)
            .bind(amount)
            .bind(order_id)
            .bind(key)
            .bind(i64::try_from(self.epoch).unwrap_or(i64::MAX))
            .fetch_optional(&mut **tx)
            .await?;
        match seq {
            Some(seq) => Ok(seq),
            // A unique key already taken by a different operation (the matching replay was
            // found before we got here).
            None => rejected(Rejection::Conflict(format!(
                "idempotency key {key:?} or order {order_id:?} is already used by another {kind}"
            ))),
        }
    }

    async fn add_to_balance(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        user_id: i64,
        delta: Amount,
    ) -> Step<Amount> {
        let sql = format!(
            "UPDATE {}.accounts SET balance = balance + $2, updated_at = now() \
             WHERE user_id = $1 RETURNING balance",
            self.schema()
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(user_id)
            .bind(delta)
            .fetch_one(&mut **tx)
            .await?)
    }

    /// An earlier ledger entry of `kind` for `order_id`: (seq, user, amount).
    async fn entry_for_order(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        kind: &str,
        order_id: &str,
    ) -> Step<Option<(i64, i64, Amount)>> {
        let sql = format!(
            "SELECT seq, user_id, amount FROM {}.ledger WHERE order_id = $1 AND kind = $2",
            self.schema()
        );
        let row = sqlx::query(&sql)
            .bind(order_id)
            .bind(kind)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.map(|r| (r.get("seq"), r.get("user_id"), r.get("amount"))))
    }

    /// Runs `body` in a transaction that starts with the epoch check; commits only when the
    /// body finishes with a fresh `Committed`.
    async fn write<'a, F>(&'a self, body: F) -> Result<Outcome, GiftError>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'a, Postgres>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Step<(i64, Amount)>> + Send + 't>,
        >,
    {
        let mut tx = self.pool.begin().await?;
        let result = match self.check_epoch(&mut tx).await {
            Ok(()) => body(&mut tx).await,
            Err(e) => Err(e),
        };
        Self::finish(tx, result).await
    }

    /// Runs `body` in a transaction; commits only when it finishes with a fresh `Committed`.
    /// The body itself must check the epoch first (see [`Ledger::debit`]).
    async fn write_unchecked<'a, F>(&'a self, body: F) -> Result<Outcome, GiftError>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'a, Postgres>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Step<(i64, Amount)>> + Send + 't>,
        >,
    {
        let mut tx = self.pool.begin().await?;
        let result = body(&mut tx).await;
        Self::finish(tx, result).await
    }

    async fn finish(
        mut tx: Transaction<'_, Postgres>,
        result: Step<(i64, Amount)>,
    ) -> Result<Outcome, GiftError> {
        if result.is_ok() {
            // In zero-loss mode (synchronous replication) a COMMIT waits for the standby, and
            // PostgreSQL answers a cancelled wait (the statement timeout) with *success*: the
            // commit would be acknowledged without the standby having it. No timeout on the
            // COMMIT, then: it returns when the standby has it, or when the controller relaxes
            // the mode; the caller's own deadline reports the outcome unknown meanwhile.
            if let Err(e) = sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut *tx)
                .await
            {
                return Err(e.into());
            }
        }
        match result {
            Ok((seq, balance)) => match tx.commit().await {
                Ok(()) => Ok(Outcome::Committed {
                    seq,
                    balance,
                    duplicate: false,
                }),
                // The lease trigger refused the COMMIT: a definite "nothing committed".
                Err(e) => match writer_refusal(&e) {
                    Some(r) => Ok(Outcome::Rejected(r)),
                    None => Err(e.into()),
                },
            },
            Err(Early::Done(outcome)) => {
                tx.rollback().await?;
                Ok(outcome)
            }
            // A read-only (fenced) database refuses the first locking read or write: the
            // transaction is aborted, nothing was committed. Dropping `tx` rolls it back.
            Err(Early::Failed(e)) => match writer_refusal(&e) {
                Some(r) => Ok(Outcome::Rejected(r)),
                None => Err(e.into()),
            },
        }
    }

    /// Tops up `user_id` by `amount` once per `idempotency_key`; creates the account if new.
    pub async fn credit(
        &self,
        user_id: i64,
        amount: Amount,
        idempotency_key: &str,
    ) -> Result<Outcome, GiftError> {
        check_user(user_id)?;
        check_amount(amount)?;
        check_key("idempotency key", idempotency_key)?;
        let schema = self.schema();
        let key = format!("credit:{idempotency_key}");
        self.write(|tx| {
            Box::pin(async move {
                let create = format!(
                    "INSERT INTO {schema}.accounts (user_id, balance) VALUES ($1, 0) \
                     ON CONFLICT (user_id) DO NOTHING"
                );
                sqlx::query(&create).bind(user_id).execute(&mut **tx).await?;
                let balance = self.lock_account(tx, user_id).await?;
                let earlier = format!(
                    "SELECT seq, user_id, amount FROM {schema}.ledger WHERE idempotency_key = $1"
                );
                if let Some(row) = sqlx::query(&earlier)
                    .bind(&key)
                    .fetch_optional(&mut **tx)
                    .await?
                {
                    let (seq, user, earlier_amount): (i64, i64, i64) =
                        (row.get("seq"), row.get("user_id"), row.get("amount"));
                    if user != user_id || earlier_amount != amount {
                        return rejected(Rejection::Conflict(format!(
                            "idempotency key {idempotency_key:?} was used for a credit of {earlier_amount} to user {user}"
                        )));
                    }
                    return Err(Early::Done(Outcome::Committed {
                        seq,
                        balance,
                        duplicate: true,
                    }));
                }
                let seq = self
                    .append(tx, user_id, "credit", amount, None, &key)
                    .await?;
                let balance = self.add_to_balance(tx, user_id, amount).await?;
                Ok((seq, balance))
            })
        })
        .await
    }

    /// Debits `amount` from `user_id` for `order_id`, exactly once per order.
    ///
    /// The hot path of every gift, so it takes four round trips: BEGIN; the epoch check and
    /// the account lock in one statement; the ledger append and the balance update in one
    /// statement; COMMIT. The replay check comes last: an insert that finds the order's debit
    /// already there (a retry, possibly from the other site) reads it back and answers
    /// `duplicate`.
    pub async fn debit(
        &self,
        order_id: &str,
        user_id: i64,
        amount: Amount,
    ) -> Result<Outcome, GiftError> {
        check_key("order id", order_id)?;
        check_user(user_id)?;
        check_amount(amount)?;
        let order = order_id.to_string();
        let w = self.schema();
        let epoch = i64::try_from(self.epoch).unwrap_or(i64::MAX);
        self.write_unchecked(|tx| {
            Box::pin(async move {
                let row = sqlx::query(&format!(
                    "SELECT f.epoch, {LEASE_EXPIRED_SQL} AS expired, \
                            (SELECT balance FROM {w}.accounts WHERE user_id = $1 FOR UPDATE) AS balance \
                     FROM (SELECT epoch, lease_until FROM {w}.fencing FOR SHARE) f"
                ))
                .bind(user_id)
                .fetch_optional(&mut **tx)
                .await?;
                // No fencing row at all: no writer may write here.
                let Some(row) = row else {
                    return rejected(Rejection::StaleEpoch { writer: self.epoch, database: 0 });
                };
                self.judge_fencing(row.get::<Option<i64>, _>("epoch"), row.get("expired"))?;
                let Some(balance) = row.get::<Option<i64>, _>("balance") else {
                    return rejected(Rejection::UnknownAccount(user_id));
                };
                if balance >= amount {
                    let key = format!("debit:{order}");
                    let applied = sqlx::query(&format!(
                        "WITH entry AS (INSERT INTO {w}.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
                                        VALUES ($1, 'debit', $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING seq) \
                         UPDATE {w}.accounts SET balance = balance - $2, updated_at = now() \
                         WHERE user_id = $1 AND EXISTS (SELECT 1 FROM entry) \
                         RETURNING balance, (SELECT seq FROM entry) AS seq"
                    ))
                    .bind(user_id)
                    .bind(amount)
                    .bind(&order)
                    .bind(&key)
                    .bind(epoch)
                    .fetch_optional(&mut **tx)
                    .await?;
                    if let Some(row) = applied {
                        return Ok((row.get("seq"), row.get("balance")));
                    }
                }
                // Not enough money, or the order's debit exists already: which one?
                let balance = self.lock_account(tx, user_id).await?;
                match self.entry_for_order(tx, "debit", &order).await? {
                    Some((seq, user, earlier)) if user == user_id && earlier == amount => {
                        Err(Early::Done(Outcome::Committed {
                            seq,
                            balance,
                            duplicate: true,
                        }))
                    }
                    Some((_, user, earlier)) => rejected(Rejection::Conflict(format!(
                        "order {order} was already debited {earlier} from user {user}"
                    ))),
                    None if balance < amount => {
                        rejected(Rejection::InsufficientFunds { balance, amount })
                    }
                    None => rejected(Rejection::Conflict(format!(
                        "the debit key of order {order} is taken by another entry"
                    ))),
                }
            })
        })
        .await
    }

    /// Refunds the debit of `order_id`, at most once.
    pub async fn refund(&self, order_id: &str) -> Result<Outcome, GiftError> {
        check_key("order id", order_id)?;
        let order = order_id.to_string();
        self.write(|tx| {
            Box::pin(async move {
                let Some((_, user_id, amount)) = self.entry_for_order(tx, "debit", &order).await?
                else {
                    return rejected(Rejection::NoDebit(order));
                };
                let balance = self.lock_account(tx, user_id).await?;
                if let Some((seq, _, _)) = self.entry_for_order(tx, "refund", &order).await? {
                    return Err(Early::Done(Outcome::Committed {
                        seq,
                        balance,
                        duplicate: true,
                    }));
                }
                let key = format!("refund:{order}");
                let seq = self
                    .append(tx, user_id, "refund", amount, Some(&order), &key)
                    .await?;
                let balance = self.add_to_balance(tx, user_id, amount).await?;
                Ok((seq, balance))
            })
        })
        .await
    }

    /// The account's balance, or `None` if it does not exist. A plain read: no epoch needed.
    pub async fn balance(&self, user_id: i64) -> Result<Option<Amount>, GiftError> {
        check_user(user_id)?;
        let sql = format!(
            "SELECT balance FROM {}.accounts WHERE user_id = $1",
            self.schema()
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The highest ledger sequence (what the agents report to estimate possible loss).
    pub async fn latest_sequence(&self) -> Result<i64, GiftError> {
        let sql = format!("SELECT coalesce(max(seq), 0) FROM {}.ledger", self.schema());
        Ok(sqlx::query_scalar(&sql).fetch_one(&self.pool).await?)
    }
}
