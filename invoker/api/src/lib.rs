//! The invoker's gRPC API: generated protobuf types and services, the conversions between them
//! and the domain types, and a client that finds the leader among several endpoints.

pub mod client;
pub mod convert;

/// Generated protobuf types and gRPC stubs (package `invoker.v1`).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("invoker.v1");

    /// Encoded descriptors of every invoker proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("invoker_descriptor");
}

pub use client::{ClientError, InvokerClient};
pub use convert::ConvertError;

/// Metadata key set on a request a follower forwards to the leader, so that it is never
/// forwarded twice (no forwarding loops during a leader change).
pub const FORWARDED_HEADER: &str = "x-invoker-forwarded";
