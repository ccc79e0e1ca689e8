//! Spans reach an OTLP collector: a tonic OTLP TraceService runs inside the test, the invokers
//! export to it, and a write must produce the admin, propose and apply spans.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use drills::lab::{Lab, LabOptions};
use invoker_api::{pb, InvokerClient};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service.name, span name) of every span received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self
            .spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn run(site: &str, count: u32) -> pb::BucketRun {
    pb::BucketRun {
        site: site.into(),
        count,
    }
}

#[tokio::test]
async fn e2e_invoker_write_exports_spans_over_otlp() -> Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::Builder::new()
        .prefix("e2e-otlp-")
        .tempdir_in("/tmp")?;
    let mut opts = LabOptions::invokers_only(dir.path());
    opts.invoker_env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let lab = Lab::start(opts).await?;
    let client =
        InvokerClient::wait_for_leader(&lab.invoker_endpoints(), Duration::from_secs(20)).await?;
    client
        .admin()
        .set_routing(pb::SetRoutingRequest {
            service: "gift-api".into(),
            runs: vec![run("b", invoker_domain::BUCKETS as u32)],
            expected_version: 0,
            actor: "e2e".into(),
            reason: "trace me".into(),
        })
        .await?;

    let wanted = ["admin.set_routing", "invoker.propose", "invoker.apply"];
    let started = Instant::now();
    loop {
        let seen: Vec<(String, String)> = collector
            .spans
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| {
                !seen
                    .iter()
                    .any(|(service, name)| service == "invoker" && name == w)
            })
            .collect();
        if missing.is_empty() {
            // The apply runs on every node: at least three apply spans for one write.
            let applies = seen.iter().filter(|(_, n)| n == "invoker.apply").count();
            assert!(
                applies >= 3,
                "{applies} apply spans; every node applies the write"
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let names: Vec<&String> = seen.iter().map(|(_, n)| n).collect();
            anyhow::bail!("spans {missing:?} never arrived; got {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lab.down().await?;
    server.abort();
    Ok(())
}
