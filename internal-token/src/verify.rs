//! The runtime's side: whether a request carries a JWT the proxy signed for this model.

use std::collections::HashMap;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::{Claims, ISSUER, KeysError, LEEWAY};

/// The verifying keys of one runtime, and the audience it answers to (its model version id).
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        f.debug_struct("Verifier")
            .field("kids", &kids)
            .field("audience", &self.validation.aud)
            .finish()
    }
}

/// Why a request was refused; none of them echoes the JWT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no internal credential: this runtime answers only requests that the infergate proxy forwards"
    )]
    Missing,
    #[error("the internal credential is not a JWT this runtime can read")]
    Malformed,
    #[error("the internal credential was signed by key {0:?}, which this runtime does not hold")]
    UnknownKey(String),
    #[error("the internal credential's signature does not verify")]
    BadSignature,
    #[error("the internal credential has expired")]
    Expired,
    #[error("the internal credential was issued for another model, not {0:?}")]
    WrongModel(String),
    #[error("the internal credential was not issued by {ISSUER}")]
    WrongIssuer,
}

impl Refusal {
    /// The machine-readable code of the 401 body.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Missing => "internal_token_missing",
            Refusal::Malformed | Refusal::WrongIssuer => "internal_token_invalid",
            Refusal::UnknownKey(_) => "internal_token_unknown_key",
            Refusal::BadSignature => "internal_token_bad_signature",
            Refusal::Expired => "internal_token_expired",
            Refusal::WrongModel(_) => "internal_token_wrong_model",
        }
    }
}

