//! The gift saga: order → debit (exactly once) → paid + outbox → settlement credit → effect;
//! if the effect cannot be delivered, refund (exactly once) and reverse the credit.
//!
//! The synchronous part ([`Saga::send`]) runs in the request: it creates the order under the
//! client's idempotency key, debits through the wallet and marks the order paid together with
//! its outbox events. The rest ([`Saga::deliver`], [`Saga::refund`]) runs in the outbox worker.
//! Each step is idempotent, so any step can be retried from any site at any time.

use std::time::Duration;

use crate::orders::{Created, NewOrder, Order, OrderStore};
use crate::settlement::Settlement;
use crate::wallet_client::{WalletCall, WalletClient};
use crate::{Amount, GiftError, Traffic};

/// What sending a gift came to; the API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Paid (or further along). `duplicate`: an earlier call with this key did the work.
    Done {
        order: Order,
        balance: Option<Amount>,
        duplicate: bool,
    },
    /// Refused for a business reason; nobody was charged.
    Rejected {
        order: Option<Order>,
        code: String,
        message: String,
    },
    /// The idempotency key belongs to a different gift request.
    KeyReused(Order),
    /// The wallet could not be reached: nobody was charged; retry later with the same key.
    /// Nobody was charged. `order` is absent when the order database itself could not be
    /// reached (it is the payments database: no order, no debit).
    PaymentsUnavailable {
        order: Option<Order>,
        message: String,
    },
    /// The wallet may or may not have debited: retry with the same key to find out.
    OutcomeUnknown { order: Order, message: String },
}

/// Reason codes stored on rejected orders (`<code>: <message>`).
pub fn rejection_code(order: &Order) -> &str {
    order
        .reason
        .as_deref()
        .and_then(|r| r.split(':').next())
        .unwrap_or("rejected")
}

/// Why an effect was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectError {
    /// Worth retrying (timeout, connection refused, 5xx).
    Transient(String),
    /// The room will never take it (4xx): refund now.
    Permanent(String),
}

/// Where gift effects go (the room's effect service). Without a URL, effects are logged and
/// count as delivered.
#[derive(Clone, Debug)]
pub struct EffectSink {
    url: Option<String>,
    http: reqwest::Client,
}

impl EffectSink {
    pub fn new(url: Option<String>, timeout: Duration) -> Result<EffectSink, GiftError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| GiftError::Config(format!("effect client: {e}")))?;
        Ok(EffectSink { url, http })
    }

    pub async fn deliver(&self, order: &Order, traffic: Traffic) -> Result<(), EffectError> {
        let Some(url) = &self.url else {
            tracing::debug!(order = %order.order_id, room = order.room_id, gift = %order.gift_id, "effect");
            return Ok(());
        };
        let body = serde_json::json!({
            "order_id": order.order_id,
            "room_id": order.room_id,
            "user_id": order.user_id,
            "gift_id": order.gift_id,
            "count": order.count,
            "shadow": traffic == Traffic::Shadow,
        });
        match self.http.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) if r.status().is_client_error() => Err(EffectError::Permanent(format!(
                "effect service answered {}",
                r.status()
            ))),
            Ok(r) => Err(EffectError::Transient(format!(
                "effect service answered {}",
                r.status()
            ))),
            Err(e) => Err(EffectError::Transient(format!("effect service: {e}"))),
        }
    }
}

/// Where an order stands after a worker step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing more to do for this event.
    Finished,
    /// Try again later (the reason is for logs).
    Retry(String),
}

/// The saga for one traffic class.
#[derive(Clone, Debug)]
pub struct Saga {
    pub orders: OrderStore,
    pub settlement: Settlement,
    pub wallet: WalletClient,
    pub effects: EffectSink,
}

impl Saga {
    fn shadow(&self) -> bool {
        self.orders.traffic() == Traffic::Shadow
    }

