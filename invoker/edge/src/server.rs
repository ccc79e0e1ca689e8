//! Assembles the edge: the shared state, the background tasks (routing watch, registry
//! reads, traffic reports, the agent session), the proxy and admin servers, and the
//! shutdown: on SIGTERM the proxy stops accepting, in-flight requests finish (bounded by
//! `shutdown_grace_ms`), then everything else stops.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use invoker_api::pb;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::EdgeConfig;
use crate::metrics::Metrics;
use crate::report::Traffic;
use crate::routing::{self, Applied, Routing, Table};
use crate::throttle::Throttle;
use crate::upstreams::{DiscoverySettings, Upstreams};
use crate::EdgeError;

/// The routing watch as `/routing` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchStatus {
    /// The invoker node whose stream is open, if any.
    pub connected_to: Option<String>,
    pub last_error: Option<String>,
}

/// Everything the request path, the admin endpoints and the background tasks share.
pub struct Edge {
    pub config: EdgeConfig,
    pub routing: Routing,
    pub throttle: Throttle,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    pub traffic: Arc<Traffic>,
    pub watch_status: Mutex<WatchStatus>,
    /// Pooled keep-alive connections to every upstream instance.
    pub client: reqwest::Client,
}

impl Edge {
    pub fn new(config: EdgeConfig) -> Result<Edge, EdgeError> {
        let sites = config.site_names();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .local_address(config.bind_ip)
            // A proxy passes redirects on to its client; it never follows them.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| EdgeError::Config(format!("building the upstream client: {e}")))?;
        Ok(Edge {
            routing: Routing::default(),
            throttle: Throttle::default(),
            upstreams: Arc::new(Upstreams::new(
                &sites,
                Duration::from_millis(config.failed_instance_skip_ms),
            )),
            metrics: Arc::new(Metrics::new()),
            traffic: Arc::new(Traffic::new(&sites)),
            watch_status: Mutex::new(WatchStatus::default()),
            client,
            config,
        })
    }

    /// Installs a table (see [`Routing::apply`]) and brings the throttle and the metrics in
    /// line with the table now in use.
    pub fn install(&self, table: Table) -> Applied {
        let applied = self.routing.apply(table);
        if matches!(applied, Applied::Installed | Applied::Confirmed) {
            if let Some(current) = self.routing.current() {
                self.throttle
                    .set_limits(&current.table.throttle_max_rps, Instant::now());
                self.metrics.table_in_use(current.version(), current.source);
            }
        }
        applied
    }

    pub fn set_watch_status(&self, status: WatchStatus) {
        *self
            .watch_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = status;
    }

    pub fn watch_status(&self) -> WatchStatus {
        self.watch_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ready: a table, and an instance in every site that holds buckets.
    pub fn readiness(&self) -> Result<(), String> {
        let table = self
            .routing
            .current()
            .ok_or_else(|| "no routing table yet".to_string())?;
        let empty: Vec<&String> = table
            .sites()
            .iter()
            .filter(|s| self.upstreams.count(s) == 0)
            .collect();
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("no instance known in site(s) {empty:?}"))
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, EdgeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| EdgeError::Listen {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// Runs the edge until `shutdown` resolves.
pub async fn serve(
    config: EdgeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), EdgeError> {
    if let Some(dir) = config
        .state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            EdgeError::Config(format!("state_file: cannot create {}: {e}", dir.display()))
        })?;
    }
    let edge = Arc::new(Edge::new(config)?);
    let config = &edge.config;
    match routing::load(&config.state_file, &config.service) {
        Ok(Some(table)) => {
            tracing::info!(
                version = table.version(),
                file = %config.state_file.display(),
                "serving the last known routing table until the watch answers"
            );
            edge.install(table);
        }
        Ok(None) => tracing::info!(
            file = %config.state_file.display(),
            "no state file yet: requests get 503 no_routing until the watch delivers a table"
        ),
        // A bad file must not stop the edge: the watch replaces it.
        Err(e) => tracing::error!("{e}; starting without it"),
    }

    let proxy_listener = bind(config.listen_addr).await?;
    let admin_listener = bind(config.admin_addr).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut background = Vec::new();
    for site in &config.sites {
        let settings = DiscoverySettings {
            service: config.service.clone(),
            site: site.site.clone(),
            etcd_endpoints: site.etcd_endpoints.clone(),
            interval: Duration::from_millis(config.discovery_interval_ms),
            bind_ip: config.bind_ip,
        };
        background.push(tokio::spawn(crate::upstreams::run_discovery(
            settings,
            edge.upstreams.clone(),
            edge.metrics.clone(),
            stop_rx.clone(),
        )));
    }
    background.push(tokio::spawn(crate::watch::run_watch(
        edge.clone(),
        stop_rx.clone(),
    )));
    let (reports_tx, reports_rx) = watch::channel(None);
    background.push(tokio::spawn(crate::report::run_reporter(
        edge.traffic.clone(),
        config.service.clone(),
        Duration::from_millis(config.report_interval_ms),
        reports_tx,
        stop_rx.clone(),
    )));
    let identity = site_agent::session::Identity {
        agent_id: config.agent_id.clone(),
        site: config.site.clone(),
        role: pb::AgentRole::Edge,
        invoker_endpoints: config.invoker_endpoints.clone(),
        bind_ip: config.bind_ip,
    };
    background.push(tokio::spawn(site_agent::session::run(
        identity,
        reports_rx,
        stop_rx.clone(),
    )));

    // Without TCP_NODELAY small responses wait for the client's delayed ACK (~40 ms).
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    };
    let proxy_app =
        crate::proxy::router(edge.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let mut proxy = tokio::spawn(
        axum::serve(proxy_listener.tap_io(nodelay), proxy_app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let mut admin = tokio::spawn(
        axum::serve(admin_listener, crate::admin::router(edge.clone()))
            .with_graceful_shutdown(stopped(admin_stop_rx))
            .into_future(),
    );
    tracing::info!(
        proxy = %config.listen_addr,
        admin = %config.admin_addr,
        service = %config.service,
        sites = ?config.site_names(),
        "edge-router listening"
    );

    let mut stop = stop_rx.clone();
    // The proxy ends by itself once the stop is set (graceful shutdown), and may be seen ended
    // before the stop is: an end counts as a failure only while not stopping.
    let mut proxy_ended = None;
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        r = &mut proxy => proxy_ended = Some(r),
        r = &mut admin => {
            return Err(EdgeError::Serve(format!("the admin server ended: {r:?}")));
        }
    }
    if let Some(r) = &proxy_ended {
        if !*stop_rx.borrow() {
            return Err(EdgeError::Serve(format!("the proxy server ended: {r:?}")));
        }
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tracing::info!(
        grace_ms = config.shutdown_grace_ms,
        "stopping: no new connections; letting in-flight requests finish"
    );
    let drained = match proxy_ended {
        Some(r) => Ok(r),
        None => tokio::time::timeout(grace, &mut proxy).await,
    };
    match drained {
        Ok(Ok(Ok(()))) => {}
        Ok(other) => tracing::warn!("the proxy server ended badly: {other:?}"),
        Err(_) => {
            tracing::warn!("requests still in flight after {grace:?}: exiting anyway");
            proxy.abort();
        }
    }
    let _ = admin_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut admin).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        futures::future::join_all(background),
    )
    .await;
    tracing::info!("edge-router stopped cleanly");
    Ok(())
}
