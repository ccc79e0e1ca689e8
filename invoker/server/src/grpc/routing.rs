//! The data plane's routing watch: tables and writer records, from this node's applied state.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use invoker_api::{convert, pb};
use invoker_domain::Change;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::store::{SmEvent, SmView};

const WATCH_CHANNEL: usize = 256;

pub struct RoutingService {
    node: Arc<Node>,
}

impl RoutingService {
    pub fn new(node: Arc<Node>) -> RoutingService {
        RoutingService { node }
    }
}

type Updates = tokio::sync::mpsc::Sender<Result<pb::RoutingUpdate, Status>>;

/// Sends the current table and writer of every wanted service. Returns the revision sent, or
/// None when the watcher is gone.
async fn send_all(sm: &SmView, wanted: &BTreeSet<String>, tx: &Updates) -> Option<u64> {
    let updates: Vec<pb::RoutingUpdate> = {
        let data = sm.read().await;
        let state = &data.state;
        let want = |s: &String| wanted.is_empty() || wanted.contains(s);
        let revision = state.revision;
        let mut updates: Vec<pb::RoutingUpdate> = state
            .routing
            .iter()
            .filter(|(s, _)| want(s))
            .map(|(s, t)| pb::RoutingUpdate {
                revision,
                update: Some(pb::routing_update::Update::Routing(convert::routing_to_pb(
                    s, t,
                ))),
            })
            .collect();
        updates.extend(state.writers.iter().filter(|(s, _)| want(s)).map(|(s, w)| {
            pb::RoutingUpdate {
                revision,
                update: Some(pb::routing_update::Update::Writer(convert::writer_to_pb(
                    s, w,
                ))),
            }
        }));
        if updates.is_empty() {
            // Still tell the watcher where it stands.
            updates.push(pb::RoutingUpdate {
                revision,
                update: None,
            });
        }
        updates
    };
    let revision = updates.first().map(|u| u.revision).unwrap_or(0);
    for update in updates {
        tx.send(Ok(update)).await.ok()?;
    }
    Some(revision)
}

#[tonic::async_trait]
impl pb::routing_watch_server::RoutingWatch for RoutingService {
    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<pb::RoutingUpdate, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<pb::RoutingWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let wanted: BTreeSet<String> = request.into_inner().services.into_iter().collect();
        for service in &wanted {
            invoker_domain::validate_id("service name", service)
                .map_err(|e| super::domain_status(&e))?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_CHANNEL);
        let sm = self.node.sm.clone();
        tokio::spawn(async move {
            let mut events = sm.subscribe();
            let Some(mut revision) = send_all(&sm, &wanted, &tx).await else {
                return;
            };
            loop {
                match events.recv().await {
                    Ok(SmEvent::Changes {
                        revision: r,
                        changes,
                    }) => {
                        if r <= revision {
                            continue;
                        }
                        revision = r;
                        for change in changes.iter() {
                            let update = match change {
                                Change::Routing { service, table }
                                    if wanted.is_empty() || wanted.contains(service) =>
                                {
                                    pb::routing_update::Update::Routing(convert::routing_to_pb(
                                        service, table,
                                    ))
                                }
                                Change::Writer { service, writer }
                                    if wanted.is_empty() || wanted.contains(service) =>
                                {
                                    pb::routing_update::Update::Writer(convert::writer_to_pb(
                                        service, writer,
                                    ))
                                }
                                _ => continue,
                            };
                            let update = pb::RoutingUpdate {
                                revision: r,
                                update: Some(update),
                            };
                            if tx.send(Ok(update)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(SmEvent::Reset) | Err(RecvError::Lagged(_)) => {
                        match send_all(&sm, &wanted, &tx).await {
                            Some(r) => revision = r,
                            None => return,
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
