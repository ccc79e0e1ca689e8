//! The wallet and gift-api following the writer document in the lab's real etcd (site a):
//! a new (dsn, epoch) moves their writes to another database, older documents and garbage are
//! ignored, a pending wallet failover refuses every payment before touching a database (gift-api
//! answers 503 payments_unavailable and creates no order) while reads keep working, an expired
//! lease charges nobody, and the last document is kept while etcd is down.
//!
//! The two "primaries" are two databases of the lab's PostgreSQL (`gift` and `gift2`), each
//! with its own fencing row. The document lives at a key of the test's own, so the invoker's
//! publisher never touches it.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drills::lab::{Lab, LabOptions};
use gift_services::api::ApiConfig;
use gift_services::pb;
use gift_services::wallet_service::WalletConfig;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const KEY: &str = "/e2e/writers/wallet";

fn phase(name: &str) {
    eprintln!("--- {name}");
}

fn free_addr(host: &str) -> Result<String> {
    Ok(std::net::TcpListener::bind((host, 0))?
        .local_addr()?
        .to_string())
}

async fn pool(url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?)
}

async fn scalar(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Polls `f` until it gives `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> i64 {
    gift_services::writer::now_ms()
}

struct Env {
    _dir: tempfile::TempDir,
    lab: Lab,
    etcd: etcd_client::Client,
    http: reqwest::Client,
    url1: String,
    url2: String,
    db1: PgPool,
    db2: PgPool,
    wallet: pb::wallet_client::WalletClient<Channel>,
    wallet_metrics: String,
    api: String,
    stops: Vec<oneshot::Sender<()>>,
    served: Vec<tokio::task::JoinHandle<Result<(), gift_services::GiftError>>>,
}

impl Env {
    async fn publish(&mut self, doc: &Value) -> Result<()> {
        self.etcd.put(KEY, doc.to_string(), None).await?;
        Ok(())
    }

    async fn metric(&self, url: &str, name: &str) -> Result<Option<f64>> {
        // Not listening yet: no value yet.
        let Ok(response) = self.http.get(url).send().await else {
            return Ok(None);
        };
        let text = response.text().await?;
        Ok(text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok()))
    }

    async fn wait_epoch(&self, epoch: u64) -> Result<()> {
        let want = epoch as f64;
        let wallet = format!("http://{}/metrics", self.wallet_metrics);
        let api = format!("{}/metrics", self.api);
        eventually(
            &format!("both services on epoch {epoch}"),
            Duration::from_secs(15),
            || async {
                let w = self.metric(&wallet, "wallet_writer_epoch").await?;
                let a = self.metric(&api, "gift_api_writer_epoch").await?;
                Ok((w == Some(want) && a == Some(want)).then_some(()))
            },
        )
        .await
    }

    async fn credit(&self, user: i64, amount: i64, key: &str) -> Result<pb::WalletResult> {
        let mut wallet = self.wallet.clone();
        Ok(wallet
            .credit(pb::CreditRequest {
                user_id: user,
                amount,
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    async fn send_gift(&self, user: i64, key: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/gifts", self.api))
            .json(&json!({"user_id": user, "streamer_id": 900, "gift_id": "rose", "count": 1, "idempotency_key": key}))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(format!("{}{path}", self.api)).send().await?;
        Ok((r.status().as_u16(), r.json().await?))
    }
}

fn committed(r: &pb::WalletResult) -> bool {
    r.status == pb::ResultStatus::Committed as i32
}

async fn ledger_has(pool: &PgPool, key: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM wallet.ledger WHERE idempotency_key = $1)",
        )
        .bind(key)
        .fetch_one(pool)
        .await?,
    )
}

async fn order_by_key(pool: &PgPool, key: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM orders.gift_orders WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?,
    )
}

async fn start() -> Result<Env> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-writer-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let endpoints = lab.describe().endpoints.clone();
    let url1 = endpoints.postgres.get("a").context("postgres a")?.clone();
    let etcd_url = endpoints.etcd.get("a").context("etcd a")?.clone();
    let db1 = pool(&url1).await?;
    gift_services::migrate(&db1).await?;
    sqlx::query("CREATE DATABASE gift2").execute(&db1).await?;
    let url2 = format!("{}/gift2", url1.rsplit_once('/').context("db url")?.0);
    let db2 = pool(&url2).await?;
    gift_services::migrate(&db2).await?;
    // gift2 is the promoted database of epoch 2.
    sqlx::query("UPDATE wallet.fencing SET epoch = 2")
        .execute(&db2)
        .await?;
    let etcd = etcd_client::Client::connect([etcd_url.clone()], None).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let mut env = Env {
        _dir: dir,
        lab,
        etcd,
        http,
        url1,
        url2,
        db1,
        db2,
        wallet: pb::wallet_client::WalletClient::new(
            Channel::from_static("http://127.0.0.1:1").connect_lazy(),
        ),
        wallet_metrics: String::new(),
        api: String::new(),
        stops: Vec::new(),
        served: Vec::new(),
    };
    let doc1 = json!({"site": "a", "epoch": 1, "dsn": env.url1, "revision": 10, "failover_pending": null, "not_known_yet": [1, 2]});
    env.publish(&doc1).await?;

    phase("wallet and gift-api in-process, with writer_key and no database_url");
    let host = "127.0.1.21";
    let grpc = free_addr(host)?;
    let metrics = free_addr(host)?;
    let wallet_config: WalletConfig = serde_json::from_value(json!({
        "site": "a",
        "listen_addr": grpc,
        "metrics_addr": metrics,
        "writer_key": KEY,
        "etcd_endpoints": [etcd_url],
        "instance": "wallet-follow",
        "statement_timeout_ms": 2000,
    }))?;
    wallet_config.validate()?;
    let (stop, stopped) = oneshot::channel::<()>();
    env.stops.push(stop);
    env.served
        .push(tokio::spawn(gift_services::wallet_service::serve(
            wallet_config,
            async move {
                let _ = stopped.await;
            },
        )));
    let http_addr = free_addr(host)?;
    let api_config: ApiConfig = serde_json::from_value(json!({
        "site": "a",
        "listen_addr": http_addr,
        "wallet_endpoints": [grpc],
        "writer_key": KEY,
        "etcd_endpoints": [etcd_url],
        "instance": "gift-api-follow",
    }))?;
    api_config.validate()?;
    let (stop, stopped) = oneshot::channel::<()>();
    env.stops.push(stop);
    env.served.push(tokio::spawn(gift_services::api::serve(
        api_config,
        async move {
            let _ = stopped.await;
        },
    )));
    env.wallet = pb::wallet_client::WalletClient::new(
        Channel::from_shared(format!("http://{grpc}"))?.connect_lazy(),
    );
    env.wallet_metrics = metrics;
    env.api = format!("http://{http_addr}");
    Ok(env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_writer_follow_swaps_the_writer_and_refuses_while_pending() -> Result<()> {
    let mut env = start().await?;

    phase("the first document: writes go to gift (epoch 1)");
    env.wait_epoch(1).await?;
    let r = env.credit(7, 1_000, "k1").await?;
    assert!(committed(&r) && r.epoch == 1, "{r:?}");
    assert!(ledger_has(&env.db1, "credit:k1").await?);
    let (status, body) = env.send_gift(7, "g1").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(order_by_key(&env.db1, "g1").await?.as_deref(), Some("paid"));

    phase("a new writer (gift2, epoch 2): both services move their writes there");
    let doc2 = json!({"site": "b", "epoch": 2, "dsn": env.url2, "revision": 11});
    let published = Instant::now();
    env.publish(&doc2).await?;
    env.wait_epoch(2).await?;
    eprintln!(
        "writer switch seen by both services within {:?} of the put (50 ms polling)",
        published.elapsed()
    );
    let r = env.credit(7, 500, "k2").await?;
    assert!(committed(&r) && r.epoch == 2 && r.balance == 500, "{r:?}");
    assert!(ledger_has(&env.db2, "credit:k2").await?);
    assert!(!ledger_has(&env.db1, "credit:k2").await?);
    let (status, body) = env.send_gift(7, "g2").await?;
    assert_eq!(status, 200, "{body}");
    assert!(order_by_key(&env.db2, "g2").await?.is_some());
    assert!(order_by_key(&env.db1, "g2").await?.is_none());
    let g2_order = body["order_id"].as_str().context("order id")?.to_string();

    phase("an older document and a garbage one are ignored");
    env.publish(&json!({"site": "a", "epoch": 1, "dsn": env.url1, "revision": 12}))
        .await?;
    env.etcd.put(KEY, "{not json", None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = env.credit(7, 5, "k3").await?;
    assert!(committed(&r) && r.epoch == 2, "{r:?}");
    assert!(ledger_has(&env.db2, "credit:k3").await?);

    phase("a wallet failover pending: every payment refused before any database work");
    let pending = json!({"site": "b", "epoch": 2, "dsn": env.url2, "revision": 13,
                         "failover_pending": {"proposal": 7, "until_ms": now_ms() + 120_000}});
    env.publish(&pending).await?;
    let message = "payments temporarily unavailable: wallet failover pending (proposal 7)";
    // Probes that write nothing either way: a refund of an order never debited (no_debit, or
    // refused as pending), a gift of an unknown kind (422, or 503 as pending).
    eventually("both services see the pending failover", Duration::from_secs(10), || async {
        let mut wallet = env.wallet.clone();
        let wallet_pending = match wallet
            .refund(pb::RefundRequest {
                order_id: "o-never".into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().reason_code, "no_debit");
                false
            }
            Err(status) => status.message().contains("failover pending"),
        };
        let r = env
            .http
            .post(format!("{}/v1/gifts", env.api))
            .json(&json!({"user_id": 7, "streamer_id": 900, "gift_id": "nope", "count": 1, "idempotency_key": "probe"}))
            .send()
            .await?;
        Ok((wallet_pending && r.status().as_u16() == 503).then_some(()))
    })
    .await?;
    let entries = scalar(&env.db2, "SELECT count(*) FROM wallet.ledger").await?;
    let orders = scalar(&env.db2, "SELECT count(*) FROM orders.gift_orders").await?;
    let mut wallet = env.wallet.clone();
    let status = wallet
        .debit(pb::DebitRequest {
            order_id: "o-pending".into(),
            user_id: 7,
            amount: 10,
            ..Default::default()
        })
        .await
        .expect_err("a debit is refused while pending");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), message);
    assert!(
        status.metadata().get("x-outcome").is_none(),
        "a pending refusal is 'nothing happened', never unknown"
    );
    for result in [
        wallet
            .credit(pb::CreditRequest {
                user_id: 7,
                amount: 1,
                idempotency_key: "k-pending".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        wallet
            .refund(pb::RefundRequest {
                order_id: g2_order.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ] {
        let status = result.expect_err("refused while pending");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), message);
    }
    let balance = wallet
        .balance(pb::BalanceRequest {
            user_id: 7,
            shadow: false,
        })
        .await?
        .into_inner();
    // 500 (k2) - 10 (g2, a rose) + 5 (k3).
    assert_eq!(balance.balance, 495, "reads keep working");

    phase("gift-api answers 503 payments_unavailable, creates no order; reads work, ready");
    let (status, body) = env.send_gift(7, "g3").await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "payments_unavailable", "{body}");
    assert_eq!(body["error"]["message"], message, "{body}");
    assert!(order_by_key(&env.db2, "g3").await?.is_none());
    let r = env
        .http
        .post(format!("{}/v1/wallet/7/topup", env.api))
        .json(&json!({"amount": 5, "idempotency_key": "t-pending"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "payments_unavailable", "{body}");
    let (status, body) = env.get("/v1/wallet/7").await?;
    assert_eq!(
        (status, body["balance"].as_i64()),
        (200, Some(495)),
        "{body}"
    );
    let (status, _) = env.get("/v1/wallet/7?consistency=strong").await?;
    assert_eq!(status, 200);
    let (status, _) = env.get("/v1/catalog").await?;
    assert_eq!(status, 200);
    let (status, body) = env.get(&format!("/v1/orders/{g2_order}")).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = env.get("/readyz").await?;
    assert_eq!(status, 200, "readiness is about the instance: {body}");
    assert_eq!(
        scalar(&env.db2, "SELECT count(*) FROM wallet.ledger").await?,
        entries
    );
    assert_eq!(
        scalar(&env.db2, "SELECT count(*) FROM orders.gift_orders").await?,
        orders
    );
    let refused = env
        .metric(
            &format!("http://{}/metrics", env.wallet_metrics),
            "wallet_writes_refused_failover_pending_total",
        )
        .await?
        .unwrap_or(0.0);
    assert!(refused >= 3.0, "{refused}");

    phase("the proposal's time passes: payments work again");
    let over = json!({"site": "b", "epoch": 2, "dsn": env.url2, "revision": 14,
                      "failover_pending": {"proposal": 7, "until_ms": now_ms() - 1}});
    env.publish(&over).await?;
    let (status, body) = eventually("payments again", Duration::from_secs(10), || async {
        let (status, body) = env.send_gift(7, "g3").await?;
        Ok((status != 503).then_some((status, body)))
    })
    .await?;
    assert_eq!(status, 200, "{body}");

    phase("an expired lease on the writer's database: 503, nobody charged, order open");
    sqlx::query("UPDATE wallet.fencing SET lease_until = clock_timestamp() - interval '1 second'")
        .execute(&env.db2)
        .await?;
    let (status, body) = env.send_gift(7, "g4").await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "payments_unavailable", "{body}");
    let order_id = body["order_id"].as_str().context("order id")?.to_string();
    assert_eq!(
        order_by_key(&env.db2, "g4").await?.as_deref(),
        Some("created")
    );
    assert!(!ledger_has(&env.db2, &format!("debit:{order_id}")).await?);
    sqlx::query("UPDATE wallet.fencing SET lease_until = NULL")
        .execute(&env.db2)
        .await?;
    let (status, body) = env.send_gift(7, "g4").await?;
    assert_eq!(status, 200, "the retry with the same key pays once: {body}");
    assert_eq!(body["order_id"], order_id.as_str());

    phase("etcd down: the last document is kept; back up: a new writer is followed");
    env.lab.stop("etcd-a").await?;
    let r = env.credit(7, 5, "k-etcd-down").await?;
    assert!(committed(&r) && r.epoch == 2, "{r:?}");
    env.lab.restart("etcd-a").await?;
    sqlx::query("UPDATE wallet.fencing SET epoch = 3")
        .execute(&env.db1)
        .await?;
    let etcd_url = env.lab.describe().endpoints.etcd["a"].clone();
    env.etcd = etcd_client::Client::connect([etcd_url], None).await?;
    env.publish(&json!({"site": "a", "epoch": 3, "dsn": env.url1, "revision": 20}))
        .await?;
    env.wait_epoch(3).await?;
    let r = env.credit(7, 5, "k-back").await?;
    assert!(committed(&r) && r.epoch == 3, "{r:?}");
    assert!(ledger_has(&env.db1, "credit:k-back").await?);
    let switches = env
        .metric(
            &format!("http://{}/metrics", env.wallet_metrics),
            "wallet_writer_switches_total",
        )
        .await?;
    assert_eq!(switches, Some(3.0), "gift, gift2, gift again");

    phase("shutdown");
    for stop in env.stops.drain(..) {
        let _ = stop.send(());
    }
    for served in env.served.drain(..) {
        tokio::time::timeout(Duration::from_secs(10), served).await???;
    }
    env.lab.down().await?;
    Ok(())
}

#[test]
fn writer_config_combinations_are_checked() {
    let base = json!({"site": "a", "listen_addr": "127.0.0.1:1"});
    let with = |extra: Value| {
        let mut v = base.clone();
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value::<WalletConfig>(v)
            .unwrap()
            .validate()
            .map_err(|e| e.to_string())
    };
    assert!(with(json!({"database_url": "postgres://x/y", "epoch": 1})).is_ok());
    assert!(with(json!({"writer_key": KEY, "etcd_endpoints": ["http://e:1"]})).is_ok());
    assert!(with(json!({"writer_key": KEY, "etcd_endpoints": ["http://e:1"], "database_url": "postgres://x/y", "epoch": 2})).is_ok());
    for (extra, needle) in [
        (json!({}), "database_url"),
        (json!({"database_url": "postgres://x/y"}), "epoch"),
        (json!({"writer_key": KEY}), "etcd_endpoints"),
        (
            json!({"writer_key": "writers", "etcd_endpoints": ["http://e:1"]}),
            "writer_key",
        ),
        (
            json!({"writer_key": KEY, "etcd_endpoints": ["http://e:1"], "epoch": 2}),
            "go together",
        ),
        (
            json!({"writer_key": KEY, "etcd_endpoints": ["http://e:1"], "database_url": "mysql://x", "epoch": 2}),
            "postgres://",
        ),
    ] {
        let err = with(extra.clone()).expect_err(&extra.to_string());
        assert!(err.contains(needle), "{extra}: {err}");
    }
    let api = |extra: Value| {
        let mut v = json!({"site": "a", "listen_addr": "127.0.0.1:1", "wallet_endpoints": ["w:1"]});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value::<ApiConfig>(v)
            .unwrap()
            .validate()
            .map_err(|e| e.to_string())
    };
    assert!(api(json!({"database_url": "postgres://x/y"})).is_ok());
    assert!(api(json!({"writer_key": KEY, "etcd_endpoints": ["http://e:1"]})).is_ok());
    assert!(api(json!({})).unwrap_err().contains("database_url"));
    assert!(api(json!({"writer_key": KEY}))
        .unwrap_err()
        .contains("etcd_endpoints"));
}
