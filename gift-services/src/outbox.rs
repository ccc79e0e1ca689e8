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

    /// Applies the weak activity update once per order.
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
            let handled = futures::future::join_all(claimed.iter().map(|e| self.handle(e))).await;
            for (event, result) in claimed.iter().zip(handled) {
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
