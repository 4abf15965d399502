//! Access JWTs (HS256, algorithm pinned) and the opaque tokens we store only as hashes.

use crate::secret::Secret;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The prefix that tells an API key from a JWT in an `Authorization` header.
pub const API_KEY_PREFIX: &str = "ec_";
/// Refresh tokens carry their own prefix so one is never mistaken for an API key.
pub const REFRESH_PREFIX: &str = "ecr_";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
    iss: String,
    aud: String,
}

/// Issues and verifies access tokens.
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_secs: u64,
}

impl Jwt {
    /// A signer/verifier for `secret`; only HS256 with our issuer and audience is accepted.
    pub fn new(secret: &Secret, issuer: &str, audience: &str, ttl_secs: u64) -> Jwt {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = 5;
        Jwt {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            issuer: issuer.into(),
            audience: audience.into(),
            ttl_secs,
        }
    }

    /// Seconds an access token lives (`expires_in`).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// A signed access token for `user`, valid from `now_secs`.
    pub fn issue(&self, user: Uuid, now_secs: u64) -> Secret {
        let claims = Claims {
            sub: user.to_string(),
            iat: now_secs,
            exp: now_secs + self.ttl_secs,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail");
        Secret::new(token)
    }

    /// The user a token was issued to, or why it is refused (for logs, never for clients).
    pub fn verify(&self, token: &str) -> Result<Uuid, &'static str> {
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => "expired",
                K::InvalidSignature => "bad signature",
                K::InvalidAlgorithm | K::MissingAlgorithm => "wrong algorithm",
                K::InvalidIssuer | K::InvalidAudience => "wrong issuer or audience",
                K::MissingRequiredClaim(_) => "missing claim",
                _ => "malformed",
            })?;
        Uuid::parse_str(&data.claims.sub).map_err(|_| "malformed subject")
    }
}

/// A fresh opaque token (`prefix` + 32 random bytes, base64url) and its SHA-256.
pub fn opaque_token(prefix: &str) -> (Secret, [u8; 32]) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token =
        format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = sha256(&token);
    (Secret::new(token), hash)
}

/// High-entropy tokens need no slow hash: SHA-256 makes a stolen table useless.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A random secret for signing JWTs, made once per data directory when none is configured.
pub fn generate_jwt_secret() -> Secret {
    let mut bytes = [0u8; 48];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt() -> Jwt {
        Jwt::new(&Secret::new("k".repeat(32)), "edgechat", "edgechat", 60)
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn round_trip_and_refusals() {
        let j = jwt();
        let user = Uuid::now_v7();
        let token = j.issue(user, now());
        assert_eq!(j.verify(token.expose()), Ok(user));
        assert_eq!(j.verify(j.issue(user, now() - 3600).expose()), Err("expired"));
        let other = Jwt::new(&Secret::new("x".repeat(32)), "edgechat", "edgechat", 60);
        assert_eq!(other.verify(token.expose()), Err("bad signature"));
        let elsewhere = Jwt::new(&Secret::new("k".repeat(32)), "edgechat", "other", 60);
        assert_eq!(elsewhere.verify(token.expose()), Err("wrong issuer or audience"));
        assert!(j.verify("not.a.jwt").is_err());
    }

    #[test]
    fn opaque_tokens_have_prefix_entropy_and_hash() {
        let (a, ha) = opaque_token(API_KEY_PREFIX);
        let (b, _) = opaque_token(API_KEY_PREFIX);
        assert!(a.expose().starts_with("ec_") && a.expose().len() == 3 + 43);
        assert_ne!(a, b);
        assert_eq!(sha256(a.expose()), ha);
    }
}
