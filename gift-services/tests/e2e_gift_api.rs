//! gift-api end to end in the lab: both sites' gift-api and wallet processes on the real
//! PostgreSQL primary (site a) and replica (site b), driven over HTTP.
//!
//! The room effect service is the one thing not built here: each test that needs it runs a
//! small HTTP effect endpoint in the test process that refuses some orders for good (so the
//! saga must refund them) and fails others once (so the outbox must retry).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drills::lab::{Lab, LabOptions};
use futures::StreamExt;
use gift_services::Traffic;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

struct Env {
    _dir: tempfile::TempDir,
    lab: Lab,
    pool: PgPool,
    http: reqwest::Client,
    a: String,
    b: String,
}

/// What the in-test effect endpoint does with an order, decided by the order id's last hex
/// digit: `0` refused for good (422), `1` fails the first time (503), else delivered.
#[derive(Default)]
struct EffectLog {
    attempts: HashMap<String, u32>,
}

async fn effect_endpoint() -> Result<(String, Arc<Mutex<EffectLog>>)> {
    let log = Arc::new(Mutex::new(EffectLog::default()));
    let listener = tokio::net::TcpListener::bind("127.0.3.9:0").await?;
    let url = format!("http://{}/effects", listener.local_addr()?);
    let state = log.clone();
    let app = axum::Router::new().route(
        "/effects",
        axum::routing::post(move |body: axum::Json<Value>| {
            let state = state.clone();
            async move {
                let order = body["order_id"].as_str().unwrap_or_default().to_string();
                let mut log = state.lock().unwrap();
                let attempts = log.attempts.entry(order.clone()).or_insert(0);
                *attempts += 1;
                match order.chars().last() {
                    Some('0') => axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    Some('1') if *attempts == 1 => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    _ => axum::http::StatusCode::OK,
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, log))
}

async fn start(effect_url: Option<&str>) -> Result<Env> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-gift-api-")
        .tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path());
    if let Some(url) = effect_url {
        options
            .gift_api_env
            .push(("GIFT_API_EFFECT_URL".into(), url.into()));
    }
    let lab = Lab::start(options).await?;
    let endpoints = lab.describe().endpoints.clone();
    let url = endpoints.postgres.get("a").context("postgres a")?.clone();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await?;
    Ok(Env {
        _dir: dir,
        lab,
        pool,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        a: endpoints.gift_api.get("a").context("gift-api a")?.clone(),
        b: endpoints.gift_api.get("b").context("gift-api b")?.clone(),
    })
}

impl Env {
    async fn post(
        &self,
        base: &str,
        path: &str,
        body: Value,
        shadow: bool,
    ) -> Result<(u16, Value)> {
        let mut request = self.http.post(format!("{base}{path}")).json(&body);
        if shadow {
            request = request.header("x-shadow", "1");
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    async fn get(&self, base: &str, path: &str, shadow: bool) -> Result<(u16, Value)> {
        let mut request = self.http.get(format!("{base}{path}"));
        if shadow {
            request = request.header("x-shadow", "1");
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    async fn scalar(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    async fn top_up(&self, user: i64, amount: i64, key: &str, shadow: bool) -> Result<()> {
        let (status, body) = self
            .post(
                &self.a,
                &format!("/v1/wallet/{user}/topup"),
                json!({"amount": amount, "idempotency_key": key}),
                shadow,
            )
            .await?;
        if status != 200 {
            bail!("top-up of user {user}: {status} {body}");
        }
        Ok(())
    }

    /// Waits until the outbox of `traffic` has nothing left to process.
    async fn drain_outbox(&self, traffic: Traffic) -> Result<()> {
        let sql = format!(
            "SELECT count(*) FROM {}.outbox WHERE processed_at IS NULL",
            traffic.orders_schema()
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = self.scalar(&sql).await?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{left} outbox events still unprocessed after 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Row counts of every table of `traffic`, to prove that something wrote nothing.
    async fn footprint(&self, traffic: Traffic) -> Result<Vec<(String, i64)>> {
        let (o, w, s) = (
            traffic.orders_schema(),
            traffic.wallet_schema(),
            traffic.settlement_schema(),
        );
        let mut counts = Vec::new();
        for table in [
            format!("{o}.gift_orders"),
            format!("{o}.outbox"),
            format!("{o}.leaderboard"),
            format!("{w}.accounts"),
            format!("{w}.ledger"),
            format!("{s}.income"),
            format!("{s}.credits"),
            format!("{s}.reversals"),
        ] {
            let n = self
                .scalar(&format!("SELECT count(*) FROM {table}"))
                .await?;
            counts.push((table, n));
        }
        counts.push((
            format!("{w}.balances"),
            self.scalar(&format!(
                "SELECT coalesce(sum(balance), 0)::bigint FROM {w}.accounts"
            ))
            .await?,
        ));
        Ok(counts)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_one_key_retried_concurrently_through_both_sites() -> Result<()> {
    let env = start(None).await?;
    env.top_up(1, 10_000, "init-1", false).await?;

    phase("the same send, 20 times at once, half through each site");
    let body = json!({"user_id": 1, "streamer_id": 2, "gift_id": "heart", "count": 3, "idempotency_key": "same-key"});
    let sends = (0..20).map(|i| {
        let base = if i % 2 == 0 { &env.a } else { &env.b };
        env.post(base, "/v1/gifts", body.clone(), false)
    });
    let results = futures::future::join_all(sends).await;
    let mut order_ids = Vec::new();
    for r in results {
        let (status, body) = r?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["amount"], 150);
        order_ids.push(body["order_id"].as_str().unwrap().to_string());
    }
    order_ids.dedup();
    assert_eq!(order_ids.len(), 1, "one order for one key: {order_ids:?}");
    let order = &order_ids[0];
    assert_eq!(
        env.scalar("SELECT count(*) FROM orders.gift_orders WHERE idempotency_key = 'same-key'")
            .await?,
        1
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM wallet.ledger WHERE order_id = '{order}' AND kind = 'debit'"
        ))
        .await?,
        1
    );
    assert_eq!(
        env.scalar("SELECT balance FROM wallet.accounts WHERE user_id = 1")
            .await?,
        10_000 - 150
    );

    phase("the order is delivered and settled, readable from both sites");
    env.drain_outbox(Traffic::Real).await?;
    for base in [&env.a, &env.b] {
        let (status, body) = env.get(base, &format!("/v1/orders/{order}"), false).await?;
        assert_eq!(status, 200);
        assert_eq!(body["status"], "delivered");
    }
    assert_eq!(
        env.scalar("SELECT balance FROM settlement.income WHERE streamer_id = 2")
            .await?,
        150
    );

    phase("site b reads the balance from its replica and says how stale");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = env.get(&env.b, "/v1/wallet/1", false).await?;
        assert_eq!(status, 200);
        assert_eq!(body["source"], "replica");
        assert!(body["staleness_ms"].is_i64() || body["staleness_ms"].is_null());
        if body["balance"] == 10_000 - 150 {
            break;
        }
        assert!(Instant::now() < deadline, "replica never caught up: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, strong) = env
        .get(&env.b, "/v1/wallet/1?consistency=strong", false)
        .await?;
    assert_eq!(strong["source"], "primary");
    assert_eq!(strong["balance"], 10_000 - 150);

    phase("near-real-time reconciliation: JSON per run, metrics, clean stop on SIGTERM");
    let db = env
        .lab
        .describe()
        .endpoints
        .postgres
        .get("a")
        .unwrap()
        .clone();
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.1.9:0")?;
        l.local_addr()?
    };
    let watcher = std::process::Command::new(env!("CARGO_BIN_EXE_reconcile"))
        .args([
            "--database-url",
            &db,
            "--watch",
            "--interval-secs",
            "1",
            "--grace-secs",
            "0",
            "--window-secs",
            "60",
        ])
        .args(["--metrics-addr", &metrics_addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let text = match env
            .http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains("reconcile_runs_total{check=\"clean\"} 2") {
            break text;
        }
        assert!(Instant::now() < deadline, "no two clean runs: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(metrics.contains("reconcile_money_conserved 1"), "{metrics}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(watcher.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let output = tokio::task::spawn_blocking(move || watcher.wait_with_output()).await??;
    assert_eq!(output.status.code(), Some(0));
    let first: Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .context("a JSON line")?,
    )?;
    assert_eq!(first["mismatch_count"], 0);
    assert_eq!(first["scope"]["window_secs"], 60);
    assert_eq!(first["conservation"]["conserved"], true);

    phase("gift-api deregisters on SIGTERM");
    let etcd_b = env.lab.describe().endpoints.etcd.get("b").unwrap().clone();
    let mut etcd = etcd_client::Client::connect([etcd_b.as_str()], None).await?;
    let key = "/services/gift-api/b/gift-api-b";
    assert_eq!(etcd.get(key, None).await?.kvs().len(), 1);
    let mut lab = env.lab;
    lab.stop("gift-api-b").await?;
    assert!(etcd.get(key, None).await?.kvs().is_empty());
    let log = std::fs::read_to_string(&lab.process("gift-api-b").unwrap().log)?;
    assert!(log.contains("gift-api stopped cleanly"), "{log}");
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_ten_thousand_operations_reconcile_to_zero() -> Result<()> {
    let (effect_url, effects) = effect_endpoint().await?;
    let env = start(Some(&effect_url)).await?;
    let users = 200i64;
    let mut top_ups = 0i64;
    phase("set-up: 200 users with 5,000 each");
    for user in 1..=users {
        env.top_up(user, 5_000, &format!("init-{user}"), false)
            .await?;
        top_ups += 5_000;
    }

    phase("10,000 random operations, 32 at a time, through both sites");
    let mut rng = StdRng::seed_from_u64(20261124);
    let gifts = ["rose", "heart", "rocket"];
    let mut ops = Vec::new();
    for i in 0..10_000u32 {
        let base = if rng.random_bool(0.5) { &env.a } else { &env.b };
        let user = rng.random_range(1..=users);
        let roll = rng.random_range(0..100);
        let op = if roll < 80 {
            let key = if roll < 5 && i > 0 {
                // A retry of an earlier send.
                format!("send-{}", rng.random_range(0..i))
            } else {
                format!("send-{i}")
            };
            let seed = key.clone();
            // The request of an earlier key must be the same: derive it from the key.
            let mut krng =
                StdRng::seed_from_u64(seed.bytes().fold(7u64, |h, b| h * 31 + u64::from(b)));
            let sender = krng.random_range(1..=users);
            (
                base.clone(),
                "/v1/gifts".to_string(),
                json!({"user_id": sender, "streamer_id": 10_000 + krng.random_range(1..=20),
                       "gift_id": gifts[krng.random_range(0..gifts.len())],
                       "count": krng.random_range(1..=3), "idempotency_key": key}),
            )
        } else {
            let amount = rng.random_range(1..=2_000);
            (
                base.clone(),
                format!("/v1/wallet/{user}/topup"),
                json!({"amount": amount, "idempotency_key": format!("topup-{i}")}),
            )
        };
        ops.push(op);
    }
    let started = Instant::now();
    let results: Vec<Result<(String, Value, u16, Value)>> = futures::stream::iter(ops)
        .map(|(base, path, body)| {
            let env = &env;
            async move {
                let (status, reply) = env.post(&base, &path, body.clone(), false).await?;
                Ok((path, body, status, reply))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    eprintln!("10,000 operations in {:?}", started.elapsed());
    let mut by_status: HashMap<(bool, u16), u32> = HashMap::new();
    for r in results {
        let (path, body, status, reply) = r?;
        let send = path == "/v1/gifts";
        *by_status.entry((send, status)).or_default() += 1;
        match (send, status) {
            (_, 200) => {
                if !send && reply["duplicate"] == false {
                    top_ups += body["amount"].as_i64().unwrap();
                }
            }
            (true, 422) => assert_eq!(reply["error"]["code"], "insufficient_funds", "{reply}"),
            _ => panic!("{path} {body}: {status} {reply}"),
        }
    }
    eprintln!("results (send?, status): {by_status:?}");
    assert!(
        by_status.get(&(true, 422)).copied().unwrap_or(0) > 0,
        "some sends overdraw"
    );

    phase("the outbox drains: every order settled, delivered or refunded");
    env.drain_outbox(Traffic::Real).await?;
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM orders.gift_orders GROUP BY status ORDER BY status",
    )
    .fetch_all(&env.pool)
    .await?;
    eprintln!("orders by status: {statuses:?}");
    let count = |s: &str| statuses.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
    assert!(
        count("refunded") > 0,
        "effects refused for good were refunded"
    );
    assert!(count("delivered") > 0);
    assert_eq!(count("paid") + count("created") + count("failed"), 0);
    let refused = effects
        .lock()
        .unwrap()
        .attempts
        .keys()
        .filter(|o| o.ends_with('0'))
        .count();
    assert_eq!(i64::try_from(refused)?, count("refunded"));

    phase("batch reconciliation: zero mismatches, money conserved");
    let report = gift_services::reconcile::run(&env.pool, Traffic::Real, None, 0, None).await?;
    assert!(
        report.is_clean(),
        "{}",
        serde_json::to_string_pretty(&report)?
    );
    assert_eq!(report.conservation.top_ups, top_ups);
    assert_eq!(report.conservation.in_transit, 0);
    assert_eq!(
        report.conservation.top_ups,
        report.conservation.balances + report.conservation.streamer_income
    );

    phase("and the reconciler finds a planted mismatch, and repairs a safe one");
    // A failed order whose refund never happened: the safe mismatch.
    let victim: String = sqlx::query_scalar(
        "SELECT order_id FROM orders.gift_orders WHERE status = 'delivered' LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await?;
    sqlx::query("UPDATE orders.gift_orders SET status = 'failed', updated_at = now() - interval '1 hour' WHERE order_id = $1")
        .bind(&victim)
        .execute(&env.pool)
        .await?;
    let reconcile = env!("CARGO_BIN_EXE_reconcile");
    let db = env
        .lab
        .describe()
        .endpoints
        .postgres
        .get("a")
        .unwrap()
        .clone();
    let wallets: Vec<String> = env
        .lab
        .describe()
        .endpoints
        .wallet
        .values()
        .cloned()
        .collect();
    let found = std::process::Command::new(reconcile)
        .args(["--database-url", &db, "--json"])
        .output()?;
    assert_eq!(
        found.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let json_report: Value = serde_json::from_slice(&found.stdout)?;
    assert_eq!(json_report["mismatch_count"], 1);
    assert_eq!(
        json_report["mismatches"][0]["check"],
        "failed_without_refund"
    );
    let repaired = std::process::Command::new(reconcile)
        .args(["--database-url", &db, "--repair", "--wallet", &wallets[0]])
        .output()?;
    assert_eq!(
        repaired.status.code(),
        Some(2),
        "{}{}",
        String::from_utf8_lossy(&repaired.stdout),
        String::from_utf8_lossy(&repaired.stderr)
    );
    let after = std::process::Command::new(reconcile)
        .args(["--database-url", &db])
        .output()?;
    assert_eq!(
        after.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM wallet.ledger WHERE order_id = '{victim}' AND kind = 'refund'"
        ))
        .await?,
        1
    );
    env.lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_shadow_traffic_never_touches_real_tables() -> Result<()> {
    let (effect_url, _effects) = effect_endpoint().await?;
    let env = start(Some(&effect_url)).await?;
    env.top_up(1, 1_000, "real-init", false).await?;
    let real_before = env.footprint(Traffic::Real).await?;

    phase("shadow top-ups and sends through both sites, end to end");
    for user in 1..=5 {
        env.top_up(user, 100_000, &format!("shadow-init-{user}"), true)
            .await?;
    }
    let mut orders = Vec::new();
    for i in 0..100 {
        let base = if i % 2 == 0 { &env.a } else { &env.b };
        let (status, body) = env
            .post(
                base,
                "/v1/gifts",
                json!({"user_id": 1 + i % 5, "streamer_id": 77, "gift_id": "rocket", "count": 1, "idempotency_key": format!("shadow-{i}")}),
                true,
            )
            .await?;
        assert_eq!(status, 200, "{body}");
        orders.push(body["order_id"].as_str().unwrap().to_string());
    }
    env.drain_outbox(Traffic::Shadow).await?;

    phase("the real tables are byte for byte as before; the shadow ones hold it all");
    assert_eq!(env.footprint(Traffic::Real).await?, real_before);
    assert_eq!(
        env.scalar("SELECT count(*) FROM shadow_orders.gift_orders")
            .await?,
        100
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM shadow_orders.gift_orders WHERE status IN ('delivered', 'refunded')")
            .await?,
        100
    );
    assert!(
        env.scalar("SELECT count(*) FROM shadow_settlement.credits")
            .await?
            == 100
    );
    let (status, _) = env
        .get(&env.a, &format!("/v1/orders/{}", orders[0]), true)
        .await?;
    assert_eq!(status, 200);
    let (status, _) = env
        .get(&env.a, &format!("/v1/orders/{}", orders[0]), false)
        .await?;
    assert_eq!(status, 404, "a shadow order is invisible to real reads");
    let shadow = gift_services::reconcile::run(&env.pool, Traffic::Shadow, None, 0, None).await?;
    assert!(
        shadow.is_clean(),
        "{}",
        serde_json::to_string_pretty(&shadow)?
    );
    assert_eq!(shadow.conservation.top_ups, 500_000);
    env.lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_stale_epoch_and_dead_wallets_charge_nobody() -> Result<()> {
    let env = start(None).await?;
    env.top_up(1, 1_000, "init", false).await?;

    phase("a promotion elsewhere wrote epoch 2: the epoch-1 wallets commit nothing");
    sqlx::query("UPDATE wallet.fencing SET epoch = 2")
        .execute(&env.pool)
        .await?;
    let before = env.footprint(Traffic::Real).await?;
    let (status, body) = env
        .post(&env.a, "/v1/gifts", json!({"user_id": 1, "streamer_id": 2, "gift_id": "rose", "count": 1, "idempotency_key": "stale-1"}), false)
        .await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "payments_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stale fencing epoch"),
        "{body}"
    );
    let (status, body) = env
        .post(
            &env.b,
            "/v1/wallet/1/topup",
            json!({"amount": 5, "idempotency_key": "stale-topup"}),
            false,
        )
        .await?;
    assert_eq!(status, 503, "{body}");
    let after = env.footprint(Traffic::Real).await?;
    // Only the order row itself (status created, nobody charged) is new.
    let diff: Vec<_> = before.iter().zip(&after).filter(|(x, y)| x != y).collect();
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(diff[0].0 .0, "orders.gift_orders");
    assert_eq!(
        env.scalar("SELECT count(*) FROM orders.gift_orders WHERE idempotency_key = 'stale-1' AND status = 'created'")
            .await?,
        1
    );

    phase("epoch back: the same key completes the order, charged once");
    sqlx::query("UPDATE wallet.fencing SET epoch = 1")
        .execute(&env.pool)
        .await?;
    let (status, body) = env
        .post(&env.a, "/v1/gifts", json!({"user_id": 1, "streamer_id": 2, "gift_id": "rose", "count": 1, "idempotency_key": "stale-1"}), false)
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        env.scalar("SELECT balance FROM wallet.accounts WHERE user_id = 1")
            .await?,
        990
    );

    phase("both wallets killed: sends fail fast with a clear error, nobody is charged");
    let mut lab = env.lab;
    lab.kill("wallet-a")?;
    lab.kill("wallet-b")?;
    let started = Instant::now();
    let (status, body) = {
        let response = env
            .http
            .post(format!("{}/v1/gifts", env.a))
            .json(&json!({"user_id": 1, "streamer_id": 2, "gift_id": "rose", "count": 1, "idempotency_key": "down-1"}))
            .send()
            .await?;
        (response.status().as_u16(), response.json::<Value>().await?)
    };
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "payments_unavailable");
    eprintln!("wallet down → answer in {took:?}");
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM wallet.accounts WHERE user_id = 1")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(balance, 990);
    // Reads that do not need the wallet keep working.
    let response = env.http.get(format!("{}/v1/catalog", env.b)).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_bad_input_is_a_clear_4xx_and_writes_nothing() -> Result<()> {
    let env = start(None).await?;
    env.top_up(1, 1_000, "init", false).await?;
    let before = env.footprint(Traffic::Real).await?;
    let ok = json!({"user_id": 1, "streamer_id": 2, "gift_id": "rose", "count": 1, "idempotency_key": "k"});
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body.to_string()
    };
    let without_key = {
        let mut body = ok.clone();
        body.as_object_mut().unwrap().remove("idempotency_key");
        body.to_string()
    };
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"user_id\": 1,".into(),
            None,
            400,
            "invalid_json",
        ),
        ("not an object", "[1,2]".into(), None, 400, "invalid_json"),
        (
            "zero count",
            with("count", json!(0)),
            None,
            400,
            "invalid_request",
        ),
        (
            "negative count",
            with("count", json!(-5)),
            None,
            400,
            "invalid_request",
        ),
        (
            "huge count",
            with("count", json!(10_001)),
            None,
            400,
            "invalid_request",
        ),
        (
            "count beyond i64",
            with("count", json!(1e30)),
            None,
            400,
            "invalid_json",
        ),
        (
            "count as text",
            with("count", json!("3")),
            None,
            400,
            "invalid_json",
        ),
        (
            "unknown gift",
            with("gift_id", json!("unicorn")),
            None,
            422,
            "unknown_gift",
        ),
        (
            "bad gift id",
            with("gift_id", json!("x y")),
            None,
            400,
            "invalid_request",
        ),
        (
            "missing key",
            without_key,
            None,
            400,
            "missing_idempotency_key",
        ),
        (
            "empty key",
            with("idempotency_key", json!("")),
            None,
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            with("colour", json!("red")),
            None,
            400,
            "invalid_json",
        ),
        (
            "negative user",
            with("user_id", json!(-1)),
            None,
            400,
            "invalid_request",
        ),
        (
            "gift to oneself",
            with("streamer_id", json!(1)),
            None,
            400,
            "invalid_request",
        ),
        (
            "oversized body",
            with("gift_id", json!("r".repeat(40_000))),
            None,
            413,
            "body_too_large",
        ),
        (
            "wrong content type",
            ok.to_string(),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, body, content_type, status, code) in cases {
        let response = env
            .http
            .post(format!("{}/v1/gifts", env.a))
            .header("content-type", content_type.unwrap_or("application/json"))
            .body(body)
            .send()
            .await?;
        let got = response.status().as_u16();
        let reply: Value = response.json().await.with_context(|| what.to_string())?;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{what}: {reply}");
        assert!(
            !reply["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    let response = env
        .http
        .post(format!("{}/v1/gifts", env.a))
        .header("x-shadow", "maybe")
        .json(&ok)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    for (path, body) in [
        (
            "/v1/wallet/1/topup",
            json!({"amount": 0, "idempotency_key": "t"}),
        ),
        (
            "/v1/wallet/1/topup",
            json!({"amount": -10, "idempotency_key": "t"}),
        ),
        ("/v1/wallet/1/topup", json!({"amount": 10})),
        (
            "/v1/wallet/abc/topup",
            json!({"amount": 10, "idempotency_key": "t"}),
        ),
    ] {
        let (status, reply) = env.post(&env.a, path, body.clone(), false).await?;
        assert_eq!(status, 400, "{path} {body}: {reply}");
    }
    let (status, _) = env.get(&env.a, "/v1/wallet/0", false).await?;
    assert_eq!(status, 400);
    let (status, _) = env
        .get(&env.a, "/v1/wallet/1?consistency=sometimes", false)
        .await?;
    assert_eq!(status, 400);
    let (status, reply) = env.get(&env.a, "/v1/orders/o-unknown", false).await?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("order_not_found"))
    );
    assert_eq!(
        env.footprint(Traffic::Real).await?,
        before,
        "bad input wrote something"
    );

    phase("a key reused for a different gift is refused");
    let (status, _) = env.post(&env.a, "/v1/gifts", ok.clone(), false).await?;
    assert_eq!(status, 200);
    let (status, reply) = env
        .post(
            &env.b,
            "/v1/gifts",
            serde_json::from_str(&with("count", json!(2)))?,
            false,
        )
        .await?;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(reply["error"]["code"], "idempotency_key_reused");

    phase("bad configuration: exit 64 naming the key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gift-api"))
        .env("GIFT_API_SITE", "a")
        .env("GIFT_API_LISTEN_ADDR", "127.0.1.5:0")
        .env("GIFT_API_DATABASE_URL", "mysql://nope")
        .env("GIFT_API_WALLET_ENDPOINTS", "[\"127.0.1.4:1\"]")
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database_url"));
    env.lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gift_api_killed_mid_traffic_loses_nothing() -> Result<()> {
    let mut env = start(None).await?;
    for user in 1..=20 {
        env.top_up(user, 1_000_000, &format!("init-{user}"), false)
            .await?;
    }
    let send = |i: u32| {
        json!({"user_id": 1 + i % 20, "streamer_id": 500 + i % 7, "gift_id": "heart",
               "count": 1 + i % 3, "idempotency_key": format!("kill-{i}")})
    };

    phase("400 sends through site a, SIGKILL of gift-api-a in the middle");
    let a = env.a.clone();
    let http = env.http.clone();
    let traffic = tokio::spawn(async move {
        futures::stream::iter(0..400u32)
            .map(|i| {
                let http = http.clone();
                let a = a.clone();
                async move {
                    let result = http
                        .post(format!("{a}/v1/gifts"))
                        .json(&send(i))
                        .send()
                        .await;
                    let status = match result {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    (i, status)
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .scalar("SELECT count(*) FROM orders.gift_orders")
        .await?
        < 150
    {
        assert!(Instant::now() < deadline, "traffic did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.lab.kill("gift-api-a")?;
    let results = traffic.await?;
    let failed: Vec<u32> = results
        .iter()
        .filter(|(_, status)| *status != 200)
        .map(|(i, _)| *i)
        .collect();
    eprintln!("{} of 400 sends got no answer or an error", failed.len());
    assert!(!failed.is_empty(), "the kill should have cut some requests");

    phase("the clients retry the failed ones through site b with the same keys");
    for i in &failed {
        let (status, body) = env.post(&env.b, "/v1/gifts", send(*i), false).await?;
        assert_eq!(status, 200, "retry of kill-{i}: {body}");
    }

    phase("site b's worker takes over a's claimed events after their lease; nothing lost");
    env.drain_outbox(Traffic::Real).await?;
    assert_eq!(
        env.scalar("SELECT count(*) FROM orders.gift_orders WHERE idempotency_key LIKE 'kill-%'")
            .await?,
        400
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM orders.gift_orders WHERE idempotency_key LIKE 'kill-%' AND status = 'delivered'")
            .await?,
        400
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM wallet.ledger WHERE kind = 'debit'")
            .await?,
        400
    );
    let report = gift_services::reconcile::run(&env.pool, Traffic::Real, None, 0, None).await?;
    assert!(
        report.is_clean(),
        "{}",
        serde_json::to_string_pretty(&report)?
    );
    assert_eq!(report.conservation.in_transit, 0);
    env.lab.down().await?;
    Ok(())
}
