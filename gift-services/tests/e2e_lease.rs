//! The writer lease on the lab's real PostgreSQL primary: the commit-time trigger refuses a
//! transaction that passed the fencing check once the lease has passed; an expired lease and
//! a fenced (read-only) database are definite refusals (nothing committed), never unknown.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use gift_services::wallet::LEASE_EXPIRED_SQLSTATE;
use gift_services::{Ledger, Outcome, Rejection, Traffic};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn start() -> Result<(tempfile::TempDir, Lab, PgPool, String)> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-lease-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let url = lab
        .describe()
        .endpoints
        .postgres
        .get("a")
        .context("site a postgres url")?
        .clone();
    let pool = connect(&url).await?;
    gift_services::migrate(&pool).await?;
    Ok((dir, lab, pool, url))
}

async fn connect(url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?)
}

async fn scalar(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

async fn set_lease(pool: &PgPool, schema: &str, lease: &str) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE {schema}.fencing SET lease_until = {lease}"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// A ledger credit written by hand the way the Ledger writes it: the fencing check first,
/// then the entry; `pause` between the check and COMMIT (a database frozen across a
/// failover). The COMMIT's result.
async fn credit_with_pause(
    pool: &PgPool,
    user: i64,
    key: &str,
    pause: Duration,
) -> Result<Result<(), sqlx::Error>> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT epoch, (lease_until IS NOT NULL AND lease_until < clock_timestamp()) AS expired \
         FROM wallet.fencing FOR SHARE",
    )
    .fetch_one(&mut *tx)
    .await?;
    assert_eq!(row.get::<i64, _>("epoch"), 1);
    assert!(
        !row.get::<bool, _>("expired"),
        "the check passes: the lease is still running"
    );
    sqlx::query(
        "INSERT INTO wallet.accounts (user_id, balance) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(user)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO wallet.ledger (user_id, kind, amount, idempotency_key, epoch) \
         VALUES ($1, 'credit', 100, $2, 1)",
    )
    .bind(user)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE wallet.accounts SET balance = balance + 100 WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(pause).await;
    Ok(tx.commit().await)
}

#[tokio::test]
async fn e2e_lease_commit_time_trigger_and_definite_refusals() -> Result<()> {
    let (_dir, lab, pool, url) = start().await?;
    let ledger = Ledger::new(pool.clone(), Traffic::Real, 1);

    phase("no lease set (NULL): writes commit as before");
    assert!(matches!(
        ledger.credit(1, 1_000, "seed").await?,
        Outcome::Committed { .. }
    ));
    assert!(matches!(
        ledger.debit("o-1", 1, 100).await?,
        Outcome::Committed { .. }
    ));

    phase("lease in the past: every write refused at the fencing check, nothing written");
    set_lease(&pool, "wallet", "clock_timestamp() - interval '1 second'").await?;
    let entries = scalar(&pool, "SELECT count(*) FROM wallet.ledger").await?;
    assert_eq!(
        ledger.credit(1, 5, "late-credit").await?,
        Outcome::Rejected(Rejection::LeaseExpired)
    );
    assert_eq!(
        ledger.debit("o-2", 1, 5).await?,
        Outcome::Rejected(Rejection::LeaseExpired)
    );
    assert_eq!(
        ledger.refund("o-1").await?,
        Outcome::Rejected(Rejection::LeaseExpired)
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM wallet.ledger").await?,
        entries
    );
    assert_eq!(ledger.balance(1).await?, Some(900));
    assert_eq!(Rejection::LeaseExpired.code(), "lease_expired");
    phase("the shadow schema has its own lease: shadow writes still commit");
    let shadow = Ledger::new(pool.clone(), Traffic::Shadow, 1);
    assert!(matches!(
        shadow.credit(1, 5, "shadow-credit").await?,
        Outcome::Committed { .. }
    ));

    phase("lease running: the same writes commit");
    set_lease(&pool, "wallet", "clock_timestamp() + interval '30 seconds'").await?;
    assert!(matches!(
        ledger.debit("o-2", 1, 5).await?,
        Outcome::Committed { .. }
    ));
    credit_with_pause(&pool, 2, "credit:control", Duration::ZERO)
        .await?
        .expect("a transaction that commits within its lease commits");

    phase("a transaction passes the check, its lease passes before COMMIT: the trigger refuses it");
    set_lease(&pool, "wallet", "clock_timestamp() + interval '1 second'").await?;
    let commit = credit_with_pause(&pool, 2, "credit:frozen", Duration::from_millis(1_500)).await?;
    let err = commit.expect_err("COMMIT after the lease must fail");
    assert_eq!(
        gift_services::wallet::sqlstate(&err).as_deref(),
        Some(LEASE_EXPIRED_SQLSTATE),
        "{err}"
    );
    assert!(err.to_string().contains("writer lease expired"), "{err}");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM wallet.ledger WHERE idempotency_key = 'credit:frozen'"
        )
        .await?,
        0
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT balance FROM wallet.accounts WHERE user_id = 2"
        )
        .await?,
        100,
        "only the control credit"
    );

    phase("through the Ledger: a debit held up behind a lock past its lease commits nothing");
    set_lease(&pool, "wallet", "clock_timestamp() + interval '1 second'").await?;
    let mut blocker = pool.begin().await?;
    sqlx::query("SELECT balance FROM wallet.accounts WHERE user_id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await?;
    let held = {
        let ledger = ledger.clone();
        tokio::spawn(async move { ledger.debit("o-held", 1, 7).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    blocker.commit().await?;
    assert_eq!(held.await??, Outcome::Rejected(Rejection::LeaseExpired));
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM wallet.ledger WHERE order_id = 'o-held'"
        )
        .await?,
        0
    );
    assert_eq!(ledger.balance(1).await?, Some(895));

    phase("fenced (default_transaction_read_only, as the agent fences): a definite refusal");
    set_lease(&pool, "wallet", "NULL").await?;
    let mut admin = pool.acquire().await?.detach();
    sqlx::query("ALTER SYSTEM SET default_transaction_read_only = on")
        .execute(&mut admin)
        .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pool's sessions and new ones alike.
    let fresh = Ledger::new(connect(&url).await?, Traffic::Real, 1);
    for l in [&ledger, &fresh] {
        assert_eq!(
            l.debit("o-fenced", 1, 1).await?,
            Outcome::Rejected(Rejection::Fenced)
        );
        assert_eq!(
            l.credit(1, 1, "fenced-credit").await?,
            Outcome::Rejected(Rejection::Fenced)
        );
        assert_eq!(l.balance(1).await?, Some(895), "reads still work");
    }
    assert_eq!(Rejection::Fenced.code(), "fenced");
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut admin)
        .await?;
    sqlx::query("ALTER SYSTEM RESET default_transaction_read_only")
        .execute(&mut admin)
        .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        fresh.debit("o-fenced", 1, 1).await?,
        Outcome::Committed { .. }
    ));
    lab.down().await?;
    Ok(())
}
