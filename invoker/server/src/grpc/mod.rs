//! The gRPC services of a node, all on one port, with grpc.health.v1 and reflection.

mod admin;
mod agent;
mod raft;
mod routing;

use std::sync::Arc;

use invoker_api::pb;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::network::MAX_RAFT_MESSAGE_BYTES;
use crate::node::{Node, ProposeError};
use crate::InvokerError;

/// Largest admin request accepted (a topology with many services fits easily).
const MAX_ADMIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub fn router(node: Arc<Node>) -> Result<Router, InvokerError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Every service is served as long as the process runs; leadership is visible in status,
    // not in health (a follower answers and forwards).
    let names = [
        "invoker.v1.Admin",
        "invoker.v1.RoutingWatch",
        "invoker.v1.AgentSession",
        "invoker.v1.RaftTransport",
        "",
    ];
    tokio::spawn(async move {
        for name in names {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
    });
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| InvokerError::Serve(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| InvokerError::Serve(format!("reflection: {e}")))?;

    let raft = pb::raft_transport_server::RaftTransportServer::new(raft::RaftService::new(
        node.raft.clone(),
    ))
    .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
    let admin = pb::admin_server::AdminServer::new(admin::AdminService::new(node.clone()))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES);
    let routing = pb::routing_watch_server::RoutingWatchServer::new(routing::RoutingService::new(
        node.clone(),
    ));
    let agent = {
        let (observations, inbox) = tokio::sync::mpsc::channel(crate::policy_loop::INBOX);
        tokio::spawn(crate::policy_loop::run(node.clone(), inbox));
        pb::agent_session_server::AgentSessionServer::new(agent::AgentService::new(
            node.clone(),
            observations,
        ))
    }
    .max_decoding_message_size(agent::MAX_AGENT_MESSAGE_BYTES);

    Ok(Server::builder()
        .tcp_nodelay(true)
        .trace_fn(|request| tracing::debug_span!("grpc", path = %request.uri().path()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(raft)
        .add_service(admin)
        .add_service(routing)
        .add_service(agent))
}

/// Maps a failed proposal to a gRPC status with a message an operator can act on.
pub(crate) fn propose_status(e: ProposeError) -> tonic::Status {
    match e {
        ProposeError::NotLeader(Some(addr)) => {
            tonic::Status::unavailable(format!("not the leader; the leader is {addr}"))
        }
        ProposeError::NotLeader(None) => {
            tonic::Status::unavailable("no leader known (election in progress); retry shortly")
        }
        ProposeError::Refused(e) => domain_status(&e),
        ProposeError::Raft(msg) => tonic::Status::unavailable(format!("raft: {msg}")),
    }
}

pub(crate) fn domain_status(e: &invoker_domain::DomainError) -> tonic::Status {
    use invoker_domain::DomainError as D;
    let message = e.to_string();
    match e {
        D::UnknownSite(_) | D::UnknownService(_) | D::UnknownProposal(_) => {
            tonic::Status::not_found(message)
        }
        D::VersionConflict { .. }
        | D::SiteRoleChange { .. }
        | D::ServiceClassChange { .. }
        | D::ApprovalRefused(_)
        | D::StaleProposal(_) => tonic::Status::failed_precondition(message),
        _ => tonic::Status::invalid_argument(message),
    }
}
