//! What the edge learns from a request before forwarding it: the uid that picks its bucket,
//! and whether it may be sent a second time.
//!
//! Where the uid comes from, first match wins:
//! 1. the `x-uid` header (any client may set it; a value that is not a number is refused);
//! 2. the path `/v1/wallet/{uid}` (balance reads, top-ups);
//! 3. the JSON body's `user_id` (gift sends: the sender pays, so the sender's site serves).
//!
//! Requests without a uid (catalog, order lookups) take the bucket of a hash of their path:
//! the same path always lands in the same site, and the table's split still holds.

use axum::http::{HeaderMap, Method};
use invoker_domain::BUCKETS;
use serde::Deserialize;

/// The header a client can set to name its uid.
pub const UID_HEADER: &str = "x-uid";
/// gift-api's idempotency key header (the body's `idempotency_key` counts too).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const WALLET_PREFIX: &str = "/v1/wallet/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidSource {
    Header,
    Path,
    Body,
}

/// What decides where a request goes and whether it may be re-sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    pub uid: Option<(u64, UidSource)>,
    /// GET or HEAD, or it carries an idempotency key: sending it twice is harmless.
    pub retry_eligible: bool,
}

impl RequestFacts {
    /// The request's bucket: its uid's, else the hash of its path's.
    pub fn bucket(&self, path: &str) -> usize {
        match self.uid {
            Some((uid, _)) => bucket_of_uid(uid),
            None => bucket_of_path(path),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{UID_HEADER} must be an unsigned integer, got {0:?}")]
pub struct BadUid(pub String);

/// The body fields the edge looks at; everything else in the body is left alone.
#[derive(Deserialize, Default)]
struct BodyFields {
    #[serde(default)]
    user_id: Option<serde_json::Value>,
    #[serde(default)]
    idempotency_key: Option<serde_json::Value>,
}

fn body_fields(body: &[u8]) -> BodyFields {
    // Only a JSON object can carry the fields; anything else is not ours to judge.
    let looks_like_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if !looks_like_object {
        return BodyFields::default();
    }
    serde_json::from_slice(body).unwrap_or_default()
}

fn uid_value(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Reads the uid and the retry eligibility of a request.
pub fn facts(
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    body: &[u8],
) -> Result<RequestFacts, BadUid> {
    // Parsed at most once, and only when a question needs the body.
    let fields = std::cell::OnceCell::new();
    let parsed = || fields.get_or_init(|| body_fields(body));

    let uid = if let Some(value) = headers.get(UID_HEADER) {
        let text = value.to_str().unwrap_or_default().trim();
        let uid = text.parse::<u64>().map_err(|_| {
            BadUid(
                String::from_utf8_lossy(value.as_bytes())
                    .chars()
                    .take(40)
                    .collect(),
            )
        })?;
        Some((uid, UidSource::Header))
    } else if let Some(uid) = uid_from_path(path) {
        Some((uid, UidSource::Path))
    } else {
        parsed()
            .user_id
            .as_ref()
            .and_then(uid_value)
            .map(|uid| (uid, UidSource::Body))
    };

    let retry_eligible = matches!(*method, Method::GET | Method::HEAD)
        || headers
            .get(IDEMPOTENCY_HEADER)
            .is_some_and(|v| !v.as_bytes().is_empty())
        || parsed()
            .idempotency_key
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .is_some_and(|k| !k.is_empty());
    Ok(RequestFacts {
        uid,
        retry_eligible,
    })
}

/// `/v1/wallet/{uid}` and anything below it.
pub fn uid_from_path(path: &str) -> Option<u64> {
    let rest = path.strip_prefix(WALLET_PREFIX)?;
    let segment = rest.split('/').next()?;
    segment.parse().ok()
}

pub fn bucket_of_uid(uid: u64) -> usize {
    (uid % BUCKETS as u64) as usize
}

/// FNV-1a, then murmur3's finaliser: stable across processes and releases (std's hasher is
/// neither), so every edge sends a path to the same site. FNV-1a alone leaves the low bits
/// (the bucket) poorly mixed for paths that differ only in their last characters.
pub fn bucket_of_path(path: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn uid_comes_from_the_header_then_the_path_then_the_body() {
        let gift = br#"{"user_id": 77, "streamer_id": 2, "gift_id": "rose", "count": 1, "idempotency_key": "k"}"#;
        let f = facts(&Method::POST, &headers(&[]), "/v1/gifts", gift).unwrap();
        assert_eq!(f.uid, Some((77, UidSource::Body)));
        assert_eq!(f.bucket("/v1/gifts"), 77);

        let f = facts(
            &Method::POST,
            &headers(&[("x-uid", "5000")]),
            "/v1/gifts",
            gift,
        )
        .unwrap();
        assert_eq!(f.uid, Some((5000, UidSource::Header)));
        assert_eq!(f.bucket("/v1/gifts"), 5000 % 1024);

        let f = facts(&Method::GET, &headers(&[]), "/v1/wallet/1025", b"").unwrap();
        assert_eq!(f.uid, Some((1025, UidSource::Path)));
        assert_eq!(f.bucket("/v1/wallet/1025"), 1);
        let f = facts(
            &Method::POST,
            &headers(&[]),
            "/v1/wallet/9/topup",
            br#"{"amount": 5, "idempotency_key": "t"}"#,
        )
        .unwrap();
        assert_eq!(f.uid, Some((9, UidSource::Path)));

        // A numeric string is a uid too; other shapes are not.
        let f = facts(&Method::POST, &headers(&[]), "/x", br#"{"user_id": "12"}"#).unwrap();
        assert_eq!(f.uid, Some((12, UidSource::Body)));
        for body in [
            &br#"{"user_id": -1}"#[..],
            br#"{"user_id": 1.5}"#,
            br#"{"user_id": null}"#,
            br#"[1, 2]"#,
            b"not json",
            b"",
        ] {
            let f = facts(&Method::POST, &headers(&[]), "/x", body).unwrap();
            assert_eq!(f.uid, None, "{}", String::from_utf8_lossy(body));
        }
        // A path that only looks like a wallet path.
        assert_eq!(uid_from_path("/v1/wallet/abc"), None);
        assert_eq!(uid_from_path("/v1/wallets/3"), None);
        assert_eq!(uid_from_path("/v1/wallet/"), None);
    }

    #[test]
    fn a_bad_uid_header_is_refused() {
        for bad in ["abc", "-3", "1.5", ""] {
            let e = facts(
                &Method::GET,
                &headers(&[("x-uid", bad)]),
                "/v1/catalog",
                b"",
            );
            assert!(e.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_without_a_uid_hash_their_path() {
        let f = facts(&Method::GET, &headers(&[]), "/v1/orders/abc", b"").unwrap();
        assert_eq!(f.uid, None);
        let b = f.bucket("/v1/orders/abc");
        assert!(b < BUCKETS);
        assert_eq!(b, bucket_of_path("/v1/orders/abc"), "stable");
        // Paths that differ only at the end still spread over the buckets (uniform hashing
        // would give about 181 distinct buckets out of 200 paths).
        let spread: std::collections::BTreeSet<usize> = (0..200)
            .map(|i| bucket_of_path(&format!("/v1/orders/{i}")))
            .collect();
        assert!(spread.len() > 165, "{}", spread.len());
        // Pinned: changing the hash would move every order lookup to another site.
        assert_eq!(bucket_of_path("/v1/orders/abc"), 243);
    }

    #[test]
    fn only_reads_and_keyed_requests_may_be_resent() {
        let none = headers(&[]);
        let eligible = |m: Method, h: &HeaderMap, body: &[u8]| {
            facts(&m, h, "/v1/gifts", body).unwrap().retry_eligible
        };
        assert!(eligible(Method::GET, &none, b""));
        assert!(eligible(Method::HEAD, &none, b""));
        assert!(eligible(
            Method::POST,
            &none,
            br#"{"user_id": 1, "idempotency_key": "k-1"}"#
        ));
        assert!(eligible(
            Method::POST,
            &headers(&[("idempotency-key", "k-2")]),
            br#"{"user_id": 1}"#
        ));
        assert!(!eligible(Method::POST, &none, br#"{"user_id": 1}"#));
        assert!(!eligible(
            Method::POST,
            &none,
            br#"{"user_id": 1, "idempotency_key": ""}"#
        ));
        assert!(!eligible(
            Method::POST,
            &none,
            br#"{"user_id": 1, "idempotency_key": 5}"#
        ));
        assert!(!eligible(Method::PUT, &none, b""));
        assert!(!eligible(Method::DELETE, &none, b""));
        assert!(!eligible(Method::POST, &none, b"idempotency_key"));
    }
}
