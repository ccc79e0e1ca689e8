//! Gift orders: the catalog, order creation keyed by the client's idempotency key, and the
//! status transitions of the saga.
//!
//! Status machine (every transition is a conditional UPDATE, so concurrent retries of one
//! order from both sites apply each step at most once):
//!
//! ```text
//! created ──debit committed──▶ paid ──effect delivered──▶ delivered
//!    │                          │
//!    │ debit rejected /         └──effect failed for good──▶ failed ──refund──▶ refunded
//!    │ abandoned without debit
//!    ▼
//! rejected
//! ```
//!
//! `paid` is written in the same transaction as the order's outbox event, so a paid order is
//! never left without the work that settles it.

use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::wallet::MAX_KEY_LEN;
use crate::{Amount, GiftError, Traffic};

/// Largest gift count in one order (the schema checks the same bound).
pub const MAX_COUNT: i32 = 10_000;

/// Outbox event that drives an order from paid to delivered (or refunded).
pub const EVENT_GIFT_PAID: &str = "gift_paid";
/// Outbox event for the weak activity update (room leaderboard).
pub const EVENT_ACTIVITY: &str = "activity";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogItem {
    pub gift_id: String,
    pub name: String,
    pub price: Amount,
}

/// A validated request to send a gift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub idempotency_key: String,
    pub user_id: i64,
    pub streamer_id: i64,
    pub room_id: i64,
    pub gift_id: String,
    pub count: i32,
}

impl NewOrder {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), GiftError> {
        let bad = |m: String| Err(GiftError::InvalidInput(m));
        let key = &self.idempotency_key;
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
            return bad(format!(
                "idempotency_key must be 1-{MAX_KEY_LEN} bytes without control characters"
            ));
        }
        for (name, id) in [
            ("user_id", self.user_id),
            ("streamer_id", self.streamer_id),
            ("room_id", self.room_id),
        ] {
            if id <= 0 {
                return bad(format!("{name} must be a positive integer, got {id}"));
            }
        }
        if self.user_id == self.streamer_id {
            return bad("a user cannot send a gift to themselves (user_id = streamer_id)".into());
        }
        if !(1..=MAX_COUNT).contains(&self.count) {
            return bad(format!(
                "count must be between 1 and {MAX_COUNT}, got {}",
                self.count
            ));
        }
        if self.gift_id.is_empty()
            || self.gift_id.len() > 64
            || !self
                .gift_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("gift_id must be 1-64 characters of [A-Za-z0-9_-]".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub order_id: String,
    #[serde(skip)]
    pub idempotency_key: String,
    pub user_id: i64,
    pub streamer_id: i64,
    pub room_id: i64,
    pub gift_id: String,
    pub count: i32,
    pub amount: Amount,
    pub status: String,
    pub reason: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Order {
    fn from_row(row: &PgRow) -> Order {
        Order {
            order_id: row.get("order_id"),
            idempotency_key: row.get("idempotency_key"),
            user_id: row.get("user_id"),
            streamer_id: row.get("streamer_id"),
            room_id: row.get("room_id"),
            gift_id: row.get("gift_id"),
            count: row.get("count"),
            amount: row.get("amount"),
            status: row.get("status"),
            reason: row.get("reason"),
            created_at_ms: row.get("created_ms"),
            updated_at_ms: row.get("updated_ms"),
        }
    }

    /// True when `new` asks for the same gift as this order (a genuine retry).
    pub fn same_request(&self, new: &NewOrder) -> bool {
        self.user_id == new.user_id
            && self.streamer_id == new.streamer_id
            && self.room_id == new.room_id
            && self.gift_id == new.gift_id
            && self.count == new.count
    }
}

const ORDER_COLUMNS: &str = "order_id, idempotency_key, user_id, streamer_id, room_id, gift_id, \
     count, amount, status, reason, \
     (extract(epoch FROM created_at) * 1000)::bigint AS created_ms, \
     (extract(epoch FROM updated_at) * 1000)::bigint AS updated_ms";

/// What creating an order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Inserted now, or found from an earlier call with the same key and request.
    Order {
        order: Order,
        fresh: bool,
    },
    UnknownGift,
    /// The key was used before for a different gift request.
    KeyReused(Order),
}

/// A new random order id (`o` + 24 hex digits).
fn new_order_id() -> String {
    format!("o{:024x}", rand::random::<u128>() >> 32)
}

