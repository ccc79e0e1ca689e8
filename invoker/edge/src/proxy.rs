//! The request path.
//!
//! 1. Buffer the body (at most `max_body_bytes`, else 413): it may have to be sent twice.
//! 2. Take the table in use (none: 503 `no_routing`) and the request's bucket (see
//!    [`crate::pick`]); the bucket's site is the chosen site.
//! 3. Pick an instance of that site. When it has none that may be used, nothing has been sent
//!    yet, so any request may go to another site instead (counted as rerouted).
//! 4. The site's throttle: 429 `throttled` with `Retry-After: 1` beyond its rate.
//! 5. Forward. A connection failure (refused, connect timeout, reset before any response) of
//!    a GET/HEAD or of a request with an idempotency key is re-sent once to another site;
//!    nothing else is ever re-sent: a POST without a key may have been processed, so it gets
//!    502 `upstream_unavailable` and the client decides.
//!
//! Answers carry `x-edge-site` (the site that answered or was refused) and, after a retry,
//! `x-edge-retried-from`. The edge's own errors are `{"error": {"code", "message"}}`, as
//! gift-api's are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;

use crate::routing::Table;
use crate::server::Edge;

/// Which site answered.
pub const SITE_HEADER: &str = "x-edge-site";
/// Set when the answer came from a retry: the site whose connection failed first.
pub const RETRIED_FROM_HEADER: &str = "x-edge-retried-from";

/// Why an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens there.
    Refused,
    /// No connection within `connect_timeout_ms`.
    ConnectTimeout,
    /// Any other failure to connect.
    Connect,
    /// The connection closed or was reset before any response (the request may or may not
    /// have been processed).
    Reset,
    /// Connected, but no complete answer within `upstream_timeout_ms`.
    Timeout,
    Other,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::ConnectTimeout => "connect_timeout",
            FailureKind::Connect => "connect",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::Other => "other",
        }
    }

    /// The connection never came up: the instance is not reachable at all.
    pub fn is_connect(self) -> bool {
        matches!(
            self,
            FailureKind::Refused | FailureKind::ConnectTimeout | FailureKind::Connect
        )
    }

    /// A connection failure: no response came, so a request that may be sent twice can be
    /// tried at another site. A timeout is not one: the upstream may still be working on it.
    pub fn retryable(self) -> bool {
        self.is_connect() || self == FailureKind::Reset
    }
}

fn io_kinds(e: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        cause = c.source();
    }
    kinds
}

