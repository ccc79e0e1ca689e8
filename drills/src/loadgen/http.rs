//! The gift-api calls, and how each answer is classified.

use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::report::Outcome;
use super::LoadgenError;

/// Longest error code kept as a map key; a server bug that puts a message in `code` must not
/// make one key per request.
const MAX_CODE_LEN: usize = 64;

/// What every request of a run shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub client: reqwest::Client,
    pub targets: Vec<Url>,
    pub shadow: bool,
    pub timeout: Duration,
}

/// An answer from the server, or why there was none.
#[derive(Debug)]
pub(crate) enum Reply {
    Http { status: u16, body: Vec<u8> },
    Transport(&'static str),
}

impl Reply {
    /// Transport failures and 5xx may succeed on a second try; everything else will not.
    pub fn retryable(&self) -> bool {
        match self {
            Reply::Transport(_) => true,
            Reply::Http { status, .. } => *status >= 500,
        }
    }
}

pub(crate) fn parse_target(raw: &str) -> Result<Url, LoadgenError> {
    let bad = |why: &str| LoadgenError::Config(format!("target URL `{raw}`: {why}"));
    let mut url = Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "http" {
        // The workspace builds reqwest without TLS.
        return Err(bad("only http:// is supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a base URL takes no query or fragment"));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// `base` with `segments` appended as path segments (each percent-encoded).
pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    // Only cannot-be-a-base URLs (mailto:, data:) refuse segments, and parse_target admits
    // http URLs alone; such a URL would fail the request visibly rather than panic here.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

pub(crate) fn build_client(
    max_in_flight: usize,
    timeout: Duration,
) -> Result<reqwest::Client, LoadgenError> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        // Keep every connection the in-flight cap may open, so a burst does not end in a
        // storm of new connections (and TIME_WAIT sockets) right after.
        .pool_max_idle_per_host(max_in_flight.max(64))
        .connect_timeout(timeout)
        // HTTP(S)_PROXY in the environment must not reroute load aimed at a lab on loopback.
        .no_proxy()
        .user_agent("gift-loadgen")
        .build()
        .map_err(LoadgenError::Client)
}

/// Sends `req` and reads the whole body, within the context's timeout.
pub(crate) async fn exchange(ctx: &Ctx, req: reqwest::RequestBuilder) -> Reply {
    let req = if ctx.shadow {
        req.header("x-shadow", "1")
    } else {
        req
    };
    let call = async {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    match tokio::time::timeout(ctx.timeout, call).await {
        Err(_) => Reply::Transport("timeout"),
        Ok(Err(e)) => Reply::Transport(transport_reason(&e)),
        Ok(Ok((status, body))) => Reply::Http {
            status,
            body: body.to_vec(),
        },
    }
}

/// A short, stable name for a transport failure.
pub(crate) fn transport_reason(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    // hyper's own error kinds are not reachable without depending on hyper, so look at the
    // chain: a reset or a closed connection says the server (or its proxy) went away mid-call.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connect_refused",
                std::io::ErrorKind::ConnectionReset => return "connection_reset",
                std::io::ErrorKind::TimedOut => return "timeout",
                _ => {}
            }
        }
        let text = err.to_string();
        if text.contains("connection closed before message completed") {
            return "connection_closed";
        }
        source = err.source();
    }
    if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else if e.is_request() {
        "request"
    } else {
        "transport"
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
}

/// `error.code` of an error body, cut down to a safe map key; `None` when absent.
pub(crate) fn error_code(body: &[u8]) -> Option<String> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let code: String = parsed
        .error
        .code
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(MAX_CODE_LEN)
        .collect();
    (!code.is_empty()).then_some(code)
}

