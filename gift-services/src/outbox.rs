//! The outbox worker: claims due events with `FOR UPDATE SKIP LOCKED` (so workers in both
//! sites share the queue without waiting on each other), runs them, and marks them processed.
//!
//! Delivery is at least once: a claim pushes `next_attempt_at` forward by a lease, so an event
//! whose worker died is claimed again after the lease. Every handler is idempotent (see
//! [`crate::saga`]), so a second run changes nothing.
//!
//! Events: `gift_paid` (settlement credit, effect, refund on failure; strong: retried until
//! done) and `activity` (room leaderboard; weak: a few attempts, then dropped with a log line).
//! The worker also finishes orders whose request gave up while `created`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sqlx::Row;
use tokio::sync::watch;

use crate::orders::{EVENT_ACTIVITY, EVENT_GIFT_PAID};
use crate::saga::{Saga, Step};
use crate::GiftError;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub batch: i64,
    /// Sleep when the queue is empty.
    pub idle_poll_ms: u64,
    /// How long a claim is exclusive before another worker may take the event.
    pub claim_lease_ms: u64,
    /// After this many attempts a `gift_paid` effect is given up (refund) and an `activity`
    /// update dropped.
    pub max_attempts: i32,
    /// Orders still `created` after this long are finished by the sweep.
    pub abandon_after_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch: 64,
            idle_poll_ms: 100,
            claim_lease_ms: 10_000,
            max_attempts: 5,
            abandon_after_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    kind: String,
    result: &'static str,
}

#[derive(Clone, Default)]
pub struct WorkerMetrics {
    events: Family<EventLabels, Counter>,
    swept: Counter,
}

impl WorkerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "outbox_events",
            "Outbox events handled, by kind and result (done, retry, dropped, error)",
            self.events.clone(),
        );
        registry.register(
            "abandoned_orders_finished",
            "Orders left 'created' by a request that gave up, finished by the sweep",
            self.swept.clone(),
        );
    }
}

struct Claimed {
    id: i64,
    order_id: String,
    kind: String,
    attempts: i32,
}

pub struct Worker {
    saga: Saga,
    config: WorkerConfig,
    metrics: WorkerMetrics,
}

impl Worker {
    pub fn new(saga: Saga, config: WorkerConfig, metrics: WorkerMetrics) -> Worker {
        Worker {
            saga,
            config,
            metrics,
        }
    }

