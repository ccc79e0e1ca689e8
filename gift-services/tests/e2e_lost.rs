//! The lost-transaction report and compensation on two real databases of the lab's
//! PostgreSQL, both made by the migrations: `lost_old` (the old primary, which kept writing
//! after the promotion point) and `lost_new` (the promoted replica, epoch 2). The shared
//! history is written to both, as replication would have.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use gift_services::lost::{self, CompensationAction};
use gift_services::orders::{Created, NewOrder, OrderStore};
use gift_services::{GiftError, Ledger, Outcome, Traffic};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

fn phase(name: &str) {
    eprintln!("--- {name}");
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

async fn status(pool: &PgPool, order_id: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM orders.gift_orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?,
    )
}

fn committed(o: &Outcome) -> bool {
    matches!(o, Outcome::Committed { .. })
}

/// Creates an order on `pool`, returns its id.
async fn order(pool: &PgPool, key: &str, user: i64, gift: &str) -> Result<String> {
    let store = OrderStore::new(pool.clone(), Traffic::Real);
    match store
        .create(&NewOrder {
            idempotency_key: key.into(),
            user_id: user,
            streamer_id: 900,
            room_id: 900,
            gift_id: gift.into(),
            count: 1,
        })
        .await?
    {
        Created::Order { order, .. } => Ok(order.order_id),
        other => anyhow::bail!("{other:?}"),
    }
}

