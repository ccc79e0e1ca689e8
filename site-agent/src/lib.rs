//! The per-site agent: discovers and probes local instances, the site's PostgreSQL and the peer site, and streams reports to the invoker leader.
//!
//! This crate is intentionally empty in this version: the agent is built with automatic failover (issue #4); its session API is already fixed in invoker/api/proto/invoker/v1/agent.proto.
