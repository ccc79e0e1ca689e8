//! Following the wallet's writer: the document the invoker publishes to each site's etcd
//! (`/invoker/writers/wallet`):
//!
//! ```json
//! {"site": "a", "epoch": 1, "dsn": "postgres://...", "revision": 123,
//!  "failover_pending": {"proposal": 7, "until_ms": 1764000000000}}
//! ```
//!
//! [`follow`] reads it once, then watches it from the next revision; when etcd goes away it
//! reconnects with capped backoff and keeps the last document (the data plane never waits on
//! the control plane). Documents only move forward: one with a lower `(epoch, revision)` than
//! the one held is ignored, and a document that does not parse is logged and ignored (never a
//! crash, never a rollback). Unknown fields are ignored.
//!
//! While `failover_pending` is in force (`now_ms < until_ms`; `until_ms` is `i64::MAX` while
//! the failover executes) the services refuse every payment write before touching a database
//! ([`pending_message`]): nothing happens, and the caller hears "payments temporarily
//! unavailable".
//!
//! [`Current`] holds what a service writes through (a ledger, a pool) for the writer it
//! follows, swapped whole: a call takes an `Arc` of the current one and finishes on it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where the invoker publishes the wallet's writer.
pub const DEFAULT_WRITER_KEY: &str = "/invoker/writers/wallet";

/// The answer to a payment write while no writer is known (no document yet, no fixed config).
pub const NO_WRITER_MESSAGE: &str = "payments temporarily unavailable: no writer known yet";

const FIRST_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;
/// Longest wait for etcd to connect or answer the initial read.
const ETCD_TIMEOUT: Duration = Duration::from_secs(2);

/// A wallet failover proposal pending approval or executing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPending {
    pub proposal: u64,
    /// Wall-clock ms since the Unix epoch; `i64::MAX` while the failover executes.
    pub until_ms: i64,
}

/// The writer document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterDoc {
    pub site: String,
    pub epoch: u64,
    pub dsn: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub failover_pending: Option<FailoverPending>,
}

impl WriterDoc {
    /// Parses and checks a document (epoch at least 1, a postgres:// DSN).
    pub fn parse(bytes: &[u8]) -> Result<WriterDoc, String> {
        let doc: WriterDoc =
            serde_json::from_slice(bytes).map_err(|e| format!("not a writer document: {e}"))?;
        if doc.epoch == 0 {
            return Err("writer document with epoch 0".into());
        }
        if !doc.dsn.starts_with("postgres://") && !doc.dsn.starts_with("postgresql://") {
            return Err("writer document whose dsn is not a postgres:// URL".into());
        }
        Ok(doc)
    }

    /// The order documents move in.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.revision)
    }

    /// The pending proposal, if a failover is pending at `now_ms`.
    pub fn pending_proposal(&self, now_ms: i64) -> Option<u64> {
        self.failover_pending
            .as_ref()
            .filter(|p| now_ms < p.until_ms)
            .map(|p| p.proposal)
    }

    /// The refusal every payment write gets while a failover is pending at `now_ms`.
    pub fn pending_refusal(&self, now_ms: i64) -> Option<String> {
        self.pending_proposal(now_ms).map(pending_message)
    }
}

/// "payments temporarily unavailable: wallet failover pending (proposal N)".
pub fn pending_message(proposal: u64) -> String {
    format!("payments temporarily unavailable: wallet failover pending (proposal {proposal})")
}

/// Wall-clock ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The refusal for a payment write now, if the followed document says a failover is pending.
pub fn refusal_now(docs: Option<&watch::Receiver<Option<WriterDoc>>>) -> Option<String> {
    let docs = docs?;
    let doc = docs.borrow();
    doc.as_ref()?.pending_refusal(now_ms())
}

/// True if `doc` replaces `held`: not older, and not the same.
fn moves_forward(held: Option<&WriterDoc>, doc: &WriterDoc) -> bool {
    match held {
        None => true,
        Some(held) => doc.position() >= held.position() && held != doc,
    }
}

