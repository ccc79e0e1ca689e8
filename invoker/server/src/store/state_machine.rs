//! The state machine: applies domain requests to [`invoker_domain::State`] and keeps
//! snapshots durable in redb.

use std::io::Cursor;
use std::sync::Arc;

use invoker_domain::{Change, Request, Response, State};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use redb::{Database, ReadableDatabase};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, RwLock};

use super::{sto_err, SNAPSHOT_TABLE};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::InvokerError;

/// Watchers that fall further behind than this get a fresh snapshot instead of the changes.
const EVENT_BUFFER: usize = 4_096;

const SNAPSHOT_META_KEY: &str = "meta";
const SNAPSHOT_DATA_KEY: &str = "data";

/// What the state machine tells watchers after applying.
#[derive(Debug, Clone)]
pub enum SmEvent {
    /// Changes made by the entry at `revision` (a log index).
    Changes {
        revision: u64,
        changes: Arc<Vec<Change>>,
    },
    /// The whole state was replaced (a snapshot was installed): re-read it.
    Reset,
}

/// The applied state, shared with readers.
#[derive(Debug, Default)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: State,
}

/// What gets serialised into a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: State,
}

/// A read handle on the applied state and its change stream.
#[derive(Clone)]
pub struct SmView {
    data: Arc<RwLock<SmData>>,
    events: broadcast::Sender<SmEvent>,
}

impl SmView {
    pub async fn read(&self) -> tokio::sync::RwLockReadGuard<'_, SmData> {
        self.data.read().await
    }

    /// Subscribe before reading the state, so that no change falls in between.
    pub fn subscribe(&self) -> broadcast::Receiver<SmEvent> {
        self.events.subscribe()
    }
}

pub struct StateMachineStore {
    db: Arc<Database>,
    view: SmView,
    snapshot_seq: u64,
}

impl StateMachineStore {
    /// Loads the last durable snapshot, if any; openraft re-applies the committed log after it.
    pub(crate) async fn open(db: Arc<Database>) -> Result<StateMachineStore, InvokerError> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let store = StateMachineStore {
            db,
            view: SmView {
                data: Arc::new(RwLock::new(SmData::default())),
                events,
            },
            snapshot_seq: 0,
        };
        if let Some((_meta, data)) = load_snapshot(&store.db)
            .map_err(|e| InvokerError::Storage(format!("loading snapshot: {e}")))?
        {
            let body: SnapshotBody = bincode::deserialize(&data)
                .map_err(|e| InvokerError::Storage(format!("decoding snapshot: {e}")))?;
            *store.view.data.write().await = SmData {
                last_applied: body.last_applied,
                last_membership: body.last_membership,
                state: body.state,
            };
        }
        Ok(store)
    }

    pub fn view(&self) -> SmView {
        self.view.clone()
    }
}

/// Builds snapshots from a copy of the state taken under the read lock.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    view: SmView,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (body, last_applied, last_membership) = {
            let data = self.view.data.read().await;
            let body = bincode::serialize(&SnapshotBody {
                last_applied: data.last_applied,
                last_membership: data.last_membership.clone(),
                state: data.state.clone(),
            })
            .map_err(|e| sto_err(write_snapshot_err, e))?;
            (body, data.last_applied, data.last_membership.clone())
        };
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        persist_snapshot(self.db.clone(), &meta, &body).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = body.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(body)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let data = self.view.data.read().await;
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut data = self.view.data.write().await;
        for entry in entries {
            data.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::Internal,
                EntryPayload::Membership(membership) => {
                    data.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::Internal
                }
                EntryPayload::Normal(request) => {
                    let (response, changes) =
                        apply_one(&mut data.state, entry.log_id.index, &request);
                    if !changes.is_empty() {
                        // No receiver is fine: nobody watches.
                        let _ = self.view.events.send(SmEvent::Changes {
                            revision: entry.log_id.index,
                            changes: Arc::new(changes),
                        });
                    }
                    response
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            view: self.view.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let body: SnapshotBody =
            bincode::deserialize(&bytes).map_err(|e| sto_err(read_snapshot_err, e))?;
        persist_snapshot(self.db.clone(), meta, &bytes).await?;
        {
            let mut data = self.view.data.write().await;
            *data = SmData {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                state: body.state,
            };
        }
        tracing::info!(snapshot = %meta.snapshot_id, bytes = bytes.len(), "snapshot installed");
        let _ = self.view.events.send(SmEvent::Reset);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let loaded = load_snapshot(&self.db)?;
        Ok(loaded.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

fn read_snapshot_err(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::read_snapshot(None, e)
}

fn write_snapshot_err(e: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::write_snapshot(None, e)
}

fn load_snapshot(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
    let read = |e: redb::Error| sto_err(read_snapshot_err, e);
    let txn = db.begin_read().map_err(|e| read(e.into()))?;
    let table = txn.open_table(SNAPSHOT_TABLE).map_err(|e| read(e.into()))?;
    let meta = table.get(SNAPSHOT_META_KEY).map_err(|e| read(e.into()))?;
    let data = table.get(SNAPSHOT_DATA_KEY).map_err(|e| read(e.into()))?;
    match (meta, data) {
        (Some(meta), Some(data)) => {
            let meta: SnapshotMeta =
                bincode::deserialize(meta.value()).map_err(|e| sto_err(read_snapshot_err, e))?;
            Ok(Some((meta, data.value().to_vec())))
        }
        _ => Ok(None),
    }
}

/// Makes a snapshot durable (fsync): meta and data in one transaction.
async fn persist_snapshot(
    db: Arc<Database>,
    meta: &SnapshotMeta,
    data: &[u8],
) -> Result<(), StorageError> {
    let meta_bytes = bincode::serialize(meta).map_err(|e| sto_err(write_snapshot_err, e))?;
    let data = data.to_vec();
    tokio::task::spawn_blocking(move || {
        let write = |e: redb::Error| sto_err(write_snapshot_err, e);
        let txn = db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut table = txn
                .open_table(SNAPSHOT_TABLE)
                .map_err(|e| write(e.into()))?;
            table
                .insert(SNAPSHOT_META_KEY, meta_bytes.as_slice())
                .map_err(|e| write(e.into()))?;
            table
                .insert(SNAPSHOT_DATA_KEY, data.as_slice())
                .map_err(|e| write(e.into()))?;
        }
        txn.commit().map_err(|e| write(e.into()))
    })
    .await
    .map_err(|e| sto_err(write_snapshot_err, e))?
}

fn apply_one(state: &mut State, index: u64, request: &Request) -> (Response, Vec<Change>) {
    let span = tracing::info_span!("invoker.apply", command = request.command.name(), index);
    let _enter = span.enter();
    state.apply(index, request)
}
