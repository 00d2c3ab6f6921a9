//! The proxy's side: a JWT for each forwarded request.

use std::time::SystemTime;

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::{Claims, KeysError, SigningKeys, unix_seconds};

/// The signing keys, parsed once: the proxy signs on every request.
pub struct Signer {
    /// (kid, key, not_before), oldest first.
    keys: Vec<(String, EncodingKey, u64)>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(kid, ..)| kid.as_str()).collect();
        f.debug_struct("Signer").field("kids", &kids).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no signing key is active yet (the first one signs from {first_not_before})")]
    NoActiveKey { first_not_before: u64 },
    #[error("no signing key")]
    NoKey,
    #[error("signing failed: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

impl Signer {
    pub fn new(keys: &SigningKeys) -> Result<Signer, KeysError> {
        let mut parsed = keys
            .keys
            .iter()
            .map(|key| Ok((key.kid.clone(), key.encoding_key()?, key.not_before)))
            .collect::<Result<Vec<_>, KeysError>>()?;
        parsed.sort_by_key(|(_, _, not_before)| *not_before);
        Ok(Signer { keys: parsed })
    }

    /// `claims` signed with the key active at `now`, as a compact JWT.
    pub fn sign(&self, claims: &Claims, now: SystemTime) -> Result<String, SignError> {
        let now = unix_seconds(now);
        let (kid, key, _) = self
            .keys
            .iter()
            .rev()
            .find(|(_, _, not_before)| *not_before <= now)
            .ok_or(match self.keys.first() {
                Some((_, _, first)) => SignError::NoActiveKey {
                    first_not_before: *first,
                },
                None => SignError::NoKey,
            })?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, key)?)
    }
}
