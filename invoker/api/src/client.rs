//! A client for an invoker cluster that finds the leader among several endpoints.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::routing_watch_client::RoutingWatchClient;

/// Connect timeout per endpoint: loopback and same-city links answer in milliseconds, and an
/// operator waiting on a dead node wants the next endpoint quickly.
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Deadline of one status probe during leader discovery.
const PROBE_TIMEOUT_MS: u64 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("no invoker node reachable: {}", .0.join("; "))]
    Unreachable(Vec<String>),
    #[error("reachable nodes know no leader yet (election in progress?): {}", .0.join(", "))]
    NoLeader(Vec<String>),
    #[error(transparent)]
    Status(#[from] tonic::Status),
}

/// Normalises `host:port` to `http://host:port`.
pub fn endpoint_uri(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// Opens a channel to one node (lazily connected; the first call connects).
pub fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    channel_from(endpoint, None)
}

/// Like [`channel`], with connections made from `local_ip` (the caller's own site address).
pub fn channel_from(
    endpoint: &str,
    local_ip: Option<std::net::IpAddr>,
) -> Result<Channel, ClientError> {
    let uri = endpoint_uri(endpoint);
    let ep = Endpoint::from_shared(uri).map_err(|e| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .tcp_nodelay(true)
        .local_address(local_ip)
        .connect_lazy())
}

/// A connection to one invoker node, normally the leader.
#[derive(Clone, Debug)]
pub struct InvokerClient {
    endpoint: String,
    channel: Channel,
}

impl InvokerClient {
    /// Connects to the leader: asks each endpoint for its status and follows the leader it
    /// names. Fails if no endpoint answers or none knows a leader.
    pub async fn connect_leader(endpoints: &[String]) -> Result<InvokerClient, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut errors = Vec::new();
        let mut leaderless = Vec::new();
        for endpoint in endpoints {
            let node = InvokerClient::connect_node(endpoint)?;
            match node.probe_status().await {
                Err(e) => errors.push(format!("{endpoint}: {}", short_status(&e))),
                Ok(status) if status.leader_id == 0 || status.leader_addr.is_empty() => {
                    leaderless.push(endpoint.clone())
                }
                Ok(status) if status.leader_id == status.node_id => return Ok(node),
                Ok(status) => {
                    let leader = InvokerClient::connect_node(&status.leader_addr)?;
                    match leader.probe_status().await {
                        Ok(s) if s.leader_id == s.node_id => return Ok(leader),
                        Ok(_) => leaderless.push(status.leader_addr.clone()),
                        Err(e) => errors.push(format!(
                            "leader {} named by {endpoint}: {}",
                            status.leader_addr,
                            short_status(&e)
                        )),
                    }
                }
            }
        }
        if leaderless.is_empty() {
            Err(ClientError::Unreachable(errors))
        } else {
            Err(ClientError::NoLeader(leaderless))
        }
    }

    /// Connects to the leader, retrying discovery until `timeout` passes (for use right after
    /// nodes start or while an election runs).
    pub async fn wait_for_leader(
        endpoints: &[String],
        timeout: Duration,
    ) -> Result<InvokerClient, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match InvokerClient::connect_leader(endpoints).await {
                Ok(client) => return Ok(client),
                Err(e @ (ClientError::NoEndpoints | ClientError::InvalidEndpoint { .. })) => {
                    return Err(e)
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A client of one specific node, leader or not.
    pub fn connect_node(endpoint: &str) -> Result<InvokerClient, ClientError> {
        Ok(InvokerClient {
            endpoint: endpoint.to_string(),
            channel: channel(endpoint)?,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    pub fn routing_watch(&self) -> RoutingWatchClient<Channel> {
        RoutingWatchClient::new(self.channel.clone())
    }

    pub async fn status(&self) -> Result<pb::ClusterStatus, ClientError> {
        Ok(self
            .admin()
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner())
    }

    async fn probe_status(&self) -> Result<pb::ClusterStatus, tonic::Status> {
        let mut request = tonic::Request::new(pb::GetStatusRequest {});
        request.set_timeout(Duration::from_millis(PROBE_TIMEOUT_MS));
        self.admin()
            .get_status(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn short_status(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
