//! openraft's transport over gRPC: each RPC carries openraft's own message, bincode-encoded.

use std::time::Duration;

use invoker_api::pb;
use invoker_api::pb::raft_transport_client::RaftTransportClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::types::{Member, NodeId, TypeConfig};

/// Largest raft message accepted or sent: a snapshot chunk is at most openraft's default 3 MiB,
/// an append batch far less.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub struct Network {
    rpc_timeout: Duration,
    /// Source address of outgoing raft connections: this node's own address, so that traffic
    /// between sites carries the sites' address ranges (partition rules match on them).
    local_ip: Option<std::net::IpAddr>,
}

impl Network {
    pub fn new(rpc_timeout: Duration, local_ip: Option<std::net::IpAddr>) -> Network {
        Network {
            rpc_timeout,
            local_ip,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        // Lazy: a dead peer costs nothing until an RPC needs it, and reconnects by itself.
        let client = invoker_api::client::channel_from(&node.addr, self.local_ip)
            .ok()
            .map(|channel| {
                RaftTransportClient::new(channel)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            });
        Connection {
            target,
            addr: node.addr.clone(),
            client,
            rpc_timeout: self.rpc_timeout,
        }
    }
}

pub struct Connection {
    target: NodeId,
    addr: String,
    client: Option<RaftTransportClient<Channel>>,
    rpc_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                format!("invalid address {:?} for node {}", self.addr, self.target),
            ))));
        };
        let data =
            bincode::serialize(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut req = tonic::Request::new(pb::RaftPayload { data });
        req.set_timeout(
            option
                .hard_ttl()
                .min(self.rpc_timeout.max(option.soft_ttl())),
        );
        let result = match kind {
            RpcKind::Append => client.append_entries(req).await,
            RpcKind::Vote => client.vote(req).await,
            RpcKind::Snapshot => client.install_snapshot(req).await,
        };
        let reply = result.map_err(|status| {
            let err = TransportError(format!("{}: {}", self.addr, status.message()));
            // A network error, not `Unreachable`: openraft then retries at the heartbeat pace
            // instead of backing off for 500 ms, so a restarted peer hears from the leader
            // before its election timer fires and does not disrupt the cluster with a vote.
            // A dead peer costs one refused connection per heartbeat interval.
            RPCError::Network(NetworkError::new(&err))
        })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}
