//! The pure failover policy: observations in, classifications and decisions (with evidence) out; no I/O, time is an argument.
//!
//! This crate is intentionally empty in this version: the policy is built with automatic failover (issue #4).