    fn schema(&self) -> &'static str {
        self.saga.orders.traffic().orders_schema()
    }

    async fn claim(&self) -> Result<Vec<Claimed>, GiftError> {
        let o = self.schema();
        let sql = format!(
            "UPDATE {o}.outbox SET attempts = attempts + 1, \
                 next_attempt_at = now() + make_interval(secs => $2) \
             WHERE id IN (SELECT id FROM {o}.outbox \
                          WHERE processed_at IS NULL AND next_attempt_at <= now() \
                          ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, order_id, kind, attempts"
        );
        let rows = sqlx::query(&sql)
            .bind(self.config.batch)
            .bind(self.config.claim_lease_ms as f64 / 1000.0)
            .fetch_all(self.saga.orders.pool())
            .await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get("id"),
                order_id: r.get("order_id"),
                kind: r.get("kind"),
                attempts: r.get("attempts"),
            })
            .collect())
    }

    async fn finish(&self, id: i64) -> Result<(), GiftError> {
        let sql = format!(
            "UPDATE {}.outbox SET processed_at = now() WHERE id = $1",
            self.schema()
        );
        sqlx::query(&sql)
            .bind(id)
            .execute(self.saga.orders.pool())
            .await?;
        Ok(())
    }

    async fn retry_later(&self, id: i64, attempts: i32) -> Result<(), GiftError> {
        // Exponential backoff, 100 ms doubling, capped at 30 s.
        let backoff_ms = 100u64.saturating_mul(1 << attempts.clamp(0, 9)).min(30_000);
        let sql = format!(
            "UPDATE {}.outbox SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1",
            self.schema()
        );
        sqlx::query(&sql)
            .bind(id)
            .bind(backoff_ms as f64 / 1000.0)
            .execute(self.saga.orders.pool())
            .await?;
        Ok(())
    }

    /// Applies the weak activity update (room leaderboard) once per order for a batch, and
    /// marks those events processed, in one statement.
    async fn activity_batch(&self, events: &[&Claimed]) -> Result<(), GiftError> {
        let o = self.schema();
        let order_ids: Vec<&str> = events.iter().map(|e| e.order_id.as_str()).collect();
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        sqlx::query(&format!(
            "WITH applied AS (INSERT INTO {o}.activity_applied (order_id) \
                              SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING order_id), \
                  scores AS (INSERT INTO {o}.leaderboard (room_id, user_id, score) \
                             SELECT g.room_id, g.user_id, sum(g.amount) FROM {o}.gift_orders g \
                             JOIN applied a ON a.order_id = g.order_id \
                             GROUP BY g.room_id, g.user_id ORDER BY g.room_id, g.user_id \
                             ON CONFLICT (room_id, user_id) DO UPDATE \
                             SET score = leaderboard.score + excluded.score, updated_at = now()) \
             UPDATE {o}.outbox SET processed_at = now() WHERE id = ANY($2)"
        ))
        .bind(&order_ids)
        .bind(&ids)
        .execute(self.saga.orders.pool())
        .await?;
        Ok(())
    }

    /// The common case of a batch of `gift_paid` events, in three statements whatever the
    /// batch size: credit the streamers of every paid order, deliver the effects (concurrently),
    /// mark the delivered orders and their events. Anything else (an effect that failed, an
    /// order not `paid` any more) goes through [`Worker::handle`] one by one.
    async fn gift_paid_batch<'e>(
        &self,
        events: &[&'e Claimed],
    ) -> Vec<(&'e Claimed, &'static str)> {
        let order_ids: Vec<String> = events.iter().map(|e| e.order_id.clone()).collect();
        let paid: Vec<crate::orders::Order> = match self.saga.orders.get_many(&order_ids).await {
            Ok(orders) => orders.into_iter().filter(|o| o.status == "paid").collect(),
            Err(e) => {
                tracing::warn!("outbox batch: {e}");
                return events.iter().map(|e| (*e, "error")).collect();
            }
        };
        if let Err(e) = self.saga.settlement.credit_batch(&paid).await {
            // Credits are idempotent: the one-by-one path retries them.
            tracing::info!("batch credit failed, going one by one: {e}");
        }
        let traffic = self.saga.orders.traffic();
        let deliveries =
            futures::future::join_all(paid.iter().map(|o| self.saga.effects.deliver(o, traffic)))
                .await;
        let delivered: Vec<String> = paid
            .iter()
            .zip(&deliveries)
            .filter(|(_, d)| d.is_ok())
            .map(|(o, _)| o.order_id.clone())
            .collect();
        let delivered_set: std::collections::BTreeSet<&str> =
            delivered.iter().map(String::as_str).collect();
        let (done, rest): (Vec<&Claimed>, Vec<&Claimed>) = events
            .iter()
            .partition(|e| delivered_set.contains(e.order_id.as_str()));
        let mut results = Vec::new();
        let done_ids: Vec<i64> = done.iter().map(|e| e.id).collect();
        match self.saga.orders.deliver_batch(&delivered, &done_ids).await {
            Ok(()) => results.extend(done.into_iter().map(|e| (e, "done"))),
            Err(e) => {
                tracing::warn!("outbox batch: {e}");
                results.extend(done.into_iter().map(|e| (e, "error")));
            }
        }
        for event in rest {
            results.push((event, self.handle(event).await));
        }
        results
    }

    /// Handles one claimed batch; the result label of every event.
    async fn handle_batch<'e>(&self, claimed: &'e [Claimed]) -> Vec<(&'e Claimed, &'static str)> {
        let (gift_paid, other): (Vec<&Claimed>, Vec<&Claimed>) =
            claimed.iter().partition(|e| e.kind == EVENT_GIFT_PAID);
        let (activity, other): (Vec<&Claimed>, Vec<&Claimed>) =
            other.into_iter().partition(|e| e.kind == EVENT_ACTIVITY);
        let mut results = Vec::new();
        if !gift_paid.is_empty() {
            results.extend(self.gift_paid_batch(&gift_paid).await);
        }
        if !activity.is_empty() {
            match self.activity_batch(&activity).await {
                Ok(()) => results.extend(activity.into_iter().map(|e| (e, "done"))),
                Err(e) => {
                    tracing::info!("activity batch failed, going one by one: {e}");
                    for event in activity {
                        results.push((event, self.handle(event).await));
                    }
                }
            }
        }
        for event in other {
            results.push((event, self.handle(event).await));
        }
        results
    }

    /// Applies the weak activity update once for one order (the fallback of the batch).
    async fn activity(&self, order_id: &str) -> Result<(), GiftError> {
        let o = self.schema();
        let mut tx = self.saga.orders.pool().begin().await?;
        let applied = sqlx::query(&format!(
            "INSERT INTO {o}.activity_applied (order_id) VALUES ($1) \
             ON CONFLICT DO NOTHING RETURNING order_id"
        ))
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
        if applied.is_some() {
            sqlx::query(&format!(
                "INSERT INTO {o}.leaderboard (room_id, user_id, score) \
                 SELECT room_id, user_id, amount FROM {o}.gift_orders WHERE order_id = $1 \
                 ON CONFLICT (room_id, user_id) DO UPDATE \
                 SET score = leaderboard.score + excluded.score, updated_at = now()"
            ))
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn handle(&self, event: &Claimed) -> &'static str {
        let last_attempt = event.attempts >= self.config.max_attempts;
        let result = match event.kind.as_str() {
            EVENT_GIFT_PAID => self.saga.deliver(&event.order_id, last_attempt).await,
            EVENT_ACTIVITY => match self.activity(&event.order_id).await {
                Ok(()) => Ok(Step::Finished),
                Err(e) if last_attempt => {
                    tracing::warn!(order = %event.order_id, "activity update dropped after {} attempts: {e}", event.attempts);
                    if let Err(e) = self.finish(event.id).await {
                        tracing::warn!("outbox: {e}");
                    }
                    return "dropped";
                }
                Err(e) => Ok(Step::Retry(e.to_string())),
            },
            other => {
                tracing::error!(
                    id = event.id,
                    "unknown outbox event kind {other:?}; left for an operator"
                );
                return "unknown_kind";
            }
        };
        let outcome = match result {
            Ok(Step::Finished) => self.finish(event.id).await.map(|()| "done"),
            Ok(Step::Retry(why)) => {
                tracing::info!(order = %event.order_id, kind = %event.kind, attempts = event.attempts, "retry later: {why}");
                self.retry_later(event.id, event.attempts)
                    .await
                    .map(|()| "retry")
            }
            Err(e) => {
                // The claim's lease brings it back.
                tracing::warn!(order = %event.order_id, kind = %event.kind, "outbox event failed: {e}");
                Ok("error")
            }
        };
        outcome.unwrap_or_else(|e| {
            tracing::warn!(order = %event.order_id, "outbox bookkeeping failed: {e}");
            "error"
        })
    }

    async fn sweep(&self) -> Result<(), GiftError> {
        let stale = self
            .saga
            .orders
            .stale("created", self.config.abandon_after_secs, 100)
            .await?;
        for order in stale {
            self.saga.finish_abandoned(&order).await?;
            self.metrics.swept.inc();
        }
        Ok(())
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let idle = Duration::from_millis(self.config.idle_poll_ms);
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            let claimed = match self.claim().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("outbox claim failed: {e}");
                    Vec::new()
                }
            };
            let busy = !claimed.is_empty();
            for (event, result) in self.handle_batch(&claimed).await {
                self.metrics
                    .events
                    .get_or_create(&EventLabels {
                        kind: event.kind.clone(),
                        result,
                    })
                    .inc();
            }
            if last_sweep.elapsed() >= Duration::from_secs(5) {
                last_sweep = tokio::time::Instant::now();
                if let Err(e) = self.sweep().await {
                    tracing::warn!("sweep of abandoned orders failed: {e}");
                }
            }
            if !busy {
                tokio::select! {
                    () = tokio::time::sleep(idle) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}
