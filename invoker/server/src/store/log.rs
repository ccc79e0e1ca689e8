//! The raft log store.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{sto_err, LOG_TABLE, META_TABLE};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";

/// Most queued jobs one group commit takes; bounds one transaction's size.
const MAX_GROUP_JOBS: usize = 4_096;

/// The raft log in redb, with group commit.
///
/// `append` returns as soon as the entries are readable (kept in memory) and queues them for a
/// writer thread. The writer takes every job queued at that moment, writes them in one redb
/// transaction, commits it durably (one fsync for the whole group), and only then tells
/// openraft that those entries are flushed. Under load many client writes share one fsync,
/// which is how the log keeps up with etcd's WAL.
///
/// Cloning shares everything (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last committed index openraft told us about; shown in status as the commit index.
    committed_index: Arc<AtomicU64>,
    /// Appended but not yet durable; readers see them. Index -> entry.
    unflushed: Arc<Mutex<BTreeMap<u64, Entry>>>,
    /// The latest committed id from openraft, written by the next group commit.
    committed: Arc<Mutex<Option<LogId>>>,
    writer: std::sync::mpsc::Sender<Job>,
}

enum Job {
    Append {
        entries: Vec<(LogId, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        from: u64,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: LogId,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Result<LogStore, crate::InvokerError> {
        let (writer, jobs) = std::sync::mpsc::channel();
        let unflushed = Arc::new(Mutex::new(BTreeMap::new()));
        let thread_db = db.clone();
        let thread_unflushed = unflushed.clone();
        let committed = Arc::new(Mutex::new(None));
        let thread_committed = committed.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(&thread_db, &thread_unflushed, &thread_committed, &jobs))
            .map_err(|e| {
                crate::InvokerError::Storage(format!("cannot start the log writer: {e}"))
            })?;
        Ok(LogStore {
            db,
            committed_index: Arc::new(AtomicU64::new(0)),
            unflushed,
            committed,
            writer,
        })
    }

    /// Shared view of the commit index (0 before anything is committed).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        // A poisoned lock means a panic while holding it; the map itself is still consistent
        // (every mutation is a single insert/remove), so keep going.
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send_and_wait(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), String>>) -> Job,
    ) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer
            .send(make(tx))
            .map_err(|_| sto_err(StorageIOError::write_logs, "the log writer has stopped"))?;
        rx.await
            .map_err(|_| sto_err(StorageIOError::write_logs, "the log writer has stopped"))?
            .map_err(|e| sto_err(StorageIOError::write_logs, e))
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

    /// Writes one meta key durably (the vote must survive a crash).
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
        // Unflushed entries first, then the database: the writer removes an entry from memory
        // only after its commit, so in this order no entry can fall between the two reads.
        let pending: Vec<(u64, Entry)> = {
            let unflushed = self.unflushed();
            let iter = match end {
                Some(end) => unflushed.range(start..end),
                None => unflushed.range(start..),
            };
            iter.map(|(i, e)| (*i, e.clone())).collect()
        };
        let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
        {
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
            for item in iter {
                let (key, value) = item.map_err(|e| sto_err(StorageIOError::read_logs, e))?;
                let entry: Entry = bincode::deserialize(value.value())
                    .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
                entries.insert(key.value(), entry);
            }
        }
        entries.extend(pending);
        Ok(entries.into_values().collect())
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
        let stored = match last {
            None => None,
            Some((_, value)) => {
                let entry: Entry = bincode::deserialize(value.value())
                    .map_err(|e| sto_err(StorageIOError::read_logs, e))?;
                Some(entry.log_id)
            }
        };
        let pending = self.unflushed().last_key_value().map(|(_, e)| e.log_id);
        let last_log_id = pending.max(stored).or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // The vote must survive a crash: a node that forgets its vote could vote twice in a term.
        self.write_meta(VOTE_KEY, vote, StorageIOError::write_vote)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and written by the next group commit, never on its own: a separate
        // transaction would wait for the writer's fsync while openraft's core waits for it.
        // Losing the latest value in a crash is safe: an older committed id is still
        // committed, and raft re-learns the rest from the leader.
        if let Some(log_id) = committed {
            self.committed_index.store(log_id.index, Ordering::Relaxed);
        }
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = committed;
        Ok(())
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
        {
            let mut unflushed = self.unflushed();
            for entry in entries {
                let bytes = bincode::serialize(&entry)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                encoded.push((entry.log_id, bytes));
                unflushed.insert(entry.log_id.index, entry);
            }
        }
        // Readable now; durable when the writer calls back.
        self.writer
            .send(Job::Append {
                entries: encoded,
                callback,
            })
            .map_err(|_| sto_err(StorageIOError::write_logs, "the log writer has stopped"))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut unflushed = self.unflushed();
            let _ = unflushed.split_off(&log_id.index);
        }
        let from = log_id.index;
        self.send_and_wait(|done| Job::Truncate { from, done })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut unflushed = self.unflushed();
            let keep = unflushed.split_off(&(log_id.index + 1));
            *unflushed = keep;
        }
        self.send_and_wait(|done| Job::Purge { upto: log_id, done })
            .await
    }
}

