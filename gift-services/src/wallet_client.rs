//! The wallet as seen by its callers (gift-api, the outbox worker, reconciliation repairs):
//! a gRPC client over the wallet instances, local site first, that sorts every call into
//! committed, rejected, unavailable (nothing happened) or unknown (it may have happened).
//!
//! Every wallet operation is idempotent (order id / idempotency key), so trying the next
//! instance after a failure, or retrying later, can never charge twice.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb;
use crate::pb::wallet_client::WalletClient as GrpcClient;
use crate::{Amount, GiftError};

/// Metadata the wallet sets on an error whose outcome is unknown (the request reached it).
pub const OUTCOME_HEADER: &str = "x-outcome";

/// Reason codes that mean "this wallet may not write now" (a failover is under way), never
/// anything about the request: nothing was written, so the call is [`WalletCall::Unavailable`].
pub const WRITER_REFUSALS: [&str; 3] = ["stale_epoch", "lease_expired", "fenced"];

/// The result of one wallet call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalletCall {
    Committed {
        seq: i64,
        balance: Amount,
        duplicate: bool,
    },
    /// Refused for a business reason; nothing was written. `code` is the wallet's reason
    /// code (never one of [`WRITER_REFUSALS`]: those are [`WalletCall::Unavailable`]).
    Rejected { code: String, reason: String },
    /// No wallet instance could be reached: nothing was written.
    Unavailable(String),
    /// A wallet took the request but did not answer in time, or failed mid-way: it may have
    /// committed. Retrying with the same key is safe.
    Unknown(String),
    /// The request itself is wrong (the wallet said INVALID_ARGUMENT).
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct WalletClient {
    /// Local site first.
    instances: Vec<(String, GrpcClient<Channel>)>,
}

fn classify(status: &Status) -> WalletCall {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => WalletCall::Invalid(message),
        Code::Unavailable if status.metadata().get(OUTCOME_HEADER).is_none() => {
            WalletCall::Unavailable(message)
        }
        _ => WalletCall::Unknown(format!("{:?}: {message}", status.code())),
    }
}

fn from_result(r: pb::WalletResult) -> WalletCall {
    if r.status == pb::ResultStatus::Committed as i32 {
        WalletCall::Committed {
            seq: r.seq,
            balance: r.balance,
            duplicate: r.duplicate,
        }
    } else if WRITER_REFUSALS.contains(&r.reason_code.as_str()) {
        // This wallet is not the current writer, its database's lease has passed, or the
        // database is fenced (a failover is under way): nothing was written and it is not the
        // caller's fault, so it is the same as not reaching it, and the next instance may
        // already write to the new primary.
        WalletCall::Unavailable(format!("payments temporarily unavailable: {}", r.reason))
    } else {
        WalletCall::Rejected {
            code: r.reason_code,
            reason: r.reason,
        }
    }
}

impl WalletClient {
    /// Lazily connected clients for `endpoints` (`host:port` or `http://host:port`).
    pub fn new(
        endpoints: &[String],
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<WalletClient, GiftError> {
        if endpoints.is_empty() {
            return Err(GiftError::Config("no wallet endpoints".into()));
        }
        let mut instances = Vec::new();
        for endpoint in endpoints {
            let url = if endpoint.contains("://") {
                endpoint.clone()
            } else {
                format!("http://{endpoint}")
            };
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| GiftError::Config(format!("wallet endpoint {endpoint:?}: {e}")))?
                .connect_timeout(connect_timeout)
                .timeout(request_timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            instances.push((url, GrpcClient::new(channel)));
        }
        Ok(WalletClient { instances })
    }

    /// Runs `call` on each instance in turn until one gives a definite answer. An unknown
    /// outcome anywhere makes the overall outcome unknown unless a later instance settles it
    /// (the operation is idempotent, so the later answer is the truth).
    async fn each<F, Fut>(&self, call: F) -> WalletCall
    where
        F: Fn(GrpcClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::WalletResult>, Status>>,
    {
        let mut unknown = None;
        let mut unavailable = Vec::new();
        for (url, client) in &self.instances {
            let answer = match call(client.clone()).await {
                Ok(reply) => from_result(reply.into_inner()),
                Err(status) => classify(&status),
            };
            match answer {
                WalletCall::Unavailable(m) => unavailable.push(format!("{url}: {m}")),
                WalletCall::Unknown(m) => unknown = Some(format!("{url}: {m}")),
                other => return other,
            }
        }
        match unknown {
            Some(m) => WalletCall::Unknown(m),
            None => WalletCall::Unavailable(unavailable.join("; ")),
        }
    }

    pub async fn debit(
        &self,
        order_id: &str,
        user_id: i64,
        amount: Amount,
        shadow: bool,
    ) -> WalletCall {
        self.each(|mut c| {
            let request = pb::DebitRequest {
                order_id: order_id.to_string(),
                user_id,
                amount,
                epoch: 0,
                shadow,
            };
            async move { c.debit(request).await }
        })
        .await
    }

    pub async fn refund(&self, order_id: &str, shadow: bool) -> WalletCall {
        self.each(|mut c| {
            let request = pb::RefundRequest {
                order_id: order_id.to_string(),
                epoch: 0,
                shadow,
            };
            async move { c.refund(request).await }
        })
        .await
    }

    pub async fn credit(
        &self,
        user_id: i64,
        amount: Amount,
        idempotency_key: &str,
        shadow: bool,
    ) -> WalletCall {
        self.each(|mut c| {
            let request = pb::CreditRequest {
                user_id,
                amount,
                idempotency_key: idempotency_key.to_string(),
                epoch: 0,
                shadow,
            };
            async move { c.credit(request).await }
        })
        .await
    }

    /// A strongly consistent balance from the writer: `Ok(None)` if the account does not exist.
    pub async fn balance(&self, user_id: i64, shadow: bool) -> Result<Option<Amount>, WalletCall> {
        let mut failures = Vec::new();
        for (url, client) in &self.instances {
            let mut client = client.clone();
            match client.balance(pb::BalanceRequest { user_id, shadow }).await {
                Ok(reply) => {
                    let r = reply.into_inner();
                    return Ok(r.exists.then_some(r.balance));
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    return Err(WalletCall::Invalid(status.message().to_string()))
                }
                Err(status) => failures.push(format!("{url}: {}", status.message())),
            }
        }
        Err(WalletCall::Unavailable(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: &str) -> pb::WalletResult {
        pb::WalletResult {
            status: pb::ResultStatus::Rejected as i32,
            reason_code: code.into(),
            reason: format!("because {code}"),
            ..Default::default()
        }
    }

    #[test]
    fn writer_refusals_mean_nothing_happened() {
        for code in ["stale_epoch", "lease_expired", "fenced"] {
            match from_result(rejected(code)) {
                WalletCall::Unavailable(m) => assert!(m.contains(code), "{m}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        assert!(matches!(
            from_result(rejected("insufficient_funds")),
            WalletCall::Rejected { .. }
        ));
    }

    #[test]
    fn unavailable_without_the_outcome_header_is_nothing_happened() {
        let pending = Status::unavailable(
            "payments temporarily unavailable: wallet failover pending (proposal 7)",
        );
        assert!(matches!(classify(&pending), WalletCall::Unavailable(_)));
        let mut unknown = Status::unavailable("outcome unknown");
        unknown.metadata_mut().insert(
            OUTCOME_HEADER,
            tonic::metadata::MetadataValue::from_static("unknown"),
        );
        assert!(matches!(classify(&unknown), WalletCall::Unknown(_)));
    }
}