/// Copies an order row from `from` to `to` as replication would have.
async fn replicate_order(from: &PgPool, to: &PgPool, order_id: &str) -> Result<()> {
    let row: (String, i64, i64, i64, String, i32, i64, String) = sqlx::query_as(
        "SELECT idempotency_key, user_id, streamer_id, room_id, gift_id, count, amount, status \
         FROM orders.gift_orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(from)
    .await?;
    sqlx::query(
        "INSERT INTO orders.gift_orders (order_id, idempotency_key, user_id, streamer_id, room_id, \
         gift_id, count, amount, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(order_id)
    .bind(row.0)
    .bind(row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(row.4)
    .bind(row.5)
    .bind(row.6)
    .bind(row.7)
    .execute(to)
    .await?;
    Ok(())
}

/// A gift paid on `pool` as the saga pays it: debit, then paid with its outbox events.
async fn pay(pool: &PgPool, order_id: &str, user: i64, amount: i64) -> Result<()> {
    let debit = Ledger::new(pool.clone(), Traffic::Real, 1)
        .debit(order_id, user, amount)
        .await?;
    assert!(committed(&debit), "{debit:?}");
    OrderStore::new(pool.clone(), Traffic::Real)
        .mark_paid(order_id)
        .await?;
    Ok(())
}

fn refused(r: Result<lost::CompensationOutcome, GiftError>, needle: &str) {
    match r {
        Err(GiftError::Refused(m)) => assert!(m.contains(needle), "{needle}: {m}"),
        other => panic!("expected a refusal about {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn e2e_lost_report_finds_exactly_the_lost_entries_and_compensation_is_idempotent(
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-lost-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let url = lab.describe().endpoints.postgres["a"].clone();
    let admin = connect(&url).await?;
    let base = url.rsplit_once('/').context("db url")?.0.to_string();
    for db in ["lost_old", "lost_new"] {
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await?;
    }
    let old = connect(&format!("{base}/lost_old")).await?;
    let new = connect(&format!("{base}/lost_new")).await?;
    gift_services::migrate(&old).await?;
    gift_services::migrate(&new).await?;
    let old_ledger = Ledger::new(old.clone(), Traffic::Real, 1);

    phase("shared history, on both (replicated before the failover)");
    for pool in [&old, &new] {
        let l = Ledger::new(pool.clone(), Traffic::Real, 1);
        assert!(committed(&l.credit(1, 1_000, "c1").await?));
        assert!(committed(&l.credit(2, 500, "c2").await?));
    }
    let c_order = order(&old, "gift-c", 1, "heart").await?;
    replicate_order(&old, &new, &c_order).await?;
    pay(&old, &c_order, 1, 50).await?;
    pay(&new, &c_order, 1, 50).await?;
    let e_order = order(&old, "gift-e", 2, "heart").await?;
    replicate_order(&old, &new, &e_order).await?;
    let promotion_seq = scalar(&old, "SELECT max(seq) FROM wallet.ledger").await?;

    phase("the promotion: new holds epoch 2; old keeps writing (acknowledged, then lost)");
    sqlx::query("UPDATE wallet.fencing SET epoch = 2")
        .execute(&new)
        .await?;
    assert!(committed(&old_ledger.credit(1, 300, "c3").await?));
    let a_order = order(&old, "gift-a", 1, "heart").await?;
    pay(&old, &a_order, 1, 50).await?;
    assert!(committed(&old_ledger.credit(2, 2_000, "c4").await?));
    let b_order = order(&old, "gift-b", 2, "rocket").await?;
    pay(&old, &b_order, 2, 1_000).await?;
    assert!(committed(&old_ledger.refund(&c_order).await?));
    pay(&old, &e_order, 2, 50).await?;
    let d_order = order(&old, "gift-d", 1, "rose").await?;
    // The new primary takes traffic of its own meanwhile (not lost, not reported).
    let new_ledger = Ledger::new(new.clone(), Traffic::Real, 2);
    assert!(committed(&new_ledger.credit(1, 7, "c-new").await?));

    phase("the report: exactly the entries on old and not on new");
    let report = lost::lost_report(&old, &new, Traffic::Real, 0).await?;
    let keys: BTreeSet<&str> = report
        .entries
        .iter()
        .map(|e| e.idempotency_key.as_str())
        .collect();
    let debit_a = format!("debit:{a_order}");
    let debit_b = format!("debit:{b_order}");
    let debit_e = format!("debit:{e_order}");
    let refund_c = format!("refund:{c_order}");
    let expected: BTreeSet<&str> = [
        "credit:c3",
        debit_a.as_str(),
        "credit:c4",
        debit_b.as_str(),
        refund_c.as_str(),
        debit_e.as_str(),
    ]
    .into();
    assert_eq!(keys, expected);
    assert_eq!(report.scanned, 9, "3 shared + 6 lost entries past seq 0");
    assert_eq!(report.by_kind["credit"].count, 2);
    assert_eq!(report.by_kind["credit"].amount, 2_300);
    assert_eq!(report.by_kind["debit"].count, 3);
    assert_eq!(report.by_kind["debit"].amount, 1_100);
    assert_eq!(report.by_kind["refund"].amount, 50);
    let user2 = report.by_user.iter().find(|u| u.user_id == 2).unwrap();
    assert_eq!(user2.balance_delta, 2_000 - 1_000 - 50);
    let lost_orders: BTreeSet<(&str, bool)> = report
        .orders
        .iter()
        .map(|o| (o.order_id.as_str(), o.lost_debit))
        .collect();
    assert_eq!(
        lost_orders,
        [
            (a_order.as_str(), true),
            (b_order.as_str(), true),
            (d_order.as_str(), false)
        ]
        .into(),
        "E and C are on new; D has no debit"
    );
    let from_promotion = lost::lost_report(&old, &new, Traffic::Real, promotion_seq).await?;
    assert_eq!(from_promotion.entries, report.entries);
    assert_eq!(from_promotion.scanned, 6);
    let text = lost::render_report(&report);
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    assert!(text.contains(&debit_b), "{text}");
    eprintln!("{text}");
    let json = serde_json::to_value(&report)?;
    assert_eq!(json["entries"].as_array().map(Vec::len), Some(6));
    let shadow = lost::lost_report(&old, &new, Traffic::Shadow, 0).await?;
    assert!(shadow.entries.is_empty() && shadow.scanned == 0);

    phase("reapply a lost credit: once, however often asked; another action refused");
    let balance1 = new_ledger.balance(1).await?.unwrap();
    let first = lost::compensate(
        &old,
        &new,
        Traffic::Real,
        "credit:c3",
        CompensationAction::Reapply,
        "alice",
        2,
    )
    .await?;
    assert!(!first.already_done, "{first:?}");
    let again = lost::compensate(
        &old,
        &new,
        Traffic::Real,
        "credit:c3",
        CompensationAction::Reapply,
        "bob",
        2,
    )
    .await?;
    assert!(again.already_done);
    assert_eq!(again.record, first.record);
    assert_eq!(again.record.operator, "alice");
    assert_eq!(new_ledger.balance(1).await?, Some(balance1 + 300));
    assert_eq!(
        scalar(
            &new,
            "SELECT count(*) FROM wallet.ledger WHERE idempotency_key = 'credit:c3' AND epoch = 2"
        )
        .await?,
        1
    );
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:c3",
            CompensationAction::Refund,
            "carol",
            2,
        )
        .await,
        "already compensated with reapply",
    );

    phase("refusals record nothing: stale epoch, not lost, unknown key, insufficient funds");
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:c4",
            CompensationAction::Reapply,
            "alice",
            1,
        )
        .await,
        "stale fencing epoch",
    );
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:c1",
            CompensationAction::Reapply,
            "alice",
            2,
        )
        .await,
        "not lost",
    );
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:nope",
            CompensationAction::Reapply,
            "alice",
            2,
        )
        .await,
        "no ledger entry",
    );
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            &debit_b,
            CompensationAction::Reapply,
            "alice",
            2,
        )
        .await,
        "insufficient funds",
    );
    assert_eq!(
        status(&new, &b_order).await?,
        None,
        "the order copy rolled back too"
    );
    assert_eq!(
        scalar(&new, "SELECT count(*) FROM wallet.compensations").await?,
        1
    );

    phase("reapply a lost debit: the order copied, debited, paid with its outbox events");
    let balance1 = new_ledger.balance(1).await?.unwrap();
    let done = lost::compensate(
        &old,
        &new,
        Traffic::Real,
        &debit_a,
        CompensationAction::Reapply,
        "alice",
        2,
    )
    .await?;
    assert!(
        done.record.note.contains("order copied"),
        "{:?}",
        done.record
    );
    assert_eq!(status(&new, &a_order).await?.as_deref(), Some("paid"));
    assert_eq!(new_ledger.balance(1).await?, Some(balance1 - 50));
    assert_eq!(
        scalar(&new, &format!("SELECT count(*) FROM orders.outbox WHERE order_id = '{a_order}' AND processed_at IS NULL")).await?,
        2
    );
    assert_eq!(
        scalar(
            &new,
            "SELECT count(*) FROM orders.gift_orders WHERE idempotency_key = 'gift-a'"
        )
        .await?,
        1,
        "same client key"
    );

    phase("concurrent reapplies of one credit: one effect");
    let balance2 = new_ledger.balance(2).await?.unwrap();
    let (x, y) = tokio::join!(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:c4",
            CompensationAction::Reapply,
            "alice",
            2
        ),
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            "credit:c4",
            CompensationAction::Reapply,
            "bob",
            2
        ),
    );
    let (x, y) = (x?, y?);
    assert_eq!(
        [x.already_done, y.already_done]
            .iter()
            .filter(|d| !**d)
            .count(),
        1,
        "{x:?} {y:?}"
    );
    assert_eq!(new_ledger.balance(2).await?, Some(balance2 + 2_000));

    phase("refund a lost debit: the customer keeps the money; a created order is rejected");
    let balance2 = new_ledger.balance(2).await?.unwrap();
    let refund_e = lost::compensate(
        &old,
        &new,
        Traffic::Real,
        &debit_e,
        CompensationAction::Refund,
        "alice",
        2,
    )
    .await?;
    assert!(!refund_e.already_done);
    assert_eq!(status(&new, &e_order).await?.as_deref(), Some("rejected"));
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM orders.gift_orders WHERE order_id = $1")
            .bind(&e_order)
            .fetch_one(&new)
            .await?;
    assert_eq!(reason, lost::REFUNDED_REASON);
    assert_eq!(
        new_ledger.balance(2).await?,
        Some(balance2),
        "no money moved"
    );
    let refund_b = lost::compensate(
        &old,
        &new,
        Traffic::Real,
        &debit_b,
        CompensationAction::Refund,
        "alice",
        2,
    )
    .await?;
    assert!(
        refund_b.record.note.contains("not on the new primary"),
        "{:?}",
        refund_b.record
    );
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            &debit_b,
            CompensationAction::Reapply,
            "alice",
            2,
        )
        .await,
        "already compensated with refund",
    );

    phase("reapply a lost refund: the money goes back on new too; refund of it is refused");
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            &refund_c,
            CompensationAction::Refund,
            "alice",
            2,
        )
        .await,
        "use reapply",
    );
    phase("an expired lease on new refuses a compensation and records nothing");
    sqlx::query("UPDATE wallet.fencing SET lease_until = clock_timestamp() - interval '1 second'")
        .execute(&new)
        .await?;
    refused(
        lost::compensate(
            &old,
            &new,
            Traffic::Real,
            &refund_c,
            CompensationAction::Reapply,
            "alice",
            2,
        )
        .await,
        "lease has expired",
    );
    sqlx::query("UPDATE wallet.fencing SET lease_until = NULL")
        .execute(&new)
        .await?;
    let balance1 = new_ledger.balance(1).await?.unwrap();
    lost::compensate(
        &old,
        &new,
        Traffic::Real,
        &refund_c,
        CompensationAction::Reapply,
        "alice",
        2,
    )
    .await?;
    assert_eq!(new_ledger.balance(1).await?, Some(balance1 + 50));

    phase("the report afterwards: only the refunded debits remain, marked compensated");
    let after = lost::lost_report(&old, &new, Traffic::Real, 0).await?;
    let left: BTreeSet<(&str, Option<&str>)> = after
        .entries
        .iter()
        .map(|e| (e.idempotency_key.as_str(), e.compensated.as_deref()))
        .collect();
    assert_eq!(
        left,
        [
            (debit_b.as_str(), Some("refund")),
            (debit_e.as_str(), Some("refund"))
        ]
        .into()
    );
    assert_eq!(
        scalar(&new, "SELECT count(*) FROM wallet.compensations").await?,
        6
    );
    lab.down().await?;
    Ok(())
}