fn closed_early(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Sorts a failed upstream call by walking its causes (reqwest wraps hyper, which wraps the
/// socket's error).
pub fn classify(e: &reqwest::Error) -> FailureKind {
    use std::io::ErrorKind as K;
    let kinds = io_kinds(e);
    if e.is_connect() {
        if kinds.contains(&K::ConnectionRefused) {
            FailureKind::Refused
        } else if e.is_timeout() || kinds.contains(&K::TimedOut) {
            FailureKind::ConnectTimeout
        } else {
            FailureKind::Connect
        }
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else if closed_early(e)
        || kinds.iter().any(|k| {
            matches!(
                k,
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
            )
        })
    {
        FailureKind::Reset
    } else {
        FailureKind::Other
    }
}

/// Headers of one connection, not of the message: never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|x| x == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

fn request_headers(parts: &Parts, peer: SocketAddr) -> HeaderMap {
    let mut headers = end_to_end(&parts.headers);
    // The client sets these from the URL and the body it sends.
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    if let Some(host) = parts.headers.get(header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    headers
}

/// The edge's own answer.
fn edge_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

fn with_site(mut response: Response, site: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(site) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(SITE_HEADER), v);
    }
    response
}

fn throttled(site: &str) -> Response {
    let mut r = edge_error(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        format!("site {site} takes no more requests per second now; retry after a second"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    with_site(r, site)
}

fn failed(kind: FailureKind, site: &str, retried: bool) -> Response {
    let again = if retried {
        " (after one retry at another site)"
    } else {
        ""
    };
    let r = match kind {
        FailureKind::Timeout => edge_error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!(
                "site {site} gave no answer in time{again}; the request may have been processed"
            ),
        ),
        other => edge_error(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!(
                "site {site}: {}{again}; a request without an idempotency key is never re-sent",
                other.label()
            ),
        ),
    };
    with_site(r, site)
}

/// The upstream's answer, streamed back.
fn relay(upstream: reqwest::Response, site: &str, retried_from: Option<&str>) -> Response {
    let status = upstream.status();
    let headers = end_to_end(upstream.headers());
    let mut response = Response::new(Body::from_stream(upstream.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if let Some(from) = retried_from.and_then(|f| HeaderValue::from_str(f).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(RETRIED_FROM_HEADER), from);
    }
    with_site(response, site)
}

/// Another site with an instance to use: sites holding buckets first (in bucket order), then
/// the other configured ones.
fn other_site(edge: &Edge, table: &Table, not: &str, now: Instant) -> Option<(String, String)> {
    let holding = table.sites().iter();
    let rest = edge
        .upstreams
        .site_names()
        .filter(|s| !table.sites().contains(s));
    holding
        .chain(rest)
        .filter(|s| s.as_str() != not)
        .find_map(|s| edge.upstreams.pick(s, now).map(|i| (s.clone(), i)))
}

async fn forward(
    edge: &Edge,
    parts: &Parts,
    body: &Bytes,
    base: &str,
    peer: SocketAddr,
) -> Result<reqwest::Response, FailureKind> {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", axum::http::uri::PathAndQuery::as_str);
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut request = edge
        .client
        .request(parts.method.clone(), url)
        .headers(request_headers(parts, peer))
        .timeout(std::time::Duration::from_millis(
            edge.config.upstream_timeout_ms,
        ));
    if !body.is_empty() {
        request = request.body(body.clone());
    }
    request.send().await.map_err(|e| {
        let kind = classify(&e);
        tracing::debug!(upstream = %base, kind = kind.label(), "upstream failed: {e:?}");
        kind
    })
}

/// Reads the whole body, or the answer that refuses it.
async fn buffer(edge: &Edge, parts: &Parts, body: Body) -> Result<Bytes, Response> {
    let limit = edge.config.max_body_bytes;
    let too_large = || {
        edge_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes at the edge"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(edge_error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("reading the request body: {e}"),
        )),
    }
}

/// Handles one request; returns the answer and the site label for the metrics.
async fn route(edge: &Edge, request: Request, peer: SocketAddr) -> (Response, String) {
    let none = || "none".to_string();
    let (parts, body) = request.into_parts();
    let body = match buffer(edge, &parts, body).await {
        Ok(b) => b,
        Err(r) => return (r, none()),
    };
    let Some(table) = edge.routing.current() else {
        let r = edge_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_routing",
            "the edge has no routing table yet (the control plane was never reached and there is no state file)",
        );
        return (r, none());
    };
    let path = parts.uri.path();
    let facts = match crate::pick::facts(&parts.method, &parts.headers, path, &body) {
        Ok(f) => f,
        Err(e) => {
            return (
                edge_error(StatusCode::BAD_REQUEST, "invalid_uid", e.to_string()),
                none(),
            )
        }
    };
    let chosen = table.site_for_bucket(facts.bucket(path)).to_string();
    let now = Instant::now();
    let (site, instance) = match edge.upstreams.pick(&chosen, now) {
        Some(instance) => (chosen, instance),
        None => match other_site(edge, &table, &chosen, now) {
            Some((other, instance)) => {
                crate::metrics::Metrics::moved(&edge.metrics.rerouted, &chosen, &other);
                (other, instance)
            }
            None => {
                edge.metrics.upstream_error(&chosen, "no_instance");
                let r = edge_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_instance",
                    format!(
                        "no instance of {} to send to in any site",
                        edge.config.service
                    ),
                );
                return (with_site(r, &chosen), chosen);
            }
        },
    };
    if !edge.throttle.admit(&site, now) {
        edge.metrics.throttled(&site);
        return (throttled(&site), site);
    }

    let kind = match forward(edge, &parts, &body, &instance, peer).await {
        Ok(upstream) => {
            edge.traffic
                .record(&site, upstream.status().is_server_error());
            return (relay(upstream, &site, None), site);
        }
        Err(kind) => kind,
    };
    edge.traffic.record(&site, true);
    edge.metrics.upstream_error(&site, kind.label());
    if kind.is_connect() {
        edge.upstreams.mark_failed(&site, &instance, Instant::now());
    }
    if !(kind.retryable() && facts.retry_eligible) {
        return (failed(kind, &site, false), site);
    }
    let Some((to, instance)) = other_site(edge, &table, &site, Instant::now()) else {
        return (failed(kind, &site, false), site);
    };
    if !edge.throttle.admit(&to, Instant::now()) {
        edge.metrics.throttled(&to);
        return (throttled(&to), to);
    }
    crate::metrics::Metrics::moved(&edge.metrics.retries, &site, &to);
    tracing::debug!(from = %site, to = %to, kind = kind.label(), "retrying at another site");
    match forward(edge, &parts, &body, &instance, peer).await {
        Ok(upstream) => {
            edge.traffic
                .record(&to, upstream.status().is_server_error());
            (relay(upstream, &to, Some(&site)), to)
        }
        Err(kind) => {
            edge.traffic.record(&to, true);
            edge.metrics.upstream_error(&to, kind.label());
            if kind.is_connect() {
                edge.upstreams.mark_failed(&to, &instance, Instant::now());
            }
            (failed(kind, &to, true), to)
        }
    }
}

async fn handle(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let (response, site) = route(&edge, request, peer).await;
    edge.metrics.answered(
        &site,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Every method and path goes to [`handle`].
pub fn router(edge: Arc<Edge>) -> Router {
    Router::new().fallback(handle).with_state(edge)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_millis(500))
            .timeout(std::time::Duration::from_millis(300))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn connection_failures_are_told_apart() {
        // Refused: a port nobody listens on any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let e = client()
            .await
            .get(format!("http://{closed}/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(classify(&e), FailureKind::Refused, "{e:?}");
        assert!(FailureKind::Refused.retryable() && FailureKind::Refused.is_connect());

        // Reset before any response: the server accepts, reads, and closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                drop(socket);
            }
        });
        let e = client()
            .await
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(classify(&e), FailureKind::Reset, "{e:?}");
        assert!(FailureKind::Reset.retryable() && !FailureKind::Reset.is_connect());

        // Timeout: the server accepts and never answers. Not retryable: it may be working.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let e = client()
            .await
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(classify(&e), FailureKind::Timeout, "{e:?}");
        assert!(!FailureKind::Timeout.retryable());
        assert!(!FailureKind::Other.retryable());
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("idempotency-key", HeaderValue::from_static("k"));
        h.insert("x-uid", HeaderValue::from_static("5"));
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(out.contains_key("idempotency-key") && out.contains_key("x-uid"));
    }
}
