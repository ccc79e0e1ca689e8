//! The raft log store: entries in an append-only WAL file ([`super::wal`]), with group commit.
//!
//! Every live entry (those not yet purged behind a snapshot) is also kept in memory, so reads
//! never touch the disk; the snapshot policy bounds how many there are
//! (`snapshot_logs_since_last + logs_kept_after_snapshot`, plus what arrives meanwhile).
//!
//! `append` returns as soon as the entries are readable in memory and queues them for the
//! writer thread. The writer takes every job queued at that moment, writes them to the WAL,
//! fdatasyncs once for the whole group, and only then tells openraft those entries are
//! flushed. Under load many client writes share one fsync.
//!
//! The vote, the purge point and the committed id live in redb (`raft_meta`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, ReadableDatabase};

use super::wal::Wal;
use super::{sto_err, META_TABLE};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::InvokerError;

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";

/// Most queued jobs one group commit takes; bounds one write's size.
const MAX_GROUP_JOBS: usize = 4_096;
/// The committed id is written to redb at most this often (it is optional state: an older
/// value is still correct).
const COMMITTED_SAVE_INTERVAL_MS: u64 = 1_000;
/// Rewrite the WAL without purged records once they take this much and more than half of it.
const WAL_COMPACT_DEAD_BYTES: u64 = 8 * 1024 * 1024;

