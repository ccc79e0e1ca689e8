//! Bad input gets a clear error and changes nothing: invalid configs, invalid admin requests,
//! garbage on the gRPC port. Also checks grpc.health.v1 and reflection answer.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use drills::lab::{Lab, LabOptions};
use invoker_api::{pb, InvokerClient};
use invoker_domain::BUCKETS;

fn run(site: &str, count: u32) -> pb::BucketRun {
    pb::BucketRun {
        site: site.into(),
        count,
    }
}

fn phase(name: &str) {
    eprintln!("--- {name}");
}

#[test]
fn e2e_invalid_config_exits_64_with_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("node_id = 0\nsite = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n", "node_id"),
        ("node_id = 1\nsite = \"a\"\nlisten_addr = \"not an address\"\ndata_dir = \"/tmp/x\"\n", "listen_addr"),
        ("node_id = 1\nsite = \"a\"\nlisten_addr = \"127.0.0.1:1\"\n", "data_dir"),
        ("node_id = 1\nsite = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nbogus = 3\n", "bogus"),
        ("this is not toml", "invalid configuration"),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::File::create(&path)?.write_all(text.as_bytes())?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_invoker"))
            .arg("--config")
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text:?}: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
    phase("a missing file and a bad environment override");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_invoker"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "node_id = 1\nsite = \"a\"\nlisten_addr = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n",
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_invoker"))
        .arg("--config")
        .arg(&good)
        .env("INVOKER_RAFT__HEARTBEAT_INTERVAL_MS", "soon")
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("heartbeat_interval_ms") && stderr.contains("invoker_"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn e2e_bad_requests_are_refused_and_change_nothing() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("e2e-bad-")
        .tempdir_in("/tmp")?;
    let lab = Lab::start(LabOptions::invokers_only(dir.path())).await?;
    let client =
        InvokerClient::wait_for_leader(&lab.invoker_endpoints(), Duration::from_secs(20)).await?;
    let mut admin = client.admin();
    let state = |admin: &mut invoker_api::pb::admin_client::AdminClient<_>| {
        let mut admin = admin.clone();
        async move {
            anyhow::Ok(
                admin
                    .get_state(pb::GetStateRequest { consistency: 0 })
                    .await?
                    .into_inner(),
            )
        }
    };
    let before = state(&mut admin).await?;

    let good = pb::SetRoutingRequest {
        service: "gift-api".into(),
        runs: vec![run("b", BUCKETS as u32)],
        expected_version: 0,
        actor: "e2e".into(),
        reason: "test".into(),
    };
    let cases: Vec<(&str, pb::SetRoutingRequest, tonic::Code, &str)> = vec![
        (
            "unknown service",
            pb::SetRoutingRequest {
                service: "no-such".into(),
                ..good.clone()
            },
            tonic::Code::NotFound,
            "unknown service",
        ),
        (
            "table of the wrong size",
            pb::SetRoutingRequest {
                runs: vec![run("b", 1000)],
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "exactly 1024",
        ),
        (
            "unknown site",
            pb::SetRoutingRequest {
                runs: vec![run("c", BUCKETS as u32)],
                ..good.clone()
            },
            tonic::Code::NotFound,
            "unknown site",
        ),
        (
            "traffic to the witness",
            pb::SetRoutingRequest {
                runs: vec![run("witness", BUCKETS as u32)],
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "witness",
        ),
        (
            "no reason",
            pb::SetRoutingRequest {
                reason: "  ".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "reason is required",
        ),
        (
            "stale expected version",
            pb::SetRoutingRequest {
                expected_version: 99,
                ..good.clone()
            },
            tonic::Code::FailedPrecondition,
            "not the expected 99",
        ),
        (
            "service name with spaces",
            pb::SetRoutingRequest {
                service: "gift api".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "invalid service name",
        ),
    ];
    for (what, request, code, needle) in cases {
        phase(what);
        let err = admin.set_routing(request).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(
            err.message().contains(needle),
            "{what}: {needle:?} not in {:?}",
            err.message()
        );
    }

    phase("a topology that changes a service's class is refused whole");
    let err = admin
        .apply_topology(pb::ApplyTopologyRequest {
            topology: Some(pb::Topology {
                sites: vec![pb::SiteSpec {
                    id: "c".into(),
                    role: pb::SiteRole::Site as i32,
                }],
                services: vec![pb::ServiceSpec {
                    name: "gift-api".into(),
                    class: pb::ServiceClass::Strong as i32,
                    routing_weights: [("a".to_string(), 1)].into_iter().collect(),
                    writer: Some(pb::WriterSpec {
                        site: "a".into(),
                        dsn: "postgres://x".into(),
                        ..Default::default()
                    }),
                }],
            }),
            actor: "e2e".into(),
            reason: "bad".into(),
        })
        .await
        .expect_err("class change");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    phase("garbage bytes on the gRPC port of every node");
    for addr in lab.invoker_endpoints() {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"\x00\xffGARBAGE\r\n\r\nnot http/2 at all",
        )
        .await?;
        let mut buf = [0u8; 256];
        // The server answers with a protocol error or closes; either way it must not hang.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
        )
        .await
        .context("server neither answered nor closed garbage")?;
    }

    phase("every node still serves, health says SERVING, the state is untouched");
    for addr in lab.invoker_endpoints() {
        let channel = invoker_api::client::channel(&addr)?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for service in ["", "invoker.v1.Admin"] {
            let reply = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await?
                .into_inner();
            assert_eq!(
                reply.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            );
        }
    }
    let after = state(&mut admin).await?;
    assert_eq!(after, before);

    phase("reflection lists the invoker services (so grpcurl works)");
    let channel = invoker_api::client::channel(&lab.invoker_endpoints()[0])?;
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.message().await?.context("a reflection reply")?;
    let listed = format!("{reply:?}");
    for service in [
        "invoker.v1.Admin",
        "invoker.v1.RoutingWatch",
        "invoker.v1.AgentSession",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(service), "{service} not in {listed}");
    }
    lab.down().await?;
    Ok(())
}
