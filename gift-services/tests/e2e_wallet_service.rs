//! The `wallet` binary as a process: gRPC outcomes, health, metrics, SIGTERM, bad config.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drills::lab::{Lab, LabOptions};
use gift_services::pb;
use gift_services::pb::wallet_client::WalletClient;
use tonic::transport::Channel;

fn phase(name: &str) {
    eprintln!("--- {name}");
}

fn free_port(host: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

async fn connect(addr: &str) -> Result<Channel> {
    let started = Instant::now();
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            if let Ok(reply) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "gift.v1.Wallet".into(),
                })
                .await
            {
                if reply.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return Ok(channel);
                }
            }
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("wallet at {addr} not serving within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn committed(r: &pb::WalletResult) -> bool {
    r.status == pb::ResultStatus::Committed as i32
}

#[tokio::test]
async fn e2e_wallet_service_outcomes_metrics_and_sigterm() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-wallet-svc-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::new(dir.path())).await?;
    let url = lab.describe().endpoints.postgres["a"].clone();
    let etcd = lab.describe().endpoints.etcd["a"].clone();
    let host = "127.0.1.10";
    let grpc = format!("{host}:{}", free_port(host)?);
    let metrics = format!("{host}:{}", free_port(host)?);
    let config = dir.path().join("wallet.toml");
    std::fs::write(
        &config,
        format!(
            "site = \"a\"\nlisten_addr = \"{grpc}\"\nmetrics_addr = \"{metrics}\"\n\
             database_url = \"{url}\"\nepoch = 1\nmigrate = true\n\
             etcd_endpoints = [\"{etcd}\"]\ninstance = \"wallet-a-1\"\nregistration_ttl_secs = 3\n"
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("wallet.log"))?;
    let mut wallet = tokio::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let mut client = WalletClient::new(connect(&grpc).await?);

    phase("credit, debit, replay, refund");
    let r = client
        .credit(pb::CreditRequest {
            user_id: 5,
            amount: 1_000,
            idempotency_key: "top-5".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(committed(&r) && r.balance == 1_000, "{r:?}");
    let debit = pb::DebitRequest {
        order_id: "o1".into(),
        user_id: 5,
        amount: 300,
        ..Default::default()
    };
    let first = client.debit(debit.clone()).await?.into_inner();
    let again = client.debit(debit.clone()).await?.into_inner();
    assert!(
        committed(&first) && !first.duplicate && first.balance == 700,
        "{first:?}"
    );
    assert!(
        committed(&again) && again.duplicate && again.seq == first.seq,
        "{again:?}"
    );

    phase("rejections carry a reason code; bad input is INVALID_ARGUMENT");
    let stale = client
        .debit(pb::DebitRequest {
            order_id: "o2".into(),
            epoch: 9,
            ..debit.clone()
        })
        .await?
        .into_inner();
    assert_eq!(stale.status, pb::ResultStatus::Rejected as i32);
    assert_eq!(stale.reason_code, "stale_epoch", "{stale:?}");
    let poor = client
        .debit(pb::DebitRequest {
            order_id: "o3".into(),
            amount: 5_000,
            ..debit.clone()
        })
        .await?
        .into_inner();
    assert_eq!(poor.reason_code, "insufficient_funds", "{poor:?}");
    let err = client
        .debit(pb::DebitRequest {
            order_id: "o4".into(),
            amount: 0,
            ..debit.clone()
        })
        .await
        .expect_err("zero amount");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let balance = client
        .balance(pb::BalanceRequest {
            user_id: 5,
            shadow: false,
        })
        .await?
        .into_inner();
    assert!(balance.exists && balance.balance == 700, "{balance:?}");
    let shadow = client
        .balance(pb::BalanceRequest {
            user_id: 5,
            shadow: true,
        })
        .await?
        .into_inner();
    assert!(!shadow.exists, "real credit leaked into shadow: {shadow:?}");

    phase("metrics count what happened");
    let text = http_get(&metrics, "/metrics").await?;
    for line in [
        r#"wallet_operations_total{op="debit",result="committed"} 1"#,
        r#"wallet_operations_total{op="debit",result="duplicate"} 1"#,
        r#"wallet_operations_total{op="debit",result="insufficient_funds"} 1"#,
        r#"wallet_operations_total{op="debit",result="invalid"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }

    phase("registered in site a's etcd under a lease");
    let mut etcd_client = etcd_client::Client::connect([etcd.as_str()], None).await?;
    let key = "/services/wallet/a/wallet-a-1";
    let started = Instant::now();
    loop {
        let found = etcd_client.get(key, None).await?;
        if let Some(kv) = found.kvs().first() {
            assert_eq!(kv.value_str()?, grpc);
            assert_ne!(kv.lease(), 0, "registered without a lease");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key} never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    phase("SIGTERM: a clean exit");
    let pid = wallet.id().context("wallet pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(10), wallet.wait()).await??;
    assert!(status.success(), "{status:?}");
    let after = etcd_client.get(key, None).await?;
    assert!(
        after.kvs().is_empty(),
        "{key} still registered after shutdown"
    );
    lab.down().await?;
    Ok(())
}

/// A minimal HTTP/1.0 GET (the test needs no HTTP client dependency for one request).
async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[test]
fn e2e_wallet_bad_config_exits_64() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("site = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndatabase_url = \"postgres://x\"\nepoch = 0\n", "epoch"),
        ("site = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndatabase_url = \"mysql://x\"\nepoch = 1\n", "database_url"),
        ("site = \"a\"\nlisten_addr = \"127.0.0.1:1\"\nepoch = 1\n", "database_url"),
        ("site = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndatabase_url = \"postgres://x\"\nepoch = 1\ncolour = 1\n", "colour"),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("wallet.toml");
        std::fs::write(&path, text)?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .arg("--config")
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{needle} not in {stderr}");
    }
    Ok(())
}
