//! The agent session API. Its shape is fixed in `agent.proto`; sessions themselves (reports in,
//! commands out) are built with the site agents and the policy loop.

use std::pin::Pin;

use futures::Stream;
use invoker_api::pb;
use tonic::{Request, Response, Status, Streaming};

/// Largest agent message accepted: a report of a few hundred probes is a few tens of kB.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 1024 * 1024;

pub struct AgentService;

#[tonic::async_trait]
impl pb::agent_session_server::AgentSession for AgentService {
    type SessionStream =
        Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send + 'static>>;

    async fn session(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented(
            "agent sessions are not served by this invoker version yet (they arrive with the site agents)",
        ))
    }
}