/// A measurement, not a check run by default: the report on a big ledger (200,000 entries on
/// the old primary, 2,000 of them missing on the new one). `cargo nextest run -p
/// gift-services --run-ignored only -E 'test(big_ledger)'`.
#[tokio::test]
#[ignore = "a measurement (about a minute)"]
async fn e2e_lost_report_on_a_big_ledger() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-lost-big-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let url = lab.describe().endpoints.postgres["a"].clone();
    let admin = connect(&url).await?;
    let base = url.rsplit_once('/').context("db url")?.0.to_string();
    for db in ["big_old", "big_new"] {
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await?;
    }
    let old = connect(&format!("{base}/big_old")).await?;
    let new = connect(&format!("{base}/big_new")).await?;
    let (total, lost) = (200_000i64, 2_000i64);
    for (pool, n) in [(&old, total), (&new, total - lost)] {
        gift_services::migrate(pool).await?;
        sqlx::query(
            "INSERT INTO wallet.accounts (user_id, balance) \
             SELECT u, 1000000 FROM generate_series(1, 1000) u",
        )
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO wallet.ledger (user_id, kind, amount, idempotency_key, epoch) \
             SELECT 1 + i % 1000, 'credit', 1 + i % 97, 'credit:k' || i, 1 \
             FROM generate_series(1, $1) i",
        )
        .bind(n)
        .execute(pool)
        .await?;
        sqlx::query("ANALYZE").execute(pool).await?;
    }
    let started = std::time::Instant::now();
    let report = lost::lost_report(&old, &new, Traffic::Real, 0).await?;
    let elapsed = started.elapsed();
    assert_eq!(report.entries.len() as i64, lost);
    assert_eq!(report.scanned as i64, total);
    eprintln!(
        "lost_report: {total} entries scanned, {lost} lost, in {elapsed:?} ({:.0} entries/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    let started = std::time::Instant::now();
    let report = lost::lost_report(&old, &new, Traffic::Real, total - 10_000).await?;
    eprintln!(
        "lost_report from seq {}: {} scanned in {:?}",
        total - 10_000,
        report.scanned,
        started.elapsed()
    );
    lab.down().await?;
    Ok(())
}