/// The class of an answer: 2xx committed, 422/409 rejected by code, anything else an error
/// named after status and code (`http_503_payments_unavailable`).
pub(crate) fn classify(reply: &Reply) -> Outcome {
    match reply {
        Reply::Transport(reason) => Outcome::Error((*reason).to_string()),
        Reply::Http { status, .. } if (200..300).contains(status) => Outcome::Committed,
        Reply::Http { status, body } => {
            let code = error_code(body);
            match (status, code) {
                (409 | 422, Some(code)) => Outcome::Rejected(code),
                (409 | 422, None) => Outcome::Rejected(format!("http_{status}")),
                (_, Some(code)) => Outcome::Error(format!("http_{status}_{code}")),
                (_, None) => Outcome::Error(format!("http_{status}")),
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Gift {
    pub gift_id: String,
    #[serde(default)]
    pub name: String,
    /// Minor units.
    pub price: i64,
}

#[derive(Debug, Deserialize)]
struct Catalog {
    gifts: Vec<Gift>,
}

pub(crate) async fn fetch_catalog(ctx: &Ctx, target: &Url) -> Result<Vec<Gift>, LoadgenError> {
    let url = endpoint(target, &["v1", "catalog"]);
    let fail = |reason: String| LoadgenError::Catalog {
        url: url.to_string(),
        reason,
    };
    let reply = exchange(ctx, ctx.client.get(url.clone())).await;
    let body = match reply {
        Reply::Http { status: 200, body } => body,
        Reply::Http { status, body } => {
            return Err(fail(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )))
        }
        Reply::Transport(reason) => return Err(fail(reason.to_string())),
    };
    let catalog: Catalog =
        serde_json::from_slice(&body).map_err(|e| fail(format!("unreadable body: {e}")))?;
    if catalog.gifts.is_empty() {
        return Err(fail("the catalog has no gifts".into()));
    }
    if let Some(g) = catalog.gifts.iter().find(|g| g.price < 0) {
        return Err(fail(format!(
            "gift {} has a negative price {}",
            g.gift_id, g.price
        )));
    }
    Ok(catalog.gifts)
}

#[derive(Debug, Serialize)]
pub(crate) struct SendRequest<'a> {
    pub user_id: i64,
    pub streamer_id: i64,
    pub room_id: i64,
    pub gift_id: &'a str,
    pub count: i64,
    pub idempotency_key: &'a str,
}

#[derive(Debug, Deserialize)]
pub(crate) struct SendResponse {
    pub order_id: String,
    #[serde(default)]
    pub status: String,
    pub amount: i64,
    #[serde(default)]
    pub duplicate: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct TopupRequest<'a> {
    pub amount: i64,
    pub idempotency_key: &'a str,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WalletResponse {
    #[serde(default)]
    pub source: Option<String>,
}

/// `GET /v1/orders/{id}`; the identity fields are optional so that a leaner server still
/// gets its amount checked.
#[derive(Debug, Deserialize)]
pub(crate) struct OrderResponse {
    pub amount: i64,
    #[serde(default)]
    pub user_id: Option<i64>,
    #[serde(default)]
    pub streamer_id: Option<i64>,
    #[serde(default)]
    pub room_id: Option<i64>,
    #[serde(default)]
    pub gift_id: Option<String>,
    #[serde(default)]
    pub count: Option<i64>,
}

pub(crate) async fn topup(ctx: &Ctx, target: &Url, user_id: i64, amount: i64, key: &str) -> Reply {
    let url = endpoint(target, &["v1", "wallet", &user_id.to_string(), "topup"]);
    let body = TopupRequest {
        amount,
        idempotency_key: key,
    };
    exchange(ctx, ctx.client.post(url).json(&body)).await
}

pub(crate) async fn send_gift(ctx: &Ctx, target: &Url, req: &SendRequest<'_>) -> Reply {
    let url = endpoint(target, &["v1", "gifts"]);
    exchange(ctx, ctx.client.post(url).json(req)).await
}

pub(crate) async fn read_wallet(ctx: &Ctx, target: &Url, user_id: i64) -> Reply {
    let url = endpoint(target, &["v1", "wallet", &user_id.to_string()]);
    exchange(ctx, ctx.client.get(url)).await
}

pub(crate) async fn get_order(ctx: &Ctx, target: &Url, order_id: &str) -> Reply {
    let url = endpoint(target, &["v1", "orders", order_id]);
    exchange(ctx, ctx.client.get(url)).await
}

/// Calls `f` up to `attempts` times while the reply is retryable, backing off a little more
/// each time.
pub(crate) async fn with_retries<F, Fut>(attempts: u32, mut f: F) -> Reply
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    let mut attempt = 1;
    loop {
        let reply = f().await;
        if attempt >= attempts || !reply.retryable() {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> Reply {
        Reply::Http {
            status,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(&http(200, "{}")), Outcome::Committed);
        assert_eq!(classify(&http(201, "")), Outcome::Committed);
        assert_eq!(
            classify(&http(
                422,
                r#"{"error":{"code":"insufficient_funds","message":"no"}}"#
            )),
            Outcome::Rejected("insufficient_funds".into())
        );
        assert_eq!(
            classify(&http(
                409,
                r#"{"error":{"code":"idempotency_key_reused","message":"x"},"order_id":"o"}"#
            )),
            Outcome::Rejected("idempotency_key_reused".into())
        );
        assert_eq!(
            classify(&http(422, "not json")),
            Outcome::Rejected("http_422".into())
        );
        assert_eq!(
            classify(&http(
                503,
                r#"{"error":{"code":"payments_unavailable","message":"wallet down"}}"#
            )),
            Outcome::Error("http_503_payments_unavailable".into())
        );
        assert_eq!(
            classify(&http(504, r#"{"error":{"code":"outcome_unknown"}}"#)),
            Outcome::Error("http_504_outcome_unknown".into())
        );
        assert_eq!(
            classify(&http(400, r#"{"error":{"code":"Bad Request!"}}"#)),
            Outcome::Error("http_400_badrequest".into())
        );
        assert_eq!(classify(&http(502, "")), Outcome::Error("http_502".into()));
        assert_eq!(
            classify(&Reply::Transport("timeout")),
            Outcome::Error("timeout".into())
        );
    }

    #[test]
    fn long_codes_are_cut() {
        let code = "x".repeat(500);
        let body = format!(r#"{{"error":{{"code":"{code}"}}}}"#);
        assert_eq!(error_code(body.as_bytes()).unwrap().len(), MAX_CODE_LEN);
        assert_eq!(error_code(br#"{"error":{"code":""}}"#), None);
    }

    #[test]
    fn retryable_replies() {
        assert!(Reply::Transport("connect").retryable());
        assert!(http(503, "").retryable());
        assert!(http(504, "").retryable());
        assert!(!http(422, "").retryable());
        assert!(!http(404, "").retryable());
        assert!(!http(200, "").retryable());
    }

    #[test]
    fn targets_and_endpoints() {
        let base = parse_target("http://127.0.1.5:43210").unwrap();
        assert_eq!(
            endpoint(&base, &["v1", "gifts"]).as_str(),
            "http://127.0.1.5:43210/v1/gifts"
        );
        let prefixed = parse_target("http://h:1/api/").unwrap();
        assert_eq!(
            endpoint(&prefixed, &["v1", "orders", "a/b c"]).as_str(),
            "http://h:1/api/v1/orders/a%2Fb%20c"
        );
        assert!(parse_target("https://h:1").is_err());
        assert!(parse_target("h:1").is_err());
        assert!(parse_target("http://h:1/?x=1").is_err());
        assert!(parse_target("not a url").is_err());
    }
}
