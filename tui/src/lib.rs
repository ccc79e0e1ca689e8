//! The on-call console (ratatui) on the invoker's admin API (state snapshot + watch stream, proposals).
//!
//! This crate is intentionally empty in this version: the console is built in a later issue, on the admin API in invoker/api/proto/invoker/v1/admin.proto.
