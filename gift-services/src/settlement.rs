//! Settlement: streamer income. A paid order credits its streamer once; a refunded order that
//! was credited has that credit reversed once. The primary keys of `credits` and `reversals`
//! (the order id) make both exactly-once under at-least-once delivery; the income row changes
//! only in the transaction that inserted the record.

use sqlx::PgPool;

use crate::orders::Order;
use crate::{GiftError, Traffic};

#[derive(Clone, Debug)]
pub struct Settlement {
    pool: PgPool,
    traffic: Traffic,
}

impl Settlement {
    pub fn new(pool: PgPool, traffic: Traffic) -> Settlement {
        Settlement { pool, traffic }
    }

    /// Credits the order's streamer with its amount, once. True if this call did it.
    pub async fn credit(&self, order: &Order) -> Result<bool, GiftError> {
        let s = self.traffic.settlement_schema();
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {s}.income (streamer_id, balance) VALUES ($1, 0) \
             ON CONFLICT (streamer_id) DO NOTHING"
        ))
        .bind(order.streamer_id)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO {s}.credits (order_id, streamer_id, amount) VALUES ($1, $2, $3) \
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id"
        ))
        .bind(&order.order_id)
        .bind(order.streamer_id)
        .bind(order.amount)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if inserted {
            sqlx::query(&format!(
                "UPDATE {s}.income SET balance = balance + $2, updated_at = now() \
                 WHERE streamer_id = $1"
            ))
            .bind(order.streamer_id)
            .bind(order.amount)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Credits every paid order of `orders` once, in one statement: the credits and the
    /// income they add commit together. Streamers are updated in id order so that workers in
    /// both sites never wait on each other in a cycle.
    pub async fn credit_batch(&self, orders: &[Order]) -> Result<(), GiftError> {
        if orders.is_empty() {
            return Ok(());
        }
        let s = self.traffic.settlement_schema();
        let ids: Vec<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
        let streamers: Vec<i64> = orders.iter().map(|o| o.streamer_id).collect();
        let amounts: Vec<i64> = orders.iter().map(|o| o.amount).collect();
        sqlx::query(&format!(
            "WITH new AS (INSERT INTO {s}.credits (order_id, streamer_id, amount) \
                          SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
                          ON CONFLICT (order_id) DO NOTHING RETURNING streamer_id, amount) \
             INSERT INTO {s}.income (streamer_id, balance) \
             SELECT streamer_id, sum(amount) FROM new GROUP BY streamer_id ORDER BY streamer_id \
             ON CONFLICT (streamer_id) DO UPDATE \
             SET balance = income.balance + excluded.balance, updated_at = now()"
        ))
        .bind(&ids)
        .bind(&streamers)
        .bind(&amounts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes back the order's credit if there is one, once. True if this call did it.
    pub async fn reverse(&self, order: &Order) -> Result<bool, GiftError> {
        let s = self.traffic.settlement_schema();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO {s}.reversals (order_id, streamer_id, amount) \
             SELECT order_id, streamer_id, amount FROM {s}.credits WHERE order_id = $1 \
             ON CONFLICT (order_id) DO NOTHING RETURNING amount"
        ))
        .bind(&order.order_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(amount) = inserted
            .as_ref()
            .map(|r| sqlx::Row::get::<i64, _>(r, "amount"))
        {
            sqlx::query(&format!(
                "UPDATE {s}.income SET balance = balance - $2, updated_at = now() \
                 WHERE streamer_id = $1"
            ))
            .bind(order.streamer_id)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted.is_some())
    }
}
