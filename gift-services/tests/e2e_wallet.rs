//! The wallet ledger on the lab's real PostgreSQL primary (site a): concurrency, idempotency,
//! fencing, shadow isolation, and the constraints the database itself enforces.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use gift_services::{Ledger, Outcome, Rejection, Traffic};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn start() -> Result<(tempfile::TempDir, Lab, PgPool)> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-wallet-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let url = lab
        .describe()
        .endpoints
        .postgres
        .get("a")
        .context("site a postgres url")?
        .clone();
    let pool = pool(&url).await?;
    gift_services::migrate(&pool).await?;
    Ok((dir, lab, pool))
}

async fn pool(url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?)
}

async fn scalar(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

fn committed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Committed { .. })
}

#[tokio::test]
async fn e2e_wallet_concurrent_debits_never_overdraw() -> Result<()> {
    let (_dir, lab, pool) = start().await?;
    let ledger = Ledger::new(pool.clone(), Traffic::Real, 1);
    ledger.credit(1, 5_000, "seed").await?;

    phase("1,000 concurrent debits of 7 on one account holding 5,000");
    let tasks: Vec<_> = (0..1_000)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.debit(&format!("order-{i}"), 1, 7).await })
        })
        .collect();
    let mut ok = 0;
    let mut insufficient = 0;
    for task in tasks {
        match task.await?? {
            Outcome::Committed {
                duplicate: false, ..
            } => ok += 1,
            Outcome::Rejected(Rejection::InsufficientFunds { .. }) => insufficient += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 5_000 / 7);
    assert_eq!(insufficient, 1_000 - 5_000 / 7);

    phase("the balance and the ledger agree exactly");
    let balance = ledger.balance(1).await?.context("account")?;
    assert_eq!(balance, 5_000 - 7 * (5_000 / 7));
    let from_ledger = scalar(
        &pool,
        "SELECT sum(CASE kind WHEN 'debit' THEN -amount ELSE amount END)::bigint \
         FROM wallet.ledger WHERE user_id = 1",
    )
    .await?;
    assert_eq!(from_ledger, balance);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM wallet.ledger WHERE kind = 'debit'"
        )
        .await?,
        ok
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_wallet_one_order_retried_from_both_sites_debits_once() -> Result<()> {
    let (_dir, lab, pool_a) = start().await?;
    // A second, independent pool: the wallet instance of site b, writing to the same primary.
    let url = lab.describe().endpoints.postgres["a"].clone();
    let pool_b = pool(&url).await?;
    let site_a = Ledger::new(pool_a.clone(), Traffic::Real, 1);
    let site_b = Ledger::new(pool_b, Traffic::Real, 1);
    site_a.credit(42, 1_000, "topup-42").await?;

    phase("the same order debited 40 times at once, half through each site");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let ledger = if i % 2 == 0 {
                site_a.clone()
            } else {
                site_b.clone()
            };
            tokio::spawn(async move { ledger.debit("order-x", 42, 300).await })
        })
        .collect();
    let mut fresh = 0;
    let mut seqs = std::collections::BTreeSet::new();
    for task in tasks {
        match task.await?? {
            Outcome::Committed { seq, duplicate, .. } => {
                seqs.insert(seq);
                if !duplicate {
                    fresh += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        fresh, 1,
        "exactly one call debits; the others see its result"
    );
    assert_eq!(seqs.len(), 1, "every call reports the same ledger entry");
    assert_eq!(site_b.balance(42).await?, Some(700));

    phase("the same order with another amount is a conflict, not a second debit");
    let other = site_b.debit("order-x", 42, 1).await?;
    assert!(
        matches!(other, Outcome::Rejected(Rejection::Conflict(_))),
        "{other:?}"
    );

    phase("refund once, however often asked; a refund without debit is refused");
    let r1 = site_a.refund("order-x").await?;
    let r2 = site_b.refund("order-x").await?;
    assert!(
        matches!(
            r1,
            Outcome::Committed {
                duplicate: false,
                ..
            }
        ),
        "{r1:?}"
    );
    assert!(
        matches!(
            r2,
            Outcome::Committed {
                duplicate: true,
                ..
            }
        ),
        "{r2:?}"
    );
    assert_eq!(site_a.balance(42).await?, Some(1_000));
    assert_eq!(
        site_a.refund("never-debited").await?,
        Outcome::Rejected(Rejection::NoDebit("never-debited".into()))
    );
    assert_eq!(
        site_a.debit("order-y", 4242, 1).await?,
        Outcome::Rejected(Rejection::UnknownAccount(4242))
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_wallet_stale_epoch_commits_nothing() -> Result<()> {
    let (_dir, lab, pool) = start().await?;
    let old_writer = Ledger::new(pool.clone(), Traffic::Real, 1);
    old_writer.credit(7, 100, "topup-7").await?;
    let entries = scalar(&pool, "SELECT count(*) FROM wallet.ledger").await?;

    phase("a promotion writes epoch 2 into the fencing row");
    sqlx::query("UPDATE wallet.fencing SET epoch = 2, updated_at = now()")
        .execute(&pool)
        .await?;

    phase("the old writer (epoch 1) is refused for every kind of write");
    let stale = Rejection::StaleEpoch {
        writer: 1,
        database: 2,
    };
    assert_eq!(
        old_writer.debit("o1", 7, 10).await?,
        Outcome::Rejected(stale.clone())
    );
    assert_eq!(
        old_writer.credit(7, 10, "again").await?,
        Outcome::Rejected(stale.clone())
    );
    assert_eq!(old_writer.refund("o1").await?, Outcome::Rejected(stale));
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM wallet.ledger").await?,
        entries
    );
    assert_eq!(old_writer.balance(7).await?, Some(100));

    phase("the new writer (epoch 2) writes");
    let new_writer = Ledger::new(pool.clone(), Traffic::Real, 2);
    assert!(committed(&new_writer.debit("o1", 7, 10).await?));
    assert_eq!(
        scalar(
            &pool,
            "SELECT epoch FROM wallet.ledger ORDER BY seq DESC LIMIT 1"
        )
        .await?,
        2
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_wallet_shadow_traffic_and_database_constraints() -> Result<()> {
    let (_dir, lab, pool) = start().await?;
    let real = Ledger::new(pool.clone(), Traffic::Real, 1);
    let shadow = Ledger::new(pool.clone(), Traffic::Shadow, 1);

    phase("shadow writes land only in the shadow schema");
    assert!(committed(&shadow.credit(9, 500, "load-test").await?));
    assert!(committed(&shadow.debit("shadow-order", 9, 200).await?));
    assert_eq!(shadow.balance(9).await?, Some(300));
    assert_eq!(real.balance(9).await?, None);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM wallet.ledger").await?,
        0
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM wallet.accounts").await?,
        0
    );

    phase("bad input is refused before the database");
    for result in [
        real.debit("o", 9, 0).await,
        real.debit("o", 9, -5).await,
        real.debit("o", 9, i64::MAX).await,
        real.debit("", 9, 1).await,
        real.debit("o", 0, 1).await,
        real.credit(9, 1, &"k".repeat(500)).await,
    ] {
        let err = result.expect_err("invalid input");
        assert_eq!(err.kind(), "invalid_input", "{err}");
    }

    phase("the database refuses what the code must never do");
    real.credit(9, 100, "seed").await?;
    let refused = [
        (
            "UPDATE wallet.accounts SET balance = -1 WHERE user_id = 9",
            "accounts_balance_check",
        ),
        ("UPDATE wallet.ledger SET amount = 1", "append-only"),
        ("DELETE FROM wallet.ledger", "append-only"),
        (
            "INSERT INTO wallet.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
             VALUES (9, 'credit', 0, NULL, 'zero', 1)",
            "ledger_amount_check",
        ),
        (
            "INSERT INTO wallet.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
             VALUES (9, 'credit', 5, NULL, 'credit:seed', 1)",
            "ledger_idempotency_key_key",
        ),
        (
            "INSERT INTO wallet.fencing (singleton, epoch) VALUES (false, 9)",
            "fencing_singleton_check",
        ),
    ];
    for (sql, reason) in refused {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains(reason), "{sql}: {err}");
    }
    real.debit("d1", 9, 10).await?;
    let err = sqlx::query(
        "INSERT INTO wallet.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
         VALUES (9, 'debit', 10, 'd1', 'another-key', 1)",
    )
    .execute(&pool)
    .await
    .expect_err("a second debit for one order");
    assert!(
        err.to_string().contains("ledger_one_debit_per_order"),
        "{err}"
    );
    assert_eq!(real.balance(9).await?, Some(90));
    assert_eq!(
        real.latest_sequence().await?,
        scalar(&pool, "SELECT max(seq) FROM wallet.ledger").await?
    );
    lab.down().await?;
    Ok(())
}

#[tokio::test]
async fn e2e_wallet_reconciliation_is_clean_and_finds_corruption() -> Result<()> {
    let (_dir, lab, pool) = start().await?;
    let ledger = Ledger::new(pool.clone(), Traffic::Real, 1);

    phase("a mix of credits, debits and refunds on 20 accounts");
    let tasks: Vec<_> = (0..400u32)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let user = i64::from(i % 20) + 1;
                ledger.credit(user, 100, &format!("top-{i}")).await?;
                let order = format!("mix-{i}");
                ledger.debit(&order, user, i64::from(i % 130) + 1).await?;
                if i % 3 == 0 {
                    ledger.refund(&order).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let report = gift_services::reconcile::wallet(&pool, Traffic::Real).await?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.accounts, 20);
    assert!(report.ledger_entries > 800, "{report:?}");
    assert_eq!(report.balances, report.ledger_net);

    phase("a balance changed behind the ledger's back is found");
    sqlx::query("UPDATE wallet.accounts SET balance = balance + 1 WHERE user_id = 7")
        .execute(&pool)
        .await?;
    phase("and so is a refund with no debit");
    sqlx::query(
        "INSERT INTO wallet.ledger (user_id, kind, amount, order_id, idempotency_key, epoch) \
         VALUES (3, 'refund', 5, 'ghost', 'refund:ghost', 1)",
    )
    .execute(&pool)
    .await?;
    let report = gift_services::reconcile::wallet(&pool, Traffic::Real).await?;
    assert!(!report.is_clean());
    let found: Vec<(&str, &str)> = report
        .mismatches
        .iter()
        .map(|m| (m.check, m.subject.as_str()))
        .collect();
    assert!(
        found.contains(&("balance_equals_ledger", "user 7")),
        "{found:?}"
    );
    // The ghost refund breaks user 3's balance too, and is itself an orphan.
    assert!(
        found.contains(&("balance_equals_ledger", "user 3")),
        "{found:?}"
    );
    assert!(
        found.contains(&("refund_matches_debit", "order ghost")),
        "{found:?}"
    );
    assert_eq!(report.mismatch_count, 3, "{report:?}");
    let json = serde_json::to_string(&report)?;
    assert!(
        json.contains("\"check\":\"refund_matches_debit\""),
        "{json}"
    );

    phase("shadow reconciliation is separate and clean");
    let shadow = gift_services::reconcile::wallet(&pool, Traffic::Shadow).await?;
    assert!(shadow.is_clean() && shadow.accounts == 0, "{shadow:?}");
    lab.down().await?;
    Ok(())
}
