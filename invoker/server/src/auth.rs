//! Who is approving: operators authenticate with a per-operator token for now. The check is
//! behind [`Authenticator`] so that mutual TLS (the client certificate's subject) can replace
//! it without touching the approval logic.

use sha2::{Digest, Sha256};

use crate::config::ApprovalsConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no operators are configured on the invoker ([[approvals.operators]]): nobody can approve"
    )]
    NoOperators,
    #[error("operator {0:?} is not known or the credential does not match")]
    Rejected(String),
}

/// Maps a claimed identity and a credential to an authenticated operator name.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, claimed: &str, credential: &str) -> Result<String, AuthError>;
}

/// Tokens checked against the SHA-256 digests in the invoker's configuration.
pub struct TokenAuthenticator {
    operators: Vec<(String, [u8; 32])>,
}

impl TokenAuthenticator {
    pub fn new(config: &ApprovalsConfig) -> TokenAuthenticator {
        let operators = config
            .operators
            .iter()
            .filter_map(|op| decode_hex(&op.token_sha256).map(|d| (op.name.clone(), d)))
            .collect();
        TokenAuthenticator { operators }
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares without an early exit, so the time taken says nothing about how much matched.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for TokenAuthenticator {
    fn authenticate(&self, claimed: &str, credential: &str) -> Result<String, AuthError> {
        if self.operators.is_empty() {
            return Err(AuthError::NoOperators);
        }
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        self.operators
            .iter()
            .find(|(name, expected)| name == claimed && same(expected, &digest))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| AuthError::Rejected(claimed.to_string()))
    }
}

/// The hex SHA-256 of a token, as `token_sha256` wants it (same as `sha256sum`).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorConfig;

    #[test]
    fn tokens_authenticate_their_operator_only() {
        let config = ApprovalsConfig {
            required: 1,
            operators: vec![
                OperatorConfig {
                    name: "alice".into(),
                    token_sha256: token_sha256("alice-secret"),
                },
                OperatorConfig {
                    name: "bob".into(),
                    token_sha256: token_sha256("bob-secret"),
                },
            ],
            ..ApprovalsConfig::default()
        };
        let auth = TokenAuthenticator::new(&config);
        assert_eq!(auth.authenticate("alice", "alice-secret").unwrap(), "alice");
        assert!(auth.authenticate("alice", "bob-secret").is_err());
        assert!(auth.authenticate("mallory", "alice-secret").is_err());
        assert!(auth.authenticate("alice", "").is_err());
        let none = TokenAuthenticator::new(&ApprovalsConfig::default());
        assert_eq!(
            none.authenticate("alice", "alice-secret"),
            Err(AuthError::NoOperators)
        );
        // sha256sum of "abc".
        assert_eq!(
            token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