/// Cloning shares everything (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last committed index openraft told us about; shown in status as the commit index.
    committed_index: Arc<AtomicU64>,
    /// Every live entry, durable or not yet. Index -> entry.
    entries: Arc<Mutex<BTreeMap<u64, Entry>>>,
    /// The latest committed id from openraft, saved by the writer now and then.
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic while holding it; every mutation under these locks is a
    // single map or value update, so the data is still consistent: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_meta<T: serde::de::DeserializeOwned>(
    db: &Database,
    key: &str,
) -> Result<Option<T>, StorageError> {
    let txn = db
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

/// Writes one meta key durably (commit returns after the fsync).
fn write_meta<T: serde::Serialize>(db: &Database, key: &str, value: &T) -> Result<(), String> {
    let bytes = bincode::serialize(value).map_err(|e| e.to_string())?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(META_TABLE).map_err(|e| e.to_string())?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

impl LogStore {
    /// Opens the WAL in `data_dir`, loads the live entries, starts the writer thread.
    pub(crate) fn open(db: Arc<Database>, data_dir: &Path) -> Result<LogStore, InvokerError> {
        let storage = |e: String| InvokerError::Storage(e);
        let purged: Option<LogId> =
            read_meta(&db, PURGED_KEY).map_err(|e| storage(e.to_string()))?;
        let recovered =
            Wal::open(&data_dir.join("raft.log")).map_err(|e| storage(e.to_string()))?;
        if recovered.discarded_tail {
            tracing::warn!(
                "the raft log ended in a torn or corrupt record (a crash during a write); \
                 it was never acknowledged and has been dropped"
            );
        }
        let mut entries = BTreeMap::new();
        for (index, payload) in recovered.records {
            if purged.is_some_and(|p| index <= p.index) {
                continue;
            }
            let entry: Entry = bincode::deserialize(&payload)
                .map_err(|e| storage(format!("raft log entry {index}: {e}")))?;
            entries.insert(index, entry);
        }
        tracing::info!(entries = entries.len(), purged = ?purged, "raft log loaded");

        let entries = Arc::new(Mutex::new(entries));
        let committed = Arc::new(Mutex::new(None));
        let (writer, jobs) = std::sync::mpsc::channel();
        let thread = Writer {
            db: db.clone(),
            wal: recovered.wal,
            committed: committed.clone(),
            saved_committed: None,
            committed_saved_at: Instant::now(),
            purged: purged.map(|p| p.index),
        };
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || thread.run(&jobs))
            .map_err(|e| storage(format!("cannot start the log writer: {e}")))?;
        Ok(LogStore {
            db,
            committed_index: Arc::new(AtomicU64::new(0)),
            entries,
            committed,
            writer,
        })
    }

    /// Shared view of the commit index (0 before anything is committed).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
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
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(lock(&self.entries)
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = read_meta(&self.db, PURGED_KEY)?;
        let last = lock(&self.entries).last_key_value().map(|(_, e)| e.log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // The vote must survive a crash: a node that forgets its vote could vote twice in a
        // term. Rare (elections only), so its own durable transaction is fine.
        let db = self.db.clone();
        let vote = *vote;
        tokio::task::spawn_blocking(move || write_meta(&db, VOTE_KEY, &vote))
            .await
            .map_err(|e| sto_err(StorageIOError::write_vote, e))?
            .map_err(|e| sto_err(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        read_meta(&self.db, VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and saved by the writer now and then, never on the critical path.
        // Losing the latest value in a crash is safe: an older committed id is still
        // committed, and raft re-learns the rest from the leader.
        if let Some(log_id) = committed {
            self.committed_index.store(log_id.index, Ordering::Relaxed);
        }
        *lock(&self.committed) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = read_meta(&self.db, COMMITTED_KEY)?;
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
            let mut live = lock(&self.entries);
            for entry in entries {
                let bytes = bincode::serialize(&entry)
                    .map_err(|e| sto_err(StorageIOError::write_logs, e))?;
                encoded.push((entry.log_id, bytes));
                live.insert(entry.log_id.index, entry);
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
        let _ = lock(&self.entries).split_off(&log_id.index);
        let from = log_id.index;
        self.send_and_wait(|done| Job::Truncate { from, done })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut live = lock(&self.entries);
            let keep = live.split_off(&(log_id.index + 1));
            *live = keep;
        }
        self.send_and_wait(|done| Job::Purge { upto: log_id, done })
            .await
    }
}

/// The writer thread's state. It alone touches the WAL file.
struct Writer {
    db: Arc<Database>,
    wal: Wal,
    committed: Arc<Mutex<Option<LogId>>>,
    saved_committed: Option<LogId>,
    committed_saved_at: Instant,
    purged: Option<u64>,
}

impl Writer {
    fn run(mut self, jobs: &std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP_JOBS {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let result = self.write_group(&group);
            if let Err(e) = &result {
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
            self.maybe_save_committed();
        }
    }

    /// Applies the group in queue order, then one fdatasync for all of it.
    fn write_group(&mut self, group: &[Job]) -> Result<(), String> {
        for job in group {
            match job {
                Job::Append { entries, .. } => {
                    let records: Vec<(u64, &[u8])> = entries
                        .iter()
                        .map(|(id, bytes)| (id.index, bytes.as_slice()))
                        .collect();
                    self.wal.append(&records).map_err(|e| e.to_string())?;
                }
                Job::Truncate { from, .. } => {
                    self.wal.truncate(*from).map_err(|e| e.to_string())?
                }
                Job::Purge { upto, .. } => {
                    // The purge point is durable before anything relies on it: at the next
                    // start, records at or below it are skipped whatever the WAL still holds.
                    write_meta(&self.db, PURGED_KEY, upto)?;
                    self.purged = Some(upto.index);
                }
            }
        }
        self.wal.sync().map_err(|e| e.to_string())?;
        if group.iter().any(|j| matches!(j, Job::Purge { .. })) {
            self.maybe_compact()?;
        }
        Ok(())
    }

    /// Rewrites the WAL without purged records when they are most of it.
    fn maybe_compact(&mut self) -> Result<(), String> {
        let Some(purged) = self.purged else {
            return Ok(());
        };
        let (used, dead) = self.wal.dead_bytes(purged);
        if dead < WAL_COMPACT_DEAD_BYTES || dead * 2 < used {
            return Ok(());
        }
        let dropped = self.wal.compact(purged).map_err(|e| e.to_string())?;
        tracing::info!(dropped_bytes = dropped, "raft log compacted");
        Ok(())
    }

    fn maybe_save_committed(&mut self) {
        if self.committed_saved_at.elapsed() < Duration::from_millis(COMMITTED_SAVE_INTERVAL_MS) {
            return;
        }
        let latest = *lock(&self.committed);
        if latest == self.saved_committed {
            return;
        }
        match write_meta(&self.db, COMMITTED_KEY, &latest) {
            Ok(()) => {
                self.saved_committed = latest;
                self.committed_saved_at = Instant::now();
            }
            Err(e) => tracing::warn!("saving the committed id failed (harmless; retried): {e}"),
        }
    }
}
