//! The site agent against the lab: it finds the instances registered in each site's etcd,
//! probes its own site's instances and database and the peer site's instances, and sees what
//! a SIGKILL or a SIGSTOP does.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use serde_json::Value;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

/// Writes an agent config for `site` (or the witness) into `dir`.
fn write_config(dir: &Path, lab: &Lab, site: &str) -> Result<std::path::PathBuf> {
    let e = &lab.describe().endpoints;
    let role = if site == "witness" { "witness" } else { "site" };
    let mut text = format!(
        "site = {site:?}\nrole = {role:?}\nprobe_timeout_ms = 1000\nprobe_interval_ms = 1000\n"
    );
    for s in ["a", "b"] {
        text.push_str(&format!(
            "[[sites]]\nsite = {s:?}\netcd_endpoints = [{:?}]\n",
            e.etcd[s]
        ));
        // A site agent probes its own database; the witness probes both.
        if s == site || site == "witness" {
            text.push_str(&format!("database_url = {:?}\n", e.postgres[s]));
        }
    }
    let path = dir.join(format!("agent-{site}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn once(config: &Path) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .args(["--once", "--json", "--config"])
        .arg(config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("the round as JSON")
}

fn find<'a>(list: &'a Value, field: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[field] == value)
        .unwrap_or_else(|| panic!("no {field} = {value} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_site_agent_probes_its_site_the_peer_and_the_databases() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-agent-")
        .tempdir_in("/tmp")?;
    let mut lab = Lab::start(LabOptions::new(dir.path().join("lab"))).await?;
    let config_a = write_config(dir.path(), &lab, "a")?;
    let config_b = write_config(dir.path(), &lab, "b")?;
    let config_w = write_config(dir.path(), &lab, "witness")?;

    phase("site a: its instances healthy, its primary, site b reachable");
    let a = once(&config_a)?;
    assert_eq!(a["site"], "a");
    assert_eq!(a["instances"].as_array().unwrap().len(), 2, "{a}");
    for instance in ["gift-api-a", "wallet-a"] {
        let i = find(&a["instances"], "instance", instance);
        assert_eq!(i["healthy"], true, "{i}");
        assert_eq!(i["consecutive_failures"], 0);
    }
    let db = find(&a["databases"], "site", "a");
    assert_eq!(db["role"], "primary", "{db}");
    assert_eq!(db["fencing_epoch"], 1);
    assert!(db["current_wal_lsn"].as_u64().unwrap() > 0);
    assert!(db["ledger_sequence"].is_u64());
    assert_eq!(db["read_only"], false);
    for target in ["gift-api/gift-api-b", "wallet/wallet-b"] {
        assert_eq!(find(&a["peers"], "target", target)["reachable"], true);
    }

    phase("site b: its replica with receive and replay positions");
    let b = once(&config_b)?;
    let db = find(&b["databases"], "site", "b");
    assert_eq!(db["role"], "replica", "{db}");
    assert!(db["receive_lsn"].as_u64().unwrap() >= db["replay_lsn"].as_u64().unwrap());
    assert_eq!(db["current_wal_lsn"], Value::Null);

    phase("the witness: no instances of its own, both sites as peers, both databases");
    let w = once(&config_w)?;
    assert!(w["instances"].as_array().unwrap().is_empty());
    assert_eq!(w["peers"].as_array().unwrap().len(), 4, "{w}");
    assert_eq!(w["databases"].as_array().unwrap().len(), 2);

    phase("gift-api-a SIGKILLed: site a's agent and the witness see it fail");
    lab.kill("gift-api-a")?;
    let a = once(&config_a)?;
    let i = find(&a["instances"], "instance", "gift-api-a");
    assert_eq!(i["healthy"], false, "{i}");
    assert!(i["error"].as_str().unwrap().contains("readyz"), "{i}");
    assert_eq!(
        find(&a["instances"], "instance", "wallet-a")["healthy"],
        true
    );
    let w = once(&config_w)?;
    assert_eq!(
        find(&w["peers"], "target", "gift-api/gift-api-a")["reachable"],
        false
    );

    phase("the primary SIGSTOPped: unreachable within the probe deadline, back after SIGCONT");
    lab.pause("postgres-a")?;
    let started = std::time::Instant::now();
    let a = once(&config_a)?;
    let took = started.elapsed();
    lab.resume("postgres-a")?;
    let db = find(&a["databases"], "site", "a");
    assert_eq!(db["role"], "unreachable", "{db}");
    assert!(
        took.as_secs() < 5,
        "a hung database held the round for {took:?}"
    );
    let a = once(&config_a)?;
    assert_eq!(find(&a["databases"], "site", "a")["role"], "primary");

    phase("long-running: probes until SIGTERM, exits 0");
    let log = std::fs::File::create(dir.path().join("agent-a.log"))?;
    let child = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .arg("--config")
        .arg(&config_a)
        .stderr(log.try_clone()?)
        .stdout(log)
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert_eq!(status.status.code(), Some(0));
    let text = std::fs::read_to_string(dir.path().join("agent-a.log"))?;
    assert!(
        text.contains("failing") && text.contains("gift-api"),
        "{text}"
    );
    assert!(text.contains("site-agent stopped cleanly"), "{text}");

    phase("bad configuration: exit 64 naming the problem");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "site = \"a\"\nrole = \"site\"\nsites = []\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_site-agent"))
        .arg("--config")
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sites"));
    lab.down().await?;
    Ok(())
}