/// The orders of one traffic class (real or shadow).
#[derive(Clone, Debug)]
pub struct OrderStore {
    pool: PgPool,
    traffic: Traffic,
}

impl OrderStore {
    pub fn new(pool: PgPool, traffic: Traffic) -> OrderStore {
        OrderStore { pool, traffic }
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn schema(&self) -> &'static str {
        self.traffic.orders_schema()
    }

    pub async fn catalog(pool: &PgPool, traffic: Traffic) -> Result<Vec<CatalogItem>, GiftError> {
        let sql = format!(
            "SELECT gift_id, name, price FROM {}.gift_catalog ORDER BY price, gift_id",
            traffic.orders_schema()
        );
        let rows = sqlx::query(&sql).fetch_all(pool).await?;
        Ok(rows
            .iter()
            .map(|r| CatalogItem {
                gift_id: r.get("gift_id"),
                name: r.get("name"),
                price: r.get("price"),
            })
            .collect())
    }

    /// Inserts the order (status `created`, amount from the catalog) unless its idempotency
    /// key exists; one round trip in the common case.
    pub async fn create(&self, new: &NewOrder) -> Result<Created, GiftError> {
        new.validate()?;
        let o = self.schema();
        let insert = format!(
            "INSERT INTO {o}.gift_orders \
               (order_id, idempotency_key, user_id, streamer_id, room_id, gift_id, count, amount, status) \
             SELECT $1, $2, $3, $4, $5, c.gift_id, $7, c.price * $7, 'created' \
             FROM {o}.gift_catalog c WHERE c.gift_id = $6 \
             ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING {ORDER_COLUMNS}"
        );
        let inserted = sqlx::query(&insert)
            .bind(new_order_id())
            .bind(&new.idempotency_key)
            .bind(new.user_id)
            .bind(new.streamer_id)
            .bind(new.room_id)
            .bind(&new.gift_id)
            .bind(new.count)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = inserted {
            return Ok(Created::Order {
                order: Order::from_row(&row),
                fresh: true,
            });
        }
        // Either the key exists or the gift does not.
        match self.by_key(&new.idempotency_key).await? {
            Some(order) if order.same_request(new) => Ok(Created::Order {
                order,
                fresh: false,
            }),
            Some(order) => Ok(Created::KeyReused(order)),
            None => Ok(Created::UnknownGift),
        }
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<Order>, GiftError> {
        if order_id.is_empty() || order_id.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        self.find("order_id", order_id).await
    }

    pub async fn by_key(&self, key: &str) -> Result<Option<Order>, GiftError> {
        self.find("idempotency_key", key).await
    }

    /// The order whose unique `column` (a fixed name, never input) equals `value`.
    async fn find(&self, column: &'static str, value: &str) -> Result<Option<Order>, GiftError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM {}.gift_orders WHERE {column} = $1",
            self.schema()
        );
        let row = sqlx::query(&sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Order::from_row))
    }

    /// `created` → `paid`, with the order's outbox events in the same transaction. Returns
    /// the order as it is now (another site's retry may have done this first).
    pub async fn mark_paid(&self, order_id: &str) -> Result<Option<Order>, GiftError> {
        let o = self.schema();
        // One statement (one round trip, one commit): the status change and its outbox
        // events commit together or not at all.
        let updated = sqlx::query(&format!(
            "WITH paid AS (UPDATE {o}.gift_orders SET status = 'paid', reason = NULL, updated_at = now() \
                           WHERE order_id = $1 AND status = 'created' RETURNING *), \
                  events AS (INSERT INTO {o}.outbox (order_id, kind, payload) \
                             SELECT order_id, kind, '{{}}'::jsonb FROM paid, unnest($2::text[]) AS kind \
                             ON CONFLICT (order_id, kind) DO NOTHING) \
             SELECT {ORDER_COLUMNS} FROM paid"
        ))
        .bind(order_id)
        .bind([EVENT_GIFT_PAID, EVENT_ACTIVITY])
        .fetch_optional(&self.pool)
        .await?;
        match updated {
            Some(row) => Ok(Some(Order::from_row(&row))),
            None => self.get(order_id).await,
        }
    }

    /// The orders among `order_ids` that exist, in one round trip.
    pub async fn get_many(&self, order_ids: &[String]) -> Result<Vec<Order>, GiftError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM {}.gift_orders WHERE order_id = ANY($1)",
            self.schema()
        );
        let rows = sqlx::query(&sql)
            .bind(order_ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Order::from_row).collect())
    }

    /// `paid` → `delivered` for `order_ids` and their outbox events processed, in one
    /// statement.
    pub async fn deliver_batch(
        &self,
        order_ids: &[String],
        outbox_ids: &[i64],
    ) -> Result<(), GiftError> {
        let o = self.schema();
        sqlx::query(&format!(
            "WITH delivered AS (UPDATE {o}.gift_orders SET status = 'delivered', updated_at = now() \
                                WHERE order_id = ANY($1) AND status = 'paid') \
             UPDATE {o}.outbox SET processed_at = now() WHERE id = ANY($2)"
        ))
        .bind(order_ids)
        .bind(outbox_ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves the order from one of `from` to `to` with a reason; false if it was not in `from`.
    pub async fn transition(
        &self,
        order_id: &str,
        from: &[&str],
        to: &str,
        reason: Option<&str>,
    ) -> Result<bool, GiftError> {
        let sql = format!(
            "UPDATE {}.gift_orders SET status = $3, reason = coalesce($4, reason), updated_at = now() \
             WHERE order_id = $1 AND status = ANY($2) RETURNING order_id",
            self.schema()
        );
        let from: Vec<String> = from.iter().map(|s| (*s).to_string()).collect();
        let row = sqlx::query(&sql)
            .bind(order_id)
            .bind(&from)
            .bind(to)
            .bind(reason)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Orders in `status` not updated for `older_than_secs` (oldest first).
    pub async fn stale(
        &self,
        status: &str,
        older_than_secs: u64,
        limit: i64,
    ) -> Result<Vec<Order>, GiftError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM {}.gift_orders \
             WHERE status = $1 AND updated_at < now() - make_interval(secs => $2) \
             ORDER BY updated_at LIMIT $3",
            self.schema()
        );
        let rows = sqlx::query(&sql)
            .bind(status)
            .bind(older_than_secs as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Order::from_row).collect())
    }

    /// Does the wallet ledger hold a debit for this order? (Same database, read only: used to
    /// finish orders whose payment outcome was unknown.)
    pub async fn has_debit(&self, order_id: &str) -> Result<bool, GiftError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.ledger WHERE order_id = $1 AND kind = 'debit')",
            self.traffic.wallet_schema()
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(order_id)
            .fetch_one(&self.pool)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> NewOrder {
        NewOrder {
            idempotency_key: "k-1".into(),
            user_id: 1,
            streamer_id: 2,
            room_id: 2,
            gift_id: "rose".into(),
            count: 1,
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(order().validate().is_ok());
        let cases: Vec<(NewOrder, &str)> = vec![
            (
                NewOrder {
                    count: 0,
                    ..order()
                },
                "count",
            ),
            (
                NewOrder {
                    count: MAX_COUNT + 1,
                    ..order()
                },
                "count",
            ),
            (
                NewOrder {
                    count: -3,
                    ..order()
                },
                "count",
            ),
            (
                NewOrder {
                    idempotency_key: String::new(),
                    ..order()
                },
                "idempotency_key",
            ),
            (
                NewOrder {
                    idempotency_key: "x".repeat(MAX_KEY_LEN + 1),
                    ..order()
                },
                "idempotency_key",
            ),
            (
                NewOrder {
                    user_id: 0,
                    ..order()
                },
                "user_id",
            ),
            (
                NewOrder {
                    streamer_id: -1,
                    ..order()
                },
                "streamer_id",
            ),
            (
                NewOrder {
                    streamer_id: 1,
                    ..order()
                },
                "themselves",
            ),
            (
                NewOrder {
                    gift_id: "ro se".into(),
                    ..order()
                },
                "gift_id",
            ),
        ];
        for (new, field) in cases {
            match new.validate() {
                Err(GiftError::InvalidInput(m)) => assert!(m.contains(field), "{m}"),
                other => panic!("{new:?}: expected invalid input, got {other:?}"),
            }
        }
    }

    #[test]
    fn order_ids_are_distinct_and_well_formed() {
        let a = new_order_id();
        let b = new_order_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 25);
        assert!(a.starts_with('o'));
    }
}
