//! Who may do what: client tokens (JWT, HS256) and publish keys.
//!
//! A token's `workspaces` claim lists the workspaces the client may read
//! (`["*"]` for all) and its `exp` is honoured to the second, with no leeway:
//! the session closes with 4001 at expiry. Tokens and keys are never logged.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired: get a fresh token and resume")]
    Expired,
    #[error("token signature does not match this cluster's secret")]
    BadSignature,
    #[error("token is not a valid HS256 JWT with `workspaces` and `exp` claims: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub workspaces: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    workspaces: Box<[String]>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Grant {
    pub fn allows(&self, workspace: &str) -> bool {
        self.workspaces.iter().any(|w| w == "*" || w == workspace)
    }
}

/// Checks client tokens against the cluster's HS256 secret.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(secret: &str) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        TokenVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(e.to_string()),
            },
        )?;
        Ok(Grant {
            workspaces: data.claims.workspaces.into(),
            exp: data.claims.exp,
        })
    }
}

/// Signs a token; used by the CLI, `/v1/dev`, the tests and the benchmark.
pub fn mint(secret: &str, workspaces: &[&str], ttl_secs: u64) -> String {
    let claims = Claims {
        workspaces: workspaces.iter().map(|w| w.to_string()).collect(),
        exp: crate::change::now_ms() / 1000 + ttl_secs,
        sub: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing does not fail")
}

/// Compares a presented publish key with the configured ones in time that
/// does not depend on where they differ.
pub fn publish_key_ok(keys: &[String], presented: &str) -> bool {
    keys.iter().fold(false, |ok, key| {
        ok | constant_time_eq(key.as_bytes(), presented.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_grants_and_refuses_the_rest() {
        let verifier = TokenVerifier::new("s");
        let grant = verifier.verify(&mint("s", &["acme"], 60)).unwrap();
        assert!(grant.allows("acme") && !grant.allows("other"));
        assert!(verifier
            .verify(&mint("s", &["*"], 60))
            .unwrap()
            .allows("any"));
        assert_eq!(
            verifier.verify(&mint("wrong", &["a"], 60)).unwrap_err(),
            AuthError::BadSignature
        );
        assert!(matches!(
            verifier.verify("nonsense"),
            Err(AuthError::Malformed(_))
        ));

        let expired = Claims {
            workspaces: vec!["a".into()],
            exp: 1,
            sub: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(verifier.verify(&token).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn publish_keys() {
        let keys = vec!["k1".to_string(), "k2".to_string()];
        assert!(publish_key_ok(&keys, "k2"));
        assert!(!publish_key_ok(&keys, "k3"));
        assert!(!publish_key_ok(&keys, ""));
    }
}
