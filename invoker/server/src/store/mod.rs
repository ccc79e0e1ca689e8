//! Durable raft storage, two files per node in `data_dir`:
//!
//! - `raft.log`: the log entries, an append-only preallocated WAL ([`wal`]); a group of appends
//!   is fdatasync'd before openraft is told it is flushed.
//! - `raft.redb`: table `raft_meta` (vote, committed log id, last purged log id) and table
//!   `snapshot` (the current snapshot, meta and data, written durably before it is used).
//!
//! The state machine lives in memory and is rebuilt at start from the snapshot plus the
//! committed log (openraft re-applies `(snapshot, committed]` using the saved committed id).

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); boxing it here
// would only move the allocation.
#![allow(clippy::result_large_err)]

mod log;
mod state_machine;
mod wal;

use std::path::Path;
use std::sync::Arc;

pub use log::LogStore;
pub use state_machine::{SmEvent, SmView, StateMachineStore};

use crate::InvokerError;

pub(crate) const META_TABLE: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("raft_meta");
pub(crate) const SNAPSHOT_TABLE: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("snapshot");

/// Opens (or creates) the node's database and returns the log store and state machine.
pub async fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), InvokerError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| InvokerError::Storage(format!("cannot create {}: {e}", data_dir.display())))?;
    let path = data_dir.join("raft.redb");
    let db = redb::Database::create(&path)
        .map_err(|e| InvokerError::Storage(format!("cannot open {}: {e}", path.display())))?;
    let db = Arc::new(db);
    // Create the tables up front so readers never see "table does not exist".
    let txn = db.begin_write().map_err(storage)?;
    {
        txn.open_table(META_TABLE).map_err(storage)?;
        txn.open_table(SNAPSHOT_TABLE).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    let sm = StateMachineStore::open(db.clone()).await?;
    Ok((LogStore::open(db, data_dir)?, sm))
}

fn storage(e: impl std::fmt::Display) -> InvokerError {
    InvokerError::Storage(e.to_string())
}

/// Maps a storage failure to openraft's error (which stops the raft core: a node that cannot
/// write its log must not keep voting).
pub(crate) fn sto_err(
    kind: fn(openraft::AnyError) -> openraft::StorageIOError<u64>,
    e: impl std::fmt::Display,
) -> openraft::StorageError<u64> {
    kind(openraft::AnyError::error(e.to_string())).into()
}
