//! The proxy's side: a JWT for each forwarded request.
//!
//! The compact form is assembled here rather than by `jsonwebtoken::encode`, which rebuilds the
//! Ed25519 key from its PKCS#8 bytes on every call (deriving the public half: a second scalar
//! multiplication); that doubled the proxy's CPU time per request. Runtimes verify with
//! `jsonwebtoken`, so the output is checked against the standard reading in the tests.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use jsonwebtoken::{Algorithm, Header};

use crate::{Claims, KeysError, SigningKeys, unix_seconds};

/// One key, ready to sign: its header already encoded.
struct ReadyKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
    not_before: u64,
    /// `base64url({"typ":"JWT","alg":"EdDSA","kid":...})`.
    encoded_header: String,
}

/// The signing keys, parsed once: the proxy signs on every request.
pub struct Signer {
    /// Oldest first.
    keys: Vec<ReadyKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|key| key.kid.as_str()).collect();
        f.debug_struct("Signer").field("kids", &kids).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no signing key is active yet (the first one signs from {first_not_before})")]
    NoActiveKey { first_not_before: u64 },
    #[error("no signing key")]
    NoKey,
    #[error("the claims do not serialize: {0}")]
    Claims(#[from] serde_json::Error),
}

impl Signer {
    pub fn new(keys: &SigningKeys) -> Result<Signer, KeysError> {
        let mut ready =
            keys.keys
                .iter()
                .map(|key| {
                    let der = key.encoding_key()?;
                    let signing = ed25519_dalek::SigningKey::from_pkcs8_der(der.as_bytes())
                        .map_err(|_| KeysError::NotEd25519 {
                            kid: key.kid.clone(),
                        })?;
                    let mut header = Header::new(Algorithm::EdDSA);
                    header.kid = Some(key.kid.clone());
                    Ok(ReadyKey {
                        kid: key.kid.clone(),
                        key: signing,
                        not_before: key.not_before,
                        encoded_header: URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
                    })
                })
                .collect::<Result<Vec<_>, KeysError>>()?;
        ready.sort_by_key(|key| key.not_before);
        Ok(Signer { keys: ready })
    }

    /// `claims` signed with the key active at `now`, as a compact JWT.
    pub fn sign(&self, claims: &Claims, now: SystemTime) -> Result<String, SignError> {
        let now = unix_seconds(now);
        let key = self
            .keys
            .iter()
            .rev()
            .find(|key| key.not_before <= now)
            .ok_or(match self.keys.first() {
                Some(first) => SignError::NoActiveKey {
                    first_not_before: first.not_before,
                },
                None => SignError::NoKey,
            })?;
        let mut jwt = String::with_capacity(512);
        jwt.push_str(&key.encoded_header);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims)?, &mut jwt);
        let signature = key.key.sign(jwt.as_bytes());
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut jwt);
        Ok(jwt)
    }
}
