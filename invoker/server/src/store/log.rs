//! The raft log store.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{sto_err, LOG_TABLE, META_TABLE};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";

/// The raft log in redb. Cloning shares the database (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last committed index openraft told us about; shown in status as the commit index.
    committed_index: Arc<AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> LogStore {
        LogStore {
            db,
            committed_index: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Shared view of the commit index (0 before anything is committed).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| sto_err(StorageIOError::read, e))?;
        let table = txn
            .open_table(META_TABLE)
            .map_err(|e| sto_err(StorageIOError::read, e))?;
        let Some(value) = table
            .get(key)
            .map_err(|e| sto_err(StorageIOError::read, e))?
        else {
            return Ok(None);
        };
        bincode::deserialize(value.value())
            .map(Some)
            .map_err(|e| sto_err(StorageIOError::read, e))
    }

    /// Writes one meta key durably (vote and committed must survive a crash).
    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        kind: fn(openraft::AnyError) -> StorageIOError<u64>,
    ) -> Result<(), StorageError> {
        let bytes = bincode::serialize(value).map_err(|e| sto_err(kind, e))?;
        let db = self.db.clone();
        run_blocking(move || {
            let txn = db.begin_write().map_err(|e| sto_err(kind, e))?;
            {
                let mut table = txn.open_table(META_TABLE).map_err(|e| sto_err(kind, e))?;
                table
                    .insert(key, bytes.as_slice())
                    .map_err(|e| sto_err(kind, e))?;
            }
            txn.commit().map_err(|e| sto_err(kind, e))
        })
        .await
    }
}

/// Runs blocking redb work (an fsync) off the async runtime's worker threads.
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sto_err(StorageIOError::write, e))?
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Some(i + 1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let txn = self
            .db
            .begin_read()
            .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let table = txn
            .open_table(LOG_TABLE)
            .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let iter = match end {
            Some(end) => table.range(start..end),
            None => table.range(start..),
        }
        .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let mut entries = Vec::new();
        for item in iter {
            let (_, value) = item.map_err(|e| sto_err(StorageIOError::read_logs, e))?;
            let entry: Entry = bincode::deserialize(value.value())
                .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(PURGED_KEY)?;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let table = txn
            .open_table(LOG_TABLE)
            .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let last = table
            .last()
            .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
        let last_log_id = match last {
            None => last_purged_log_id,
            Some((_, value)) => {
                let entry: Entry = bincode::deserialize(value.value())
                    .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE_KEY, vote, StorageIOError::write_vote)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(log_id) = committed {
            self.committed_index.store(log_id.index, Ordering::Relaxed);
        }
        self.write_meta(COMMITTED_KEY, &committed, StorageIOError::write)
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self.read_meta(COMMITTED_KEY)?;
        let committed = committed.flatten();
        if let Some(log_id) = committed {
            self.committed_index.store(log_id.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes =
                bincode::serialize(&entry).map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        // The commit below is durable (fsync) when it returns: only then is openraft told the
        // entries are flushed, so no node ever acknowledges an entry it could lose.
        let result = run_blocking(move || {
            let txn = db
                .begin_write()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            {
                let mut table = txn
                    .open_table(LOG_TABLE)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                for (index, bytes) in &encoded {
                    table
                        .insert(*index, bytes.as_slice())
                        .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                }
            }
            txn.commit()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))
        })
        .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        run_blocking(move || {
            let txn = db
                .begin_write()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            {
                let mut table = txn
                    .open_table(LOG_TABLE)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            }
            txn.commit()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes =
            bincode::serialize(&log_id).map_err(|e| sto_err(StorageIOError::write_logs, e))?;
        let db = self.db.clone();
        run_blocking(move || {
            let txn = db
                .begin_write()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            {
                // Record the purge point first, in the same transaction, so a crash never
                // leaves a hole that get_log_state cannot explain.
                let mut meta = txn
                    .open_table(META_TABLE)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                meta.insert(PURGED_KEY, bytes.as_slice())
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                let mut table = txn
                    .open_table(LOG_TABLE)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
            }
            txn.commit()
                .map_err(|e| sto_err(StorageIOError::write_logs, e))
        })
        .await
    }
}