    /// The request path: creates (or finds) the order and pays for it.
    pub async fn send(&self, new: &NewOrder) -> Result<SendOutcome, GiftError> {
        let created = match self.orders.create(new).await {
            Ok(created) => created,
            Err(GiftError::InvalidInput(m)) => return Err(GiftError::InvalidInput(m)),
            // Nothing was written and nothing can be charged without the order database.
            Err(e) => {
                return Ok(SendOutcome::PaymentsUnavailable {
                    order: None,
                    message: format!(
                        "the payments database cannot be reached ({e}); nobody was charged"
                    ),
                })
            }
        };
        let (order, fresh) = match created {
            Created::Order { order, fresh } => (order, fresh),
            Created::UnknownGift => {
                return Ok(SendOutcome::Rejected {
                    order: None,
                    code: "unknown_gift".into(),
                    message: format!("no gift {:?} in the catalog", new.gift_id),
                })
            }
            Created::KeyReused(order) => return Ok(SendOutcome::KeyReused(order)),
        };
        match order.status.as_str() {
            "created" => {}
            "rejected" => {
                return Ok(SendOutcome::Rejected {
                    code: rejection_code(&order).to_string(),
                    message: order.reason.clone().unwrap_or_default(),
                    order: Some(order),
                })
            }
            _ => {
                return Ok(SendOutcome::Done {
                    order,
                    balance: None,
                    duplicate: true,
                })
            }
        }
        match self
            .wallet
            .debit(&order.order_id, order.user_id, order.amount, self.shadow())
            .await
        {
            WalletCall::Committed {
                balance, duplicate, ..
            } => {
                let paid = self.orders.mark_paid(&order.order_id).await?;
                Ok(SendOutcome::Done {
                    order: paid.unwrap_or(order),
                    balance: Some(balance),
                    duplicate: duplicate || !fresh,
                })
            }
            WalletCall::Rejected { code, reason } => {
                let stored = format!("{code}: {reason}");
                self.orders
                    .transition(&order.order_id, &["created"], "rejected", Some(&stored))
                    .await?;
                let order = self.orders.get(&order.order_id).await?.unwrap_or(order);
                Ok(SendOutcome::Rejected {
                    order: Some(order),
                    code,
                    message: reason,
                })
            }
            // No wallet reached, or none holds the current epoch (a failover is under way):
            // nothing was charged and the order stays open for a retry.
            WalletCall::Unavailable(m) => Ok(SendOutcome::PaymentsUnavailable {
                order: Some(order),
                message: format!("payments unavailable, nobody was charged: {m}"),
            }),
            WalletCall::Unknown(m) => Ok(SendOutcome::OutcomeUnknown {
                order,
                message: format!(
                    "payment outcome unknown ({m}); retry with the same idempotency key, it never charges twice"
                ),
            }),
            WalletCall::Invalid(m) => Err(GiftError::InvalidInput(m)),
        }
    }

    /// The worker's step for a paid order: settle, deliver the effect, and refund when the
    /// effect fails for good (`give_up`: this was the last attempt).
    pub async fn deliver(&self, order_id: &str, give_up: bool) -> Result<Step, GiftError> {
        let Some(order) = self.orders.get(order_id).await? else {
            return Ok(Step::Finished);
        };
        match order.status.as_str() {
            "paid" => {}
            "failed" => return self.refund(&order).await,
            _ => return Ok(Step::Finished),
        }
        self.settlement.credit(&order).await?;
        let failure = match self.effects.deliver(&order, self.orders.traffic()).await {
            Ok(()) => {
                self.orders
                    .transition(order_id, &["paid"], "delivered", None)
                    .await?;
                return Ok(Step::Finished);
            }
            Err(EffectError::Transient(m)) if !give_up => return Ok(Step::Retry(m)),
            Err(EffectError::Transient(m) | EffectError::Permanent(m)) => m,
        };
        let reason = format!("effect_undeliverable: {failure}");
        self.orders
            .transition(order_id, &["paid"], "failed", Some(&reason))
            .await?;
        match self.orders.get(order_id).await? {
            Some(order) if order.status == "failed" => self.refund(&order).await,
            _ => Ok(Step::Finished),
        }
    }

    /// Refunds a failed (or wrongly rejected) order's debit and reverses its streamer credit,
    /// each exactly once, then marks a failed order refunded.
    pub async fn refund(&self, order: &Order) -> Result<Step, GiftError> {
        match self.wallet.refund(&order.order_id, self.shadow()).await {
            WalletCall::Committed { .. } => {}
            WalletCall::Rejected { code, .. } if code == "no_debit" => {}
            WalletCall::Rejected { code, reason } => {
                return Ok(Step::Retry(format!("refund rejected: {code}: {reason}")))
            }
            WalletCall::Unavailable(m) | WalletCall::Unknown(m) | WalletCall::Invalid(m) => {
                return Ok(Step::Retry(format!("refund: {m}")))
            }
        }
        self.settlement.reverse(order).await?;
        self.orders
            .transition(&order.order_id, &["failed"], "refunded", None)
            .await?;
        Ok(Step::Finished)
    }

    /// Finishes an order left `created` (its request gave up): paid if the wallet has its
    /// debit, else rejected as abandoned. A debit that lands after this is refunded by
    /// reconciliation's repair.
    pub async fn finish_abandoned(&self, order: &Order) -> Result<(), GiftError> {
        if self.orders.has_debit(&order.order_id).await? {
            self.orders.mark_paid(&order.order_id).await?;
        } else {
            self.orders
                .transition(
                    &order.order_id,
                    &["created"],
                    "rejected",
                    Some("payment_not_completed: the request gave up before the payment finished; nobody was charged"),
                )
                .await?;
        }
        Ok(())
    }
}
