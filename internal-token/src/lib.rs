//! The credential on the proxy-to-runtime hop. The proxy checks a client's token, then signs a
//! short-lived JWT for the one request it forwards: EdDSA over Ed25519, the model version id as
//! audience, the token record id as subject, the request's deadline. A runtime holds only the
//! public keys (a JWK set), verifies the JWT before any work and refuses everything else, so
//! that a caller inside the cluster cannot skip the proxy's tokens, scopes, expiry, revocation
//! and limits by calling a runtime pod's address.
//!
//! Keys rotate with an overlap: a new key is published to the runtimes first and signs only
//! once they have had time to load it; the old one verifies until every JWT it signed has
//! expired ([`SigningKeys`]). Both sides read their keys from files that they watch
//! ([`watch::Watched`]), so a rotation needs no restart.
//!
//! On the way back, a runtime reports what each request used ([`usage`]).

pub mod keys;
mod sign;
pub mod usage;
mod verify;
pub mod watch;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use keys::{KeysError, Maintained, Schedule, SigningKey, SigningKeys};
pub use sign::{SignError, Signer};
pub use verify::{Refusal, Verifier};

/// The `iss` of every JWT the proxy signs; runtimes require it.
pub const ISSUER: &str = "infergate-proxy";

/// How long a JWT is good for once signed. A runtime checks it when the request's head arrives,
/// a connect after the signing, so seconds are plenty; one copied from a request is soon useless.
pub const LIFETIME: Duration = Duration::from_secs(10);

/// Clock difference between the proxy's node and a runtime's that `exp` and `iat` tolerate.
pub const LEEWAY: Duration = Duration::from_secs(5);

/// What the proxy vouches for when it forwards a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The model version id the request is for: a runtime accepts only its own.
    pub aud: String,
    /// The id of the token record that authorized the request (never the token itself), to which
    /// the runtime can attribute the usage.
    pub sub: String,
    /// Signed at, in seconds since the Unix epoch.
    pub iat: u64,
    /// Good until, in seconds since the Unix epoch.
    pub exp: u64,
    /// Unique per signing (a retry on another endpoint gets a new one).
    pub jti: String,
    /// The request's `X-Request-Id`, for finding it in both parts' logs.
    pub rid: String,
    /// When the request's deadline ends, in milliseconds since the Unix epoch (whole numbers
    /// survive JSON exactly): the runtime's deadline comes from here, not from a header anyone
    /// could set.
    pub deadline_ms: u64,
}

/// One forwarded request, as the proxy knows it after the token check.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    pub model_version_id: &'a str,
    pub token_record_id: &'a str,
    pub request_id: &'a str,
    /// What is left of the request's deadline.
    pub remaining: Duration,
}

impl Claims {
    /// The claims for `request` signed at `now`; `jti` is fresh.
    pub fn new(request: Forwarded<'_>, now: SystemTime) -> Claims {
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        Claims {
            iss: ISSUER.to_owned(),
            aud: request.model_version_id.to_owned(),
            sub: request.token_record_id.to_owned(),
            iat: since_epoch.as_secs(),
            exp: (since_epoch + LIFETIME).as_secs(),
            jti: fresh_id(),
            rid: request.request_id.to_owned(),
            deadline_ms: u64::try_from((since_epoch + request.remaining).as_millis())
                .unwrap_or(u64::MAX),
        }
    }

    /// What is left of the deadline at `now`; zero once it has passed.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        let deadline = UNIX_EPOCH + Duration::from_millis(self.deadline_ms);
        deadline.duration_since(now).unwrap_or_default()
    }
}

/// Seconds since the Unix epoch at `now`.
pub fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// 128 random bits as hex: unique without coordination.
fn fresh_id() -> String {
    let mut bytes = [0u8; 16];
    // Uniqueness, not secrecy: should the OS generator fail, the clock still tells signings apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(remaining: Duration) -> Forwarded<'static> {
        Forwarded {
            model_version_id: "llama-3-8b-v2",
            token_record_id: "tok-1234",
            request_id: "req-1",
            remaining,
        }
    }

    #[test]
    fn claims_expire_seconds_after_signing_and_carry_the_deadline() {
        let signed_at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let claims = Claims::new(forwarded(Duration::from_millis(2_500)), signed_at);
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, "llama-3-8b-v2");
        assert_eq!(claims.sub, "tok-1234");
        assert_eq!(claims.rid, "req-1");
        assert_eq!(claims.exp - claims.iat, LIFETIME.as_secs());
        assert_eq!(claims.deadline_ms, 1_800_000_002_500);
        assert_eq!(
            claims.remaining(signed_at + Duration::from_secs(1)),
            Duration::from_millis(1_500)
        );
        assert_eq!(
            claims.remaining(signed_at + Duration::from_secs(60)),
            Duration::ZERO
        );
    }

    #[test]
    fn every_signing_gets_its_own_jti() {
        let now = SystemTime::now();
        let a = Claims::new(forwarded(Duration::from_secs(1)), now);
        let b = Claims::new(forwarded(Duration::from_secs(1)), now);
        assert_ne!(a.jti, b.jti);
        assert_eq!(a.jti.len(), 32);
    }
}
