//! The edge router in the lab, in front of the real gift-api of both sites: it routes each
//! uid's bucket to its site, follows a shift under load without failing a request, re-sends
//! what is safe to re-send when a site's gift-api dies, throttles one site only, and serves
//! from its state file when the whole control plane is gone.
//!
//! The failover policy is paused in these tests (dry-run) so that only the test moves traffic.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drills::lab::{Lab, LabOptions};
use invoker_api::{pb, InvokerClient};
use serde_json::{json, Value};

const SERVICE: &str = "gift-api";

fn phase(name: &str) {
    eprintln!("--- {name}");
}

struct Env {
    _dir: tempfile::TempDir,
    lab: Lab,
    http: reqwest::Client,
    /// The proxy.
    edge: String,
    /// The edge's admin port.
    admin: String,
}

async fn start(prefix: &str) -> Result<Env> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let endpoints = lab.describe().endpoints.clone();
    let env = Env {
        _dir: dir,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        edge: endpoints.edge.context("the lab has an edge router")?,
        admin: endpoints.edge_admin.context("the edge's admin URL")?,
        lab,
    };
    let mut admin = env.leader().await?.admin();
    admin
        .set_policy_mode(pb::SetPolicyModeRequest {
            paused: true,
            actor: "e2e".into(),
            reason: "only the test moves traffic".into(),
        })
        .await?;
    Ok(env)
}

/// One answer through the edge: status, the site that answered, the JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    site: Option<String>,
    retried_from: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

