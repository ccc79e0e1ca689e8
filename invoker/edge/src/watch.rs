//! The invoker's routing watch: any node serves it from its own applied state, so the edge
//! takes the endpoints in turn. A stream that fails or ends is replaced by one from the next
//! node after a capped exponential backoff with jitter; the table in use stays meanwhile.
//! Each new table is installed (older versions are ignored) and then written to the state
//! file.

use std::sync::Arc;
use std::time::Duration;

use invoker_api::{convert, pb};
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::routing::{self, Applied, Source, Table};
use crate::server::{Edge, WatchStatus};

const MIN_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// HTTP/2 pings on the stream: a node that froze or was cut off is noticed within about
/// interval + timeout, even though a quiet watch sends nothing for a long time.
const KEEPALIVE_INTERVAL_MS: u64 = 1_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 2_000;

/// How one stream ended.
struct Ended {
    why: String,
    /// It delivered at least one update (the node was healthy for a while).
    delivered: bool,
}

/// Watches until `stop`.
pub async fn run_watch(edge: Arc<Edge>, mut stop: watch::Receiver<bool>) {
    let endpoints = edge.config.invoker_endpoints.clone();
    if endpoints.is_empty() {
        return;
    }
    let mut backoff_ms = MIN_BACKOFF_MS;
    let mut next = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let endpoint = endpoints[next % endpoints.len()].clone();
        next += 1;
        let ended = tokio::select! {
            ended = watch_once(&edge, &endpoint) => ended,
            _ = stop.changed() => return,
        };
        edge.metrics.watch_connected.set(0);
        edge.set_watch_status(WatchStatus {
            connected_to: None,
            last_error: Some(format!("{endpoint}: {}", ended.why)),
        });
        if ended.delivered {
            backoff_ms = MIN_BACKOFF_MS;
        }
        tracing::info!(invoker = %endpoint, "routing watch: {}; next node in about {backoff_ms} ms", ended.why);
        // Jitter: 50-100% of the backoff.
        let sleep_ms = rand::rng().random_range(backoff_ms / 2..=backoff_ms);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            _ = stop.changed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
}

async fn watch_once(edge: &Edge, endpoint: &str) -> Ended {
    let failed = |why: String| Ended {
        why,
        delivered: false,
    };
    let uri = invoker_api::client::endpoint_uri(endpoint);
    let channel = match Endpoint::from_shared(uri) {
        Ok(e) => match e
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .local_address(edge.config.bind_ip)
            .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true)
            .connect()
            .await
        {
            Ok(c) => c,
            Err(e) => return failed(format!("connect: {e}")),
        },
        Err(e) => return failed(format!("bad endpoint: {e}")),
    };
    let mut client = pb::routing_watch_client::RoutingWatchClient::new(channel);
    let request = pb::RoutingWatchRequest {
        services: vec![edge.config.service.clone()],
    };
    let mut stream = match client.watch(request).await {
        Ok(r) => r.into_inner(),
        Err(e) => return failed(format!("{:?}: {}", e.code(), e.message())),
    };
    edge.metrics.watch_connected.set(1);
    edge.set_watch_status(WatchStatus {
        connected_to: Some(endpoint.to_string()),
        last_error: None,
    });
    tracing::info!(invoker = %endpoint, "routing watch open");
    let mut delivered = false;
    loop {
        match stream.message().await {
            Ok(Some(update)) => {
                delivered = true;
                if let Some(pb::routing_update::Update::Routing(table)) = update.update {
                    if table.service == edge.config.service {
                        take(edge, &table).await;
                    }
                }
            }
            Ok(None) => {
                return Ended {
                    why: "the stream ended".into(),
                    delivered,
                }
            }
            Err(e) => {
                return Ended {
                    why: format!("{:?}: {}", e.code(), e.message()),
                    delivered,
                }
            }
        }
    }
}

/// Installs a table from the watch and persists it when it is new.
async fn take(edge: &Edge, table: &pb::RoutingTable) {
    let table = match Table::new(
        &edge.config.service,
        convert::routing_from_pb(table),
        Source::Watch,
    ) {
        Ok(t) => t,
        Err(e) => {
            edge.metrics.routing_update("invalid");
            tracing::warn!("ignoring a table from the watch: {e}");
            return;
        }
    };
    let version = table.version();
    let applied = edge.install(table);
    edge.metrics.routing_update(match applied {
        Applied::Installed => "installed",
        Applied::Confirmed => "confirmed",
        Applied::Unchanged => "unchanged",
        Applied::Stale { .. } => "stale",
    });
    match applied {
        Applied::Installed => {}
        Applied::Confirmed => {
            tracing::info!(version, "the watch confirms the table from the state file");
            return;
        }
        Applied::Unchanged => return,
        Applied::Stale { current } => {
            tracing::warn!(
                version,
                current,
                "ignoring an older table (a lagging node?)"
            );
            return;
        }
    }
    let Some(current) = edge.routing.current() else {
        return;
    };
    tracing::info!(
        version,
        share = ?current.table.share(),
        throttle = ?current.table.throttle_max_rps,
        "routing table installed"
    );
    let path = edge.config.state_file.clone();
    let saved = tokio::task::spawn_blocking(move || routing::save(&path, &current)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            edge.metrics.state_file_errors.inc();
            tracing::warn!("{e}; the table is in use but a restart would not have it");
        }
        Err(e) => {
            edge.metrics.state_file_errors.inc();
            tracing::warn!("saving the state file: {e}");
        }
    }
}
