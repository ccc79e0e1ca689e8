//! Drills for the gift platform. For now: the local two-site lab ([`lab`]), which starts the
//! whole deployment as child processes so that tests and people can kill, pause or partition
//! any part of it.

pub mod bench;
pub mod lab;
pub mod loadgen;
pub mod scenarios;
pub mod wallet_failover;

pub use lab::{
    down_dir, Components, DownReport, Lab, LabDescription, LabError, LabOptions, ProcessInfo,
    ProcessKind, RaftOverrides,
};
