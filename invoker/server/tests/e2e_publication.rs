//! The leader publishes routing tables and writer records to every site's etcd, by
//! compare-and-swap, retried until acknowledged, resumed by a new leader; and the policy can
//! be paused (dry-run) and resumed from invokerctl. Real invokers, real etcd, real agents.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use invoker_api::{pb, InvokerClient};
use serde_json::Value;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

async fn etcd_doc(lab: &Lab, site: &str, key: &str) -> Result<Option<Value>> {
    let url = lab
        .describe()
        .endpoints
        .etcd
        .get(site)
        .context("etcd endpoint")?
        .clone();
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_millis(500));
    let mut client = etcd_client::Client::connect([url], Some(options)).await?;
    let got = client.get(key, None).await?;
    Ok(match got.kvs().first() {
        Some(kv) => Some(serde_json::from_slice(kv.value())?),
        None => None,
    })
}

async fn etcd_put(lab: &Lab, site: &str, key: &str, value: &Value) -> Result<()> {
    let url = lab.describe().endpoints.etcd[site].clone();
    let mut client = etcd_client::Client::connect([url], None).await?;
    client.put(key, serde_json::to_vec(value)?, None).await?;
    Ok(())
}

/// Waits until `site`'s etcd has the gift-api table at `version`.
async fn wait_published(lab: &Lab, site: &str, version: u64, within: Duration) -> Result<Value> {
    let started = Instant::now();
    loop {
        if let Ok(Some(doc)) = etcd_doc(lab, site, "/invoker/routing/gift-api").await {
            if doc["version"].as_u64() == Some(version) {
                return Ok(doc);
            }
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "gift-api v{version} not published to {site} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn set_gift_api(lab: &Lab, site: &str, reason: &str) -> Result<u64> {
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let reply = client
        .admin()
        .set_routing(pb::SetRoutingRequest {
            service: "gift-api".into(),
            runs: vec![pb::BucketRun {
                site: site.into(),
                count: 1024,
            }],
            expected_version: 0,
            actor: "e2e".into(),
            reason: reason.into(),
        })
        .await?
        .into_inner();
    Ok(reply.table.context("table")?.version)
}

async fn publication(lab: &Lab, site: &str) -> Result<pb::SitePublication> {
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let status = client.status().await?;
    status
        .publications
        .into_iter()
        .find(|p| p.site == site)
        .with_context(|| format!("no publication status for {site}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_routing_and_writers_are_published_to_every_site_by_cas() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-publish-")
        .tempdir_in("/tmp")?;
    let mut lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;

    phase("the topology's tables and the wallet's writer reach both sites' etcd");
    for site in ["a", "b"] {
        let doc = wait_published(&lab, site, 1, Duration::from_secs(10)).await?;
        assert_eq!(doc["runs"][0]["site"], "a");
        let writer = etcd_doc(&lab, site, "/invoker/writers/wallet")
            .await?
            .context("writer published")?;
        assert_eq!(writer["site"], "a");
        assert_eq!(writer["epoch"], 1);
    }
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let status = client.status().await?;
    for p in &status.publications {
        assert!(p.error.is_empty(), "{p:?}");
        assert_eq!(p.published_versions.get("gift-api"), Some(&1), "{p:?}");
    }
    assert_eq!(status.publications.len(), 2, "{:?}", status.publications);

    phase("a shift is published to both sites");
    let v2 = set_gift_api(&lab, "b", "e2e: shift").await?;
    for site in ["a", "b"] {
        wait_published(&lab, site, v2, Duration::from_secs(5)).await?;
    }

    phase("a newer document in b's etcd is never rolled back");
    let planted =
        serde_json::json!({"version": 99, "runs": [{"site": "b", "count": 1024}], "revision": 0});
    etcd_put(&lab, "b", "/invoker/routing/gift-api", &planted).await?;
    let v3 = set_gift_api(&lab, "a", "e2e: shift back").await?;
    wait_published(&lab, "a", v3, Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let doc = etcd_doc(&lab, "b", "/invoker/routing/gift-api")
        .await?
        .unwrap();
    assert_eq!(doc["version"], 99, "the publisher overwrote a newer table");
    // Put the real one back for the rest of the test.
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let mut etcd =
        etcd_client::Client::connect([lab.describe().endpoints.etcd["b"].clone()], None).await?;
    etcd.delete("/invoker/routing/gift-api", None).await?;
    drop(client);

    phase(
        "b's etcd down: a keeps up, status shows b behind with the error, b catches up on return",
    );
    lab.stop("etcd-b").await?;
    let v4 = set_gift_api(&lab, "b", "e2e: while etcd-b is down").await?;
    wait_published(&lab, "a", v4, Duration::from_secs(5)).await?;
    let started = Instant::now();
    loop {
        let p = publication(&lab, "b").await?;
        if !p.error.is_empty() && p.published_revision < p.target_revision {
            eprintln!("b behind: {p:?}");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "b never reported behind: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(publication(&lab, "a").await?.error.is_empty());
    lab.restart("etcd-b").await?;
    wait_published(&lab, "b", v4, Duration::from_secs(15)).await?;
    let started = Instant::now();
    loop {
        let p = publication(&lab, "b").await?;
        if p.error.is_empty() && p.published_revision == p.target_revision {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "b status stuck: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    phase("the leader killed: the new leader publishes the next change");
    let (_, leader) = lab.invoker_leader(Duration::from_secs(10)).await?;
    lab.kill(&leader)?;
    let started = Instant::now();
    let v5 = loop {
        match set_gift_api(&lab, "a", "e2e: after the leader kill").await {
            Ok(v) => break v,
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                eprintln!("retrying the shift: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    for site in ["a", "b"] {
        wait_published(&lab, site, v5, Duration::from_secs(10)).await?;
    }
    let (_, new_leader) = lab.invoker_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    lab.down().await?;
    Ok(())
}

fn invokerctl(lab: &Lab, args: &[&str]) -> Result<String> {
    let bin = drills::lab::find_bin("invokerctl")?;
    let out = std::process::Command::new(bin)
        .arg("--endpoints")
        .arg(lab.invoker_endpoints().join(","))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "invokerctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_paused_policy_records_what_it_would_do_and_acts_on_resume() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-pause-")
        .tempdir_in("/tmp")?;
    let mut options = LabOptions::new(dir.path().join("lab"));
    options.agents = true;
    let lab = Lab::start(options).await?;
    let even = vec![("a".to_string(), 512), ("b".to_string(), 512)];

    phase("invokerctl pause; gift-api-a frozen (its /readyz stops answering)");
    let out = invokerctl(&lab, &["pause", "--reason", "e2e: maintenance"])?;
    assert!(out.contains("paused"), "{out}");
    let status: Value = serde_json::from_str(&invokerctl(&lab, &["--json", "status"])?)?;
    assert_eq!(status["policy_paused"], true);
    lab.pause("gift-api-a")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        drills::scenarios::routing(&lab, "gift-api").await?,
        even,
        "a paused policy shifted"
    );
    let view: Value = serde_json::from_str(&invokerctl(&lab, &["--json", "policy"])?)?;
    assert_eq!(view["paused"], true);
    let pending = view["pending"].as_array().unwrap();
    assert!(
        pending
            .iter()
            .any(|d| d["decision"] == "would_shift_buckets" && d["service"] == "gift-api"),
        "{view:#}"
    );
    let a = view["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "a")
        .unwrap();
    assert_eq!(a["services"]["gift-api"], "service_failure", "{a:#}");

    phase("invokerctl resume: the shift happens, gift-api only");
    invokerctl(&lab, &["resume", "--reason", "e2e: done"])?;
    let resumed = Instant::now();
    loop {
        if drills::scenarios::routing(&lab, "gift-api").await? == vec![("b".to_string(), 1024)] {
            break;
        }
        anyhow::ensure!(
            resumed.elapsed() < Duration::from_secs(10),
            "no shift after resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("shifted {:?} after resume", resumed.elapsed());
    assert_eq!(
        drills::scenarios::routing(&lab, "wallet").await?,
        even,
        "the wallet moved"
    );
    let view: Value = serde_json::from_str(&invokerctl(&lab, &["--json", "policy"])?)?;
    let recent = view["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|d| d["decision"] == "shift_buckets" && d["status"] == "committed"),
        "{view:#}"
    );
    let human = invokerctl(&lab, &["status"])?;
    assert!(human.contains("failover policy: active"), "{human}");
    assert!(human.contains("PUBLISHED"), "{human}");
    lab.resume("gift-api-a")?;
    lab.down().await?;
    Ok(())
}