impl Env {
    async fn leader(&self) -> Result<InvokerClient> {
        Ok(
            InvokerClient::wait_for_leader(&self.lab.invoker_endpoints(), Duration::from_secs(10))
                .await?,
        )
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer> {
        let response = request.send().await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (status, site, retried_from, retry_after) = (
            response.status().as_u16(),
            header("x-edge-site"),
            header("x-edge-retried-from"),
            header("retry-after"),
        );
        let body = response.json().await.unwrap_or(Value::Null);
        Ok(Answer {
            status,
            site,
            retried_from,
            retry_after,
            body,
        })
    }

    async fn balance(&self, uid: u64) -> Result<Answer> {
        self.send(self.http.get(format!("{}/v1/wallet/{uid}", self.edge)))
            .await
    }

    async fn top_up(&self, uid: u64, key: Option<&str>) -> Result<Answer> {
        let mut body = json!({"amount": 1000});
        if let Some(key) = key {
            body["idempotency_key"] = key.into();
        }
        self.send(
            self.http
                .post(format!("{}/v1/wallet/{uid}/topup", self.edge))
                .json(&body),
        )
        .await
    }

    async fn gift(&self, uid: u64, key: &str) -> Result<Answer> {
        let body = json!({"user_id": uid, "streamer_id": 9000, "gift_id": "rose", "count": 1, "idempotency_key": key});
        self.send(
            self.http
                .post(format!("{}/v1/gifts", self.edge))
                .json(&body),
        )
        .await
    }

    async fn routing(&self) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/routing", self.admin))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Waits until the edge's `/routing` satisfies `ok`.
    async fn wait_routing(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let routing = self.routing().await?;
            if ok(&routing) {
                return Ok(routing);
            }
            if Instant::now() > deadline {
                bail!("the edge never showed {what}: {routing}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the edge's state file holds table `version` (it is written just after the
    /// table is put in use).
    async fn wait_state_file(&self, version: u64) -> Result<()> {
        let path = self.lab.dir().join("edge-router").join("routing.json");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let saved = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            if saved
                .as_ref()
                .is_some_and(|s| s["table"]["version"] == version)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} never held version {version}: {saved:?}", path.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn set_routing(&self, runs: &[(&str, u32)]) -> Result<u64> {
        let reply = self
            .leader()
            .await?
            .admin()
            .set_routing(pb::SetRoutingRequest {
                service: SERVICE.into(),
                runs: runs
                    .iter()
                    .map(|(site, count)| pb::BucketRun {
                        site: (*site).into(),
                        count: *count,
                    })
                    .collect(),
                expected_version: 0,
                actor: "e2e".into(),
                reason: "edge test".into(),
            })
            .await?
            .into_inner();
        Ok(reply.table.context("the new table")?.version)
    }

    async fn set_throttle(&self, site: &str, max_rps: u64) -> Result<()> {
        self.leader()
            .await?
            .admin()
            .set_throttle(pb::SetThrottleRequest {
                service: SERVICE.into(),
                site: site.into(),
                max_rps,
                actor: "e2e".into(),
                reason: "edge test".into(),
            })
            .await?;
        Ok(())
    }

    /// A counter of the edge's `/metrics` (0 when absent).
    async fn edge_metric(&self, line_prefix: &str) -> Result<u64> {
        metric(&self.http, &self.admin, line_prefix).await
    }

    /// `gift_api_http_requests_total` of one route and code on one site's gift-api.
    async fn gift_api_requests(&self, site: &str, route: &str) -> Result<u64> {
        let base = self.lab.describe().endpoints.gift_api[site].clone();
        metric(
            &self.http,
            &base,
            &format!("gift_api_http_requests_total{{route=\"{route}\",code=\"200\"}}"),
        )
        .await
    }
}

async fn metric(http: &reqwest::Client, base: &str, line_prefix: &str) -> Result<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// The site a uid's bucket belongs to in the lab's even split (a: 0..512, b: 512..1024).
fn half(uid: u64) -> &'static str {
    if uid % 1024 < 512 {
        "a"
    } else {
        "b"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_edge_routes_by_bucket_follows_a_shift_under_load_and_throttles_one_site() -> Result<()>
{
    let env = start("e2e-edge-route-").await?;
    let routing = env.routing().await?;
    assert_eq!(
        routing["table"]["share"],
        json!({"a": 512, "b": 512}),
        "{routing}"
    );
    assert_eq!(routing["source"], "watch");

    phase("each uid goes to its bucket's site: header, path and body");
    let route = "/v1/wallet/{user_id}";
    let (before_a, before_b) = (
        env.gift_api_requests("a", route).await?,
        env.gift_api_requests("b", route).await?,
    );
    let uids: Vec<u64> = (0..40).map(|i| 1 + i * 53).collect();
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for &uid in &uids {
        let answer = env.balance(uid).await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.site.as_deref(), Some(half(uid)), "uid {uid}");
        assert_eq!(answer.body["user_id"], uid);
        *expected.entry(half(uid)).or_default() += 1;
    }
    // The sites' own counters agree with the edge's header.
    assert_eq!(
        env.gift_api_requests("a", route).await? - before_a,
        expected["a"]
    );
    assert_eq!(
        env.gift_api_requests("b", route).await? - before_b,
        expected["b"]
    );
    for uid in [7u64, 600, 1024 + 7, 1024 + 600] {
        let answer = env.top_up(uid, Some(&format!("route-topup-{uid}"))).await?;
        assert_eq!(
            (answer.status, answer.site.as_deref()),
            (200, Some(half(uid)))
        );
        let answer = env.gift(uid, &format!("route-gift-{uid}")).await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.site.as_deref(), Some(half(uid)), "body uid {uid}");
    }
    // x-uid wins over the body; a bad x-uid is refused by the edge itself.
    let answer = env
        .send(
            env.http
                .get(format!("{}/v1/catalog", env.edge))
                .header("x-uid", "700"),
        )
        .await?;
    assert_eq!((answer.status, answer.site.as_deref()), (200, Some("b")));
    let answer = env
        .send(
            env.http
                .get(format!("{}/v1/catalog", env.edge))
                .header("x-uid", "seven"),
        )
        .await?;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["error"]["code"], "invalid_uid");
    // No uid: a path always goes to the same site.
    let sites: Vec<Option<String>> = futures::future::try_join_all(
        (0..5).map(|_| env.send(env.http.get(format!("{}/v1/catalog", env.edge)))),
    )
    .await?
    .into_iter()
    .map(|a| a.site)
    .collect();
    assert!(
        sites.iter().all(|s| s.is_some() && *s == sites[0]),
        "{sites:?}"
    );

    phase("a throttle on b: 429 with Retry-After on b only");
    env.set_throttle("b", 5).await?;
    env.wait_routing("the throttle on b", |r| r["throttles_in_force"]["b"] == 5)
        .await?;
    let b_answers = futures::future::try_join_all((0..30).map(|i| env.balance(600 + i))).await?;
    let a_answers = futures::future::try_join_all((0..30).map(|i| env.balance(1 + i))).await?;
    let throttled: Vec<&Answer> = b_answers.iter().filter(|a| a.status == 429).collect();
    assert!(
        (20..=25).contains(&throttled.len()),
        "5 rps (a one-second burst of 5) should refuse most of 30 at once: {b_answers:?}"
    );
    for a in &throttled {
        assert_eq!(a.retry_after.as_deref(), Some("1"));
        assert_eq!(a.site.as_deref(), Some("b"));
        assert_eq!(a.body["error"]["code"], "throttled");
    }
    assert!(b_answers.iter().all(|a| a.status == 200 || a.status == 429));
    assert!(a_answers.iter().all(|a| a.status == 200), "{a_answers:?}");
    assert!(
        env.edge_metric("edge_router_throttled_total{site=\"b\"}")
            .await?
            >= 20
    );
    assert_eq!(
        env.edge_metric("edge_router_throttled_total{site=\"a\"}")
            .await?,
        0
    );
    env.set_throttle("b", 0).await?;
    env.wait_routing("the throttle lifted", |r| {
        r["throttles_in_force"] == json!({})
    })
    .await?;
    let b_answers = futures::future::try_join_all((0..30).map(|i| env.balance(600 + i))).await?;
    assert!(b_answers.iter().all(|a| a.status == 200), "{b_answers:?}");

    phase("everything to b under steady load: not one request fails");
    let load = {
        let http = env.http.clone();
        let edge = env.edge.clone();
        tokio::spawn(async move { steady_load(&http, &edge, 100, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let version = env.set_routing(&[("b", 1024)]).await?;
    env.wait_routing("the shift to b", |r| r["table"]["version"] == version)
        .await?;
    let outcomes = load.await??;
    let failed: Vec<&(u64, u16, String)> = outcomes.iter().filter(|o| o.1 != 200).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(outcomes.len() >= 450, "{} requests", outcomes.len());
    // Before the shift a's buckets went to a; after it, everything goes to b.
    assert!(outcomes
        .iter()
        .any(|(uid, _, site)| half(*uid) == "a" && site == "a"));
    assert!(outcomes
        .iter()
        .any(|(uid, _, site)| half(*uid) == "a" && site == "b"));
    for uid in [1u64, 100, 511] {
        assert_eq!(env.balance(uid).await?.site.as_deref(), Some("b"));
    }
    env.wait_state_file(version).await?;

    phase("the edge's traffic reaches the invoker leader as an observer");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = env
            .leader()
            .await?
            .admin()
            .get_policy_view(pb::GetPolicyViewRequest {})
            .await?
            .into_inner();
        if view.observers_last_seen_ms.contains_key("edge") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the leader's policy never saw the edge: {view:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.lab.down().await?;
    Ok(())
}

/// Requests at `rate` per second for `duration`, alternating balance reads and keyed top-ups
/// over uids spread across every bucket: (uid, status, answering site) of each.
async fn steady_load(
    http: &reqwest::Client,
    edge: &str,
    rate: u64,
    duration: Duration,
) -> Result<Vec<(u64, u16, String)>> {
    let start = tokio::time::Instant::now();
    let total = rate * duration.as_secs();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
        let uid = 1 + (i * 97) % 1024;
        let request = if i % 2 == 0 {
            http.get(format!("{edge}/v1/wallet/{uid}"))
        } else {
            http.post(format!("{edge}/v1/wallet/{uid}/topup"))
                .json(&json!({"amount": 1, "idempotency_key": format!("steady-{i}")}))
        };
        tasks.push(tokio::spawn(async move {
            match request.send().await {
                Ok(r) => {
                    let site = r
                        .headers()
                        .get("x-edge-site")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    (uid, r.status().as_u16(), site)
                }
                Err(e) => (uid, 0, e.to_string()),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_edge_resends_keyed_requests_and_reads_to_b_when_gift_api_a_dies() -> Result<()> {
    let mut env = start("e2e-edge-retry-").await?;
    for uid in [3u64, 5, 9, 11] {
        let answer = env.top_up(uid, Some(&format!("fund-{uid}"))).await?;
        assert_eq!((answer.status, answer.site.as_deref()), (200, Some("a")));
    }

    phase("gift-api-a SIGKILLed: a request without an idempotency key is never re-sent: 502");
    env.lab.kill("gift-api-a")?;
    let answer = env.top_up(9, None).await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(answer.body["error"]["code"], "upstream_unavailable");
    assert_eq!(answer.site.as_deref(), Some("a"));
    assert_eq!(answer.retried_from, None);

    phase("while a's instance is skipped: requests go to b without trying a");
    let answer = env.gift(3, "after-kill-rerouted").await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.site.as_deref(), Some("b"));
    assert_eq!(answer.retried_from, None, "{answer:?}");
    assert!(
        env.edge_metric("edge_router_rerouted_total{from_site=\"a\",to_site=\"b\"}")
            .await?
            >= 1
    );

    phase("once the skip ends: a keyed gift for a uid of a is tried at a, then re-sent to b");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let answer = env.gift(3, "after-kill-retried").await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.site.as_deref(), Some("b"));
    assert_eq!(answer.retried_from.as_deref(), Some("a"), "{answer:?}");

    phase("and a read too");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let answer = env.balance(5).await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.site.as_deref(), Some("b"));
    assert_eq!(answer.retried_from.as_deref(), Some("a"));
    assert_eq!(
        answer.body["balance"], 1000,
        "b sees a's top-up: {answer:?}"
    );

    phase("meanwhile and after: every keyed request and read for a's uids succeeds via b");
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let uid = 1 + (n * 13) % 511;
        let sender = [3u64, 5, 11][(n % 3) as usize];
        let gift = env.gift(sender, &format!("after-kill-loop-{n}")).await?;
        // Should a sender run out of money, the refusal (422) is still b answering.
        assert!(matches!(gift.status, 200 | 422), "{gift:?}");
        assert_eq!(gift.site.as_deref(), Some("b"));
        let read = env.balance(uid).await?;
        assert_eq!(
            (read.status, read.site.as_deref()),
            (200, Some("b")),
            "{read:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        env.edge_metric("edge_router_retries_total{from_site=\"a\",to_site=\"b\"}")
            .await?
            >= 2
    );
    assert!(
        env.edge_metric("edge_router_upstream_errors_total{site=\"a\",kind=\"refused\"}")
            .await?
            >= 2
    );
    // a's registration expires with its lease: the edge stops knowing the instance.
    env.wait_routing("a's instance gone from the registry", |r| {
        r["sites"]["a"]["instances"] == json!([])
    })
    .await?;
    env.lab.down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_edge_serves_from_its_state_file_without_the_control_plane() -> Result<()> {
    let mut env = start("e2e-edge-static-").await?;

    phase("a custom split, seen by the edge and saved");
    // Under the default split uid 150 would be a's; here it is b's.
    let version = env.set_routing(&[("a", 100), ("b", 924)]).await?;
    env.wait_routing("the custom split", |r| r["table"]["version"] == version)
        .await?;
    env.wait_state_file(version).await?;

    phase("etcd-a stopped: the edge keeps a's last known instance");
    env.lab.stop("etcd-a").await?;
    env.wait_routing("a's registry unreadable", |r| {
        !r["sites"]["a"]["registry_error"].is_null()
    })
    .await?;
    let routing = env.routing().await?;
    assert_eq!(
        routing["sites"]["a"]["instances"].as_array().map(Vec::len),
        Some(1),
        "{routing}"
    );
    let answer = env.balance(50).await?;
    assert_eq!((answer.status, answer.site.as_deref()), (200, Some("a")));
    env.lab.restart("etcd-a").await?;
    env.wait_routing("a's registry readable again", |r| {
        r["sites"]["a"]["registry_error"].is_null()
    })
    .await?;

    phase("every invoker stopped: the edge keeps serving");
    for node in ["invoker-1", "invoker-2", "invoker-3"] {
        env.lab.stop(node).await?;
    }
    env.wait_routing("the watch down", |r| r["watch"]["connected_to"].is_null())
        .await?;
    for (uid, site) in [(50u64, "a"), (150, "b"), (900, "b")] {
        let answer = env.balance(uid).await?;
        assert_eq!((answer.status, answer.site.as_deref()), (200, Some(site)));
    }

    phase("the edge restarted with no control plane: it serves from the state file");
    env.lab.restart("edge-router").await?;
    let routing = env.routing().await?;
    assert_eq!(routing["source"], "disk", "{routing}");
    assert_eq!(routing["table"]["version"], version);
    assert_eq!(
        env.edge_metric("edge_router_routing_source{source=\"disk\"}")
            .await?,
        1
    );
    for (uid, site) in [(50u64, "a"), (150, "b"), (900, "b"), (1024 + 99, "a")] {
        let answer = env.balance(uid).await?;
        assert_eq!(
            (answer.status, answer.site.as_deref()),
            (200, Some(site)),
            "uid {uid}: {answer:?}"
        );
    }
    let answer = env.top_up(150, Some("static-topup")).await?;
    assert_eq!(
        (answer.status, answer.site.as_deref()),
        (200, Some("b")),
        "{answer:?}"
    );
    let answer = env.gift(150, "static-gift").await?;
    assert_eq!(
        (answer.status, answer.site.as_deref()),
        (200, Some("b")),
        "{answer:?}"
    );

    phase("the invokers back: the watch confirms the table");
    for node in ["invoker-1", "invoker-2", "invoker-3"] {
        env.lab.restart(node).await?;
    }
    env.wait_routing("the watch's confirmation", |r| {
        r["source"] == "watch" && r["table"]["version"] == version
    })
    .await?;

    phase("SIGTERM: the edge stops accepting, finishes what is in flight, exits 0");
    graceful_stop(&env).await?;

    phase("no table at all (no state file, no invoker reachable): 503 no_routing");
    no_table(&env).await?;

    phase("bad configuration: exit 64 naming the problem");
    let bad = env.lab.dir().join("bad-edge.toml");
    std::fs::write(
        &bad,
        "listen_addr = \"127.0.3.11:1\"\nadmin_addr = \"127.0.3.11:1\"\nsite = \"witness\"\n\
         invoker_endpoints = [\"127.0.3.1:1\"]\nstate_file = \"/tmp/x.json\"\n\
         [[sites]]\nsite = \"a\"\netcd_endpoints = [\"http://127.0.1.2:1\"]\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .arg("--config")
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin_addr"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .arg("--config")
        .arg(&bad)
        .env("EDGE_ROUTER_ADMIN_ADDR", "127.0.3.11:2")
        .env("EDGE_ROUTER_REPORT_INTERVAL_MS", "1")
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(64),
        "the environment overrides the file"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("report_interval_ms"));
    env.lab.down().await?;
    Ok(())
}

/// Writes the config of an extra edge at 127.0.3.11 (free ports) and starts it; returns the
/// child, its proxy and admin addresses.
fn extra_edge(
    env: &Env,
    name: &str,
    invokers: &[String],
) -> Result<(std::process::Child, String, String)> {
    let e = env.lab.describe().endpoints.clone();
    let free = || -> Result<String> {
        let l = std::net::TcpListener::bind("127.0.3.11:0")?;
        Ok(l.local_addr()?.to_string())
    };
    let (proxy, admin) = (free()?, free()?);
    let config = env.lab.dir().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen_addr = {proxy:?}\nadmin_addr = {admin:?}\nsite = \"witness\"\nagent_id = {name:?}\n\
             invoker_endpoints = {invokers:?}\nstate_file = {:?}\nbind_ip = \"127.0.3.11\"\n\
             [[sites]]\nsite = \"a\"\netcd_endpoints = [{:?}]\n\
             [[sites]]\nsite = \"b\"\netcd_endpoints = [{:?}]\n",
            env.lab.dir().join(name).join("routing.json").display().to_string(),
            e.etcd["a"],
            e.etcd["b"],
        ),
    )?;
    let log = std::fs::File::create(env.lab.dir().join(format!("{name}.log")))?;
    let child = Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .arg("--config")
        .arg(&config)
        .stderr(log.try_clone()?)
        .stdout(log)
        .spawn()?;
    Ok((child, proxy, admin))
}

/// Waits until `url` answers `status`.
async fn wait_status(http: &reqwest::Client, url: &str, status: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = http.get(url).send().await;
        if answer.is_ok_and(|r| r.status() == status) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} never answered {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sigterm(child: &std::process::Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    Ok(())
}

async fn no_table(env: &Env) -> Result<()> {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.3.11:0")?;
        l.local_addr()?.to_string()
    };
    let (child, proxy, admin) = extra_edge(env, "edge-3", &[closed])?;
    wait_status(&env.http, &format!("http://{admin}/healthz"), 200).await?;
    // It knows the instances, but has no table: not ready, and says why to every request.
    wait_status(&env.http, &format!("http://{admin}/readyz"), 503).await?;
    let answer = env
        .send(env.http.get(format!("http://{proxy}/v1/wallet/1")))
        .await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body["error"]["code"], "no_routing");
    sigterm(&child)?;
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    let log = std::fs::read_to_string(env.lab.dir().join("edge-3.log"))?;
    assert_eq!(status.status.code(), Some(0), "{:?}\n{log}", status.status);
    Ok(())
}

/// Runs a second edge (its own ports at 127.0.3.11) on the lab, holds a request in flight
/// (gift-api-b frozen), sends SIGTERM, and checks that the request still gets its answer,
/// new connections are refused, and the exit code is 0.
async fn graceful_stop(env: &Env) -> Result<()> {
    let invokers = env.lab.invoker_endpoints();
    let (child, proxy, admin) = extra_edge(env, "edge-2", &invokers)?;
    wait_status(&env.http, &format!("http://{admin}/readyz"), 200).await?;

    // A frozen gift-api holds the request: the kernel takes the connection and the request
    // bytes, nothing answers until SIGCONT.
    env.lab.pause("gift-api-b")?;
    let slow = {
        let http = env.http.clone();
        let url = format!("http://{proxy}/v1/wallet/900");
        tokio::spawn(async move {
            let sent = Instant::now();
            let answer = http.get(url).send().await;
            (answer, sent.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&child)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = tokio::net::TcpStream::connect(&proxy).await.is_err();
    env.lab.resume("gift-api-b")?;
    let (answer, took) = slow.await?;
    let answer = answer.context("the in-flight request got no answer")?;
    let log = std::fs::read_to_string(env.lab.dir().join("edge-2.log"))?;
    let status = answer.status();
    let body = answer.text().await?;
    assert_eq!(status, 200, "the in-flight request finished: {body}\n{log}");
    assert!(
        took >= Duration::from_millis(900),
        "the request was in flight across the SIGTERM, not done before it ({took:?}): {body}\n{log}"
    );
    assert!(refused, "no new connections after SIGTERM");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert_eq!(status.status.code(), Some(0));
    let text = std::fs::read_to_string(env.lab.dir().join("edge-2.log"))?;
    assert!(text.contains("edge-router stopped cleanly"), "{text}");
    Ok(())
}
