//! The workload the platform protects: gift API, wallet, settlement/outbox worker, reconciliation and load generator on PostgreSQL.
//!
//! This crate is intentionally empty in this version: the services are built in issue #3.