impl Verifier {
    /// Reads a JWK set; keys other than Ed25519 ones with a `kid` are skipped.
    pub fn parse(jwks: &[u8], audience: &str) -> Result<Verifier, KeysError> {
        let set: JwkSet = serde_json::from_slice(jwks)?;
        let keys: HashMap<String, DecodingKey> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                (key.family() == jsonwebtoken::AlgorithmFamily::Ed).then_some((kid, key))
            })
            .collect();
        if keys.is_empty() {
            return Err(KeysError::NoVerifyingKey);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY.as_secs();
        validation.set_audience(&[audience]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        Ok(Verifier { keys, validation })
    }

    /// The claims of the JWT in an `Authorization: Bearer` header value, once its key,
    /// signature, expiry, audience and issuer check out.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<Claims, Refusal> {
        let token = authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .ok_or(Refusal::Missing)?;
        let token = std::str::from_utf8(token)
            .map_err(|_| Refusal::Malformed)?
            .trim();
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let kid = header.kid.ok_or(Refusal::Malformed)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| Refusal::UnknownKey(kid.clone()))?;
        match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(error) => Err(match error.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::InvalidAudience => Refusal::WrongModel(
                    self.validation
                        .aud
                        .iter()
                        .flatten()
                        .next()
                        .cloned()
                        .unwrap_or_default(),
                ),
                ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                _ => Refusal::Malformed,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{Forwarded, Signer, SigningKeys};

    const MODEL: &str = "minilm-v1";

    fn forwarded(model: &str) -> Forwarded<'_> {
        Forwarded {
            model_version_id: model,
            token_record_id: "tok-1",
            request_id: "req-1",
            remaining: Duration::from_secs(30),
        }
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    struct Pair {
        keys: SigningKeys,
        signer: Signer,
        verifier: Verifier,
    }

    fn pair() -> Pair {
        let keys = SigningKeys::first(SystemTime::now() - Duration::from_secs(3600)).unwrap();
        let jwks = serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap();
        Pair {
            signer: Signer::new(&keys).unwrap(),
            verifier: Verifier::parse(&jwks, MODEL).unwrap(),
            keys,
        }
    }

    #[test]
    fn a_jwt_the_proxy_signed_for_this_model_is_accepted() {
        let pair = pair();
        let now = SystemTime::now();
        let claims = Claims::new(forwarded(MODEL), now);
        let jwt = pair.signer.sign(&claims, now).unwrap();
        assert_eq!(pair.verifier.verify(Some(&bearer(&jwt))), Ok(claims));
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(pair.keys.keys[0].kid.as_str()));
    }

    #[test]
    fn a_request_without_a_jwt_is_refused() {
        let pair = pair();
        assert_eq!(pair.verifier.verify(None), Err(Refusal::Missing));
        assert_eq!(
            pair.verifier.verify(Some(b"Basic abc")),
            Err(Refusal::Missing)
        );
        assert_eq!(
            pair.verifier.verify(Some(b"Bearer igt_not_a_jwt")),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn a_jwt_for_another_model_is_refused() {
        let pair = pair();
        let now = SystemTime::now();
        let jwt = pair
            .signer
            .sign(&Claims::new(forwarded("another-model"), now), now)
            .unwrap();
        assert_eq!(
            pair.verifier.verify(Some(&bearer(&jwt))),
            Err(Refusal::WrongModel(MODEL.into()))
        );
    }

    #[test]
    fn an_expired_jwt_is_refused_once_past_the_leeway() {
        let pair = pair();
        let signed = SystemTime::now() - crate::LIFETIME - LEEWAY - Duration::from_secs(2);
        let jwt = pair
            .signer
            .sign(&Claims::new(forwarded(MODEL), signed), signed)
            .unwrap();
        assert_eq!(
            pair.verifier.verify(Some(&bearer(&jwt))),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn a_jwt_signed_by_a_key_the_runtime_does_not_hold_is_refused() {
        let pair = pair();
        let stranger = Signer::new(&SigningKeys::first(SystemTime::UNIX_EPOCH).unwrap()).unwrap();
        let now = SystemTime::now();
        let jwt = stranger
            .sign(&Claims::new(forwarded(MODEL), now), now)
            .unwrap();
        assert!(matches!(
            pair.verifier.verify(Some(&bearer(&jwt))),
            Err(Refusal::UnknownKey(_))
        ));
    }

    #[test]
    fn a_jwt_whose_claims_were_altered_is_refused() {
        let pair = pair();
        let now = SystemTime::now();
        let jwt = pair
            .signer
            .sign(&Claims::new(forwarded(MODEL), now), now)
            .unwrap();
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        let mut claims = Claims::new(forwarded(MODEL), now);
        claims.deadline_ms += 3_600_000;
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&claims).unwrap(),
        );
        assert_eq!(
            pair.verifier.verify(Some(&bearer(&parts.join(".")))),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn a_jwt_from_another_issuer_is_refused() {
        let pair = pair();
        let now = SystemTime::now();
        let mut claims = Claims::new(forwarded(MODEL), now);
        claims.iss = "someone-else".into();
        let jwt = pair.signer.sign(&claims, now).unwrap();
        assert_eq!(
            pair.verifier.verify(Some(&bearer(&jwt))),
            Err(Refusal::WrongIssuer)
        );
    }

    #[test]
    fn a_runtime_holding_both_keys_of_a_rotation_accepts_either() {
        let mut keys = SigningKeys::first(SystemTime::now() - Duration::from_secs(100)).unwrap();
        let old_signer = Signer::new(&keys).unwrap();
        keys.rotate(SystemTime::now() - Duration::from_secs(50), Duration::ZERO)
            .unwrap();
        let new_signer = Signer::new(&keys).unwrap();
        let jwks = serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap();
        let verifier = Verifier::parse(&jwks, MODEL).unwrap();
        let now = SystemTime::now();
        for signer in [old_signer, new_signer] {
            let jwt = signer
                .sign(&Claims::new(forwarded(MODEL), now), now)
                .unwrap();
            assert!(verifier.verify(Some(&bearer(&jwt))).is_ok());
        }
    }

    #[test]
    fn a_key_that_does_not_sign_yet_is_not_used() {
        let keys = SigningKeys::first(SystemTime::now() + Duration::from_secs(60)).unwrap();
        let signer = Signer::new(&keys).unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            signer.sign(&Claims::new(forwarded(MODEL), now), now),
            Err(crate::SignError::NoActiveKey { .. })
        ));
    }
}