/// Follows `key` in the etcd at `endpoints` until `stop` turns true. The receiver holds the
/// current document (`None` until the first one arrives).
pub fn follow(
    endpoints: Vec<String>,
    key: String,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<Option<WriterDoc>> {
    let (tx, rx) = watch::channel(None);
    let follower = Follower { endpoints, key, tx };
    tokio::spawn(follower.run(stop));
    rx
}

struct Follower {
    endpoints: Vec<String>,
    key: String,
    tx: watch::Sender<Option<WriterDoc>>,
}

impl Follower {
    /// Takes a document's bytes: parsed, checked, and kept if it moves forward.
    fn offer(&self, bytes: &[u8]) {
        let doc = match WriterDoc::parse(bytes) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(key = %self.key, "ignored: {e}");
                return;
            }
        };
        let taken = self.tx.send_if_modified(|held| {
            if moves_forward(held.as_ref(), &doc) {
                *held = Some(doc.clone());
                true
            } else {
                false
            }
        });
        if taken {
            tracing::info!(
                key = %self.key,
                site = %doc.site,
                epoch = doc.epoch,
                revision = doc.revision,
                pending = ?doc.failover_pending.as_ref().map(|p| p.proposal),
                "writer document"
            );
        } else if self
            .tx
            .borrow()
            .as_ref()
            .is_some_and(|held| doc.position() < held.position())
        {
            tracing::info!(key = %self.key, epoch = doc.epoch, revision = doc.revision, "ignored an older writer document");
        }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff_ms = FIRST_BACKOFF_MS;
        loop {
            let ended = tokio::select! {
                r = self.follow_once(&mut backoff_ms) => r,
                () = stopped(&mut stop) => return,
            };
            if let Err(e) = ended {
                tracing::warn!(key = %self.key, "writer watch: {e}; keeping the last document, retrying in {backoff_ms} ms");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                () = stopped(&mut stop) => return,
            }
            backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
        }
    }

    /// One connection: read the key, then watch it from the next revision until the stream
    /// fails. Resets `backoff_ms` once connected.
    async fn follow_once(&self, backoff_ms: &mut u64) -> Result<(), String> {
        // HTTP/2 keep-alive pings notice a dead or frozen etcd; no request timeout, which
        // would also cut the long-lived watch.
        let options = ConnectOptions::new()
            .with_connect_timeout(ETCD_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), ETCD_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let mut client = tokio::time::timeout(
            ETCD_TIMEOUT,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
        .map_err(|_| "connecting to etcd timed out".to_string())?
        .map_err(|e| format!("connecting to etcd: {e}"))?;
        let got = tokio::time::timeout(ETCD_TIMEOUT, client.get(self.key.as_str(), None))
            .await
            .map_err(|_| "reading the writer document timed out".to_string())?
            .map_err(|e| format!("reading the writer document: {e}"))?;
        let revision = got
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        if let Some(kv) = got.kvs().first() {
            self.offer(kv.value());
        }
        let mut stream = client
            .watch(
                self.key.as_str(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await
            .map_err(|e| format!("watching the writer document: {e}"))?;
        *backoff_ms = FIRST_BACKOFF_MS;
        while let Some(response) = stream
            .message()
            .await
            .map_err(|e| format!("watch stream: {e}"))?
        {
            if response.canceled() {
                return Err(format!(
                    "watch canceled (compacted at {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                ));
            }
            for event in response.events() {
                match (event.event_type(), event.kv()) {
                    (EventType::Put, Some(kv)) => self.offer(kv.value()),
                    _ => {
                        tracing::warn!(key = %self.key, "writer document deleted; keeping the last one")
                    }
                }
            }
        }
        Err("watch stream ended".into())
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits for a document naming another writer than `current` (`(dsn, epoch)`), and makes it
/// current. `None` when the follower is gone.
pub async fn next_writer(
    docs: &mut watch::Receiver<Option<WriterDoc>>,
    current: &mut Option<(String, u64)>,
) -> Option<WriterDoc> {
    loop {
        let doc = docs.borrow_and_update().clone();
        if let Some(doc) = doc {
            let named = (doc.dsn.clone(), doc.epoch);
            if current.as_ref() != Some(&named) {
                *current = Some(named);
                return Some(doc);
            }
        }
        docs.changed().await.ok()?;
    }
}

/// What a service writes through for the current writer, swapped whole.
#[derive(Debug)]
pub struct Current<T> {
    slot: RwLock<Option<Arc<T>>>,
}

impl<T> Current<T> {
    pub fn new(initial: Option<T>) -> Current<T> {
        Current {
            slot: RwLock::new(initial.map(Arc::new)),
        }
    }

    pub fn get(&self) -> Option<Arc<T>> {
        self.slot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `next` current; returns the one it replaces (in-flight calls still hold it).
    pub fn set(&self, next: T) -> Option<Arc<T>> {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        slot.replace(Arc::new(next))
    }
}

/// Metrics of a service that follows the writer.
#[derive(Clone, Debug, Default)]
pub struct WriterMetrics {
    pub epoch: Gauge,
    pub switches: Counter,
    pub refused_pending: Counter,
}

impl WriterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "writer_epoch",
            "Fencing epoch of the writer this instance writes through (0: none known)",
            self.epoch.clone(),
        );
        registry.register(
            "writer_switches",
            "Writer changes taken from the published writer document",
            self.switches.clone(),
        );
        registry.register(
            "writes_refused_failover_pending",
            "Payment writes refused before touching a database while a wallet failover was pending",
            self.refused_pending.clone(),
        );
    }

    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(epoch: u64, revision: u64) -> WriterDoc {
        WriterDoc {
            site: "a".into(),
            epoch,
            dsn: "postgres://postgres@127.0.1.3:5555/gift".into(),
            revision,
            failover_pending: None,
        }
    }

    #[test]
    fn parses_the_published_shape_and_ignores_unknown_fields() {
        let d = WriterDoc::parse(
            br#"{"site":"a","epoch":1,"dsn":"postgres://postgres@127.0.1.3:5555/gift","revision":123,
                 "failover_pending": null, "later_field": {"x": 1}}"#,
        )
        .unwrap();
        assert_eq!(d, doc(1, 123));
        // The invoker's first publisher has no failover_pending at all.
        let d =
            WriterDoc::parse(br#"{"site":"b","epoch":2,"dsn":"postgresql://x/y","revision":5}"#)
                .unwrap();
        assert_eq!(d.failover_pending, None);
        let d = WriterDoc::parse(
            br#"{"site":"a","epoch":1,"dsn":"postgres://h/gift","revision":9,
                 "failover_pending": {"proposal": 7, "until_ms": 1764000000000}}"#,
        )
        .unwrap();
        assert_eq!(
            d.failover_pending,
            Some(FailoverPending {
                proposal: 7,
                until_ms: 1_764_000_000_000
            })
        );
        for bad in [
            &b"not json"[..],
            br#"{"site":"a","epoch":0,"dsn":"postgres://h/g","revision":1}"#,
            br#"{"site":"a","epoch":1,"dsn":"mysql://h/g","revision":1}"#,
            br#"{"site":"a","dsn":"postgres://h/g"}"#,
        ] {
            assert!(
                WriterDoc::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pending_is_until_ms_in_the_future() {
        let mut d = doc(1, 1);
        assert_eq!(d.pending_refusal(1_000), None);
        d.failover_pending = Some(FailoverPending {
            proposal: 7,
            until_ms: 2_000,
        });
        assert_eq!(
            d.pending_refusal(1_999).as_deref(),
            Some("payments temporarily unavailable: wallet failover pending (proposal 7)")
        );
        assert_eq!(d.pending_refusal(2_000), None);
        d.failover_pending = Some(FailoverPending {
            proposal: 8,
            until_ms: i64::MAX,
        });
        assert_eq!(d.pending_proposal(now_ms()), Some(8));
    }

    #[test]
    fn documents_only_move_forward() {
        assert!(moves_forward(None, &doc(1, 1)));
        assert!(moves_forward(Some(&doc(1, 1)), &doc(1, 2)));
        assert!(moves_forward(Some(&doc(1, 9)), &doc(2, 3)));
        assert!(!moves_forward(Some(&doc(2, 3)), &doc(1, 9)));
        assert!(!moves_forward(Some(&doc(2, 3)), &doc(2, 2)));
        assert!(!moves_forward(Some(&doc(2, 3)), &doc(2, 3)));
        // Same position, different content (a pending flag set or cleared): taken.
        let mut pending = doc(2, 3);
        pending.failover_pending = Some(FailoverPending {
            proposal: 1,
            until_ms: 5,
        });
        assert!(moves_forward(Some(&doc(2, 3)), &pending));
    }

    #[tokio::test]
    async fn next_writer_reports_each_new_writer_once() {
        let (tx, mut rx) = watch::channel(None);
        let mut current = Some(("postgres://postgres@127.0.1.3:5555/gift".to_string(), 1));
        tx.send_replace(Some(doc(1, 5)));
        let waiting = tokio::time::timeout(
            Duration::from_millis(50),
            next_writer(&mut rx, &mut current),
        )
        .await;
        assert!(waiting.is_err(), "the same writer is not a new one");
        tx.send_replace(Some(doc(2, 6)));
        let next = next_writer(&mut rx, &mut current).await.unwrap();
        assert_eq!(next.epoch, 2);
        drop(tx);
        assert_eq!(next_writer(&mut rx, &mut current).await, None);
    }
}