/// The writer thread: one durable redb transaction per group of queued jobs, applied in
/// queue order; callbacks only after the commit returns.
fn write_loop(
    db: &Database,
    unflushed: &Mutex<BTreeMap<u64, Entry>>,
    committed: &Mutex<Option<LogId>>,
    jobs: &std::sync::mpsc::Receiver<Job>,
) {
    let mut written_committed: Option<LogId> = None;
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_JOBS {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let latest = *committed.lock().unwrap_or_else(|p| p.into_inner());
        let committed_to_write = (latest != written_committed).then_some(latest);
        let result = write_group(db, &group, committed_to_write).map_err(|e| e.to_string());
        if result.is_ok() {
            written_committed = latest;
        }
        if result.is_ok() {
            let mut unflushed = unflushed.lock().unwrap_or_else(|p| p.into_inner());
            for job in &group {
                if let Job::Append { entries, .. } = job {
                    for (log_id, _) in entries {
                        // Only if it is still the same entry (a truncate may have replaced it).
                        if unflushed
                            .get(&log_id.index)
                            .is_some_and(|e| e.log_id == *log_id)
                        {
                            unflushed.remove(&log_id.index);
                        }
                    }
                }
            }
        } else if let Err(e) = &result {
            tracing::error!("raft log write failed: {e}");
        }
        for job in group {
            match job {
                Job::Append { callback, .. } => {
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other))
                }
                Job::Truncate { done, .. } | Job::Purge { done, .. } => {
                    let _ = done.send(result.clone());
                }
            }
        }
    }
}

fn write_group(
    db: &Database,
    group: &[Job],
    committed: Option<Option<LogId>>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut log = txn.open_table(LOG_TABLE)?;
        let mut meta = txn.open_table(META_TABLE)?;
        if let Some(committed) = committed {
            let bytes = bincode::serialize(&committed)
                .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
            meta.insert(COMMITTED_KEY, bytes.as_slice())?;
        }
        for job in group {
            match job {
                Job::Append { entries, .. } => {
                    for (log_id, bytes) in entries {
                        log.insert(log_id.index, bytes.as_slice())?;
                    }
                }
                Job::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                Job::Purge { upto, .. } => {
                    // The purge point and the deletion in one transaction: a crash never leaves
                    // a hole that get_log_state cannot explain.
                    let bytes = bincode::serialize(upto)
                        .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
                    meta.insert(PURGED_KEY, bytes.as_slice())?;
                    log.retain_in(..=upto.index, |_, _| false)?;
                }
            }
        }
    }
    // Durability::Immediate (the default): the commit returns after the fsync.
    txn.commit()?;
    Ok(())
}
