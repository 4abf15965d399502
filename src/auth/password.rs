//! argon2id password hashing on the blocking pool, a bounded number at once.
//!
//! Each hash takes ~19 MiB and tens of milliseconds of CPU on purpose; the semaphore keeps a
//! login storm from exhausting memory or starving the blocking pool's other users (redb writes).

use crate::secret::Secret;
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
const MEMORY_KIB: u32 = 19 * 1024;
const ITERATIONS: u32 = 2;
const LANES: u32 = 1;

/// Verified against when the user does not exist, so both answers take as long. A constant with
/// our parameters (a test checks them): computing one at start would cost a hash and ~19 MiB.
const NOBODY: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$oxKI9RB7Q/crmYmi04SNSA$FWkJqgtAmQgDDBvDd1PmSLBIYObdiYYhRmqTBOIFQ0s";

/// Hashes and verifies passwords.
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
}

/// A sign-in waits at most this long for a hashing slot; past it the server is overloaded and
/// says so, instead of letting an unbounded queue hold every connection.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Why hashing failed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every hashing slot stayed taken for `QUEUE_WAIT`.
    #[error("password hashing is saturated")]
    Busy,
    /// The blocking task died, or argon2 refused its input.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

fn argon2() -> Argon2<'static> {
    let params =
        Params::new(MEMORY_KIB, ITERATIONS, LANES, None).expect("constant params are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl PasswordHasher {
    /// A hasher that runs at most `concurrency` hashes at once.
    pub fn new(concurrency: usize) -> PasswordHasher {
        PasswordHasher { permits: Arc::new(Semaphore::new(concurrency.max(1))) }
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`) for `password`.
    pub async fn hash(&self, password: &Secret) -> Result<String, HashError> {
        let password = password.clone();
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2()
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| HashError::Failed(e.to_string()))
        })
        .await
    }

    /// Whether `password` matches `phc`; a malformed stored hash never matches.
    pub async fn verify(&self, password: &Secret, phc: &str) -> Result<bool, HashError> {
        let (password, phc) = (password.clone(), phc.to_string());
        self.run(move || {
            let Ok(parsed) = PasswordHash::new(&phc) else { return Ok(false) };
            Ok(argon2().verify_password(password.expose().as_bytes(), &parsed).is_ok())
        })
        .await
    }

    /// Spends the same work as `verify` for a user that does not exist, and answers `false`.
    pub async fn verify_nobody(&self, password: &Secret) -> Result<bool, HashError> {
        self.verify(password, NOBODY).await.map(|_| false)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = tokio::time::timeout(QUEUE_WAIT, self.permits.acquire())
            .await
            .map_err(|_| HashError::Busy)?
            .map_err(|e| HashError::Failed(e.to_string()))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| HashError::Failed(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify() {
        let h = PasswordHasher::new(2);
        let pw = Secret::new("correct horse");
        let a = h.hash(&pw).await.unwrap();
        let b = h.hash(&pw).await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(h.verify(&pw, &a).await.unwrap());
        assert!(!h.verify(&Secret::new("wrong horse"), &a).await.unwrap());
        assert!(!h.verify(&pw, "garbage").await.unwrap());
        assert!(!h.verify_nobody(&pw).await.unwrap());
        // The dummy costs what a real hash costs.
        let nobody = PasswordHash::new(NOBODY).unwrap();
        let real = PasswordHash::new(&a).unwrap();
        assert_eq!(
            (nobody.algorithm, nobody.version, nobody.params),
            (real.algorithm, real.version, real.params)
        );
    }
}
