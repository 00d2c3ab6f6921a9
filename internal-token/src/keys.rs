//! Ed25519 key sets and their rotation.
//!
//! The signing side is a JSON file only the proxy may read:
//! `{"keys": [{"kid", "private_key" (PKCS#8 PEM, as `openssl genpkey -algorithm ed25519`
//! writes), "not_before" (seconds since the Unix epoch)}]}`. The proxy signs with the newest key
//! whose `not_before` has passed. The verifying side is the standard JWK set of the same keys'
//! public halves, which runtimes read.
//!
//! A rotation adds a key whose `not_before` lies an activation delay ahead: its public half is
//! published at once, so that every runtime has loaded it before the first JWT it signs
//! arrives. Once it signs, the key it replaced stays published for a grace period that outlasts
//! the JWTs signed just before (their lifetime, the clock leeway and the time the proxy takes to
//! see the new file), then goes.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde::{Deserialize, Serialize};

use crate::{LEEWAY, LIFETIME, unix_seconds};

/// A signing key: its id (the RFC 7638 thumbprint of its public half), the private key and
/// when it may start signing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKey {
    pub kid: String,
    pub private_key: String,
    pub not_before: u64,
}

/// The private key never reaches a log through `{:?}`.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("not_before", &self.not_before)
            .finish_non_exhaustive()
    }
}

/// The signing keys, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeys {
    pub keys: Vec<SigningKey>,
}

/// When keys are replaced and retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// How long a key signs before a scheduled replacement.
    pub period: Duration,
    /// How long a new key is published before it signs: at least the time every verifier and
    /// the signer take to see a changed file (half a second on one machine; the kubelet's
    /// refresh of mounted ConfigMaps and Secrets, about a minute, in a cluster).
    pub activation: Duration,
}

impl Schedule {
    /// How long a replaced key keeps verifying once its successor signs: the lifetime and leeway
    /// of the JWTs it signed last, and the activation delay again for a signer that saw the new
    /// key late.
    pub fn grace(&self) -> Duration {
        self.activation
            .saturating_add(LIFETIME)
            .saturating_add(LEEWAY)
    }
}

/// What `SigningKeys::maintain` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Maintained {
    /// The id of a key added.
    pub rotated: Option<String>,
    /// Whether the set changed (a key added or retired): it must be written and published.
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("the key file is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("key {kid:?}: not an Ed25519 private key in PKCS#8 PEM: {source}")]
    PrivateKey {
        kid: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("key {kid:?}: its id should be {thumbprint:?}, its public key's thumbprint")]
    KeyId { kid: String, thumbprint: String },
    #[error("no random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    #[error("a verifying key set holds no Ed25519 key with a kid")]
    NoVerifyingKey,
    #[error("key {kid:?}: its PKCS#8 bytes are not an Ed25519 private key")]
    NotEd25519 { kid: String },
}

/// The DER prefix of a PKCS#8 (RFC 8410) Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl SigningKey {
    /// A new key from the operating system's random generator, signing from `not_before`.
    pub fn generate(not_before: SystemTime) -> Result<SigningKey, KeysError> {
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(KeysError::Random)?;
        der.extend_from_slice(&seed);
        let body = base64::engine::general_purpose::STANDARD.encode(&der);
        let private_key =
            format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n");
        let public = public_jwk(&private_key, "")?;
        Ok(SigningKey {
            kid: thumbprint(&public)?,
            private_key,
            not_before: unix_seconds(not_before),
        })
    }

    /// The private key, ready to sign.
    pub(crate) fn encoding_key(&self) -> Result<EncodingKey, KeysError> {
        EncodingKey::from_ed_pem(self.private_key.as_bytes()).map_err(|source| {
            KeysError::PrivateKey {
                kid: self.kid.clone(),
                source,
            }
        })
    }

    /// The public half as a JWK with this key's id.
    pub fn verifying_key(&self) -> Result<Jwk, KeysError> {
        let jwk = public_jwk(&self.private_key, &self.kid)?;
        let expected = thumbprint(&jwk)?;
        if expected != self.kid {
            return Err(KeysError::KeyId {
                kid: self.kid.clone(),
                thumbprint: expected,
            });
        }
        Ok(jwk)
    }
}

fn public_jwk(private_key_pem: &str, kid: &str) -> Result<Jwk, KeysError> {
    let key_error = |source| KeysError::PrivateKey {
        kid: kid.to_owned(),
        source,
    };
    let key = EncodingKey::from_ed_pem(private_key_pem.as_bytes()).map_err(key_error)?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA).map_err(key_error)?;
    jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_id = Some(kid.to_owned());
    Ok(jwk)
}

fn thumbprint(jwk: &Jwk) -> Result<String, KeysError> {
    jwk.thumbprint(ThumbprintHash::SHA256)
        .map_err(|source| KeysError::PrivateKey {
            kid: jwk.common.key_id.clone().unwrap_or_default(),
            source,
        })
}

impl SigningKeys {
    /// A key set that signs from `now`, for a first start.
    pub fn first(now: SystemTime) -> Result<SigningKeys, KeysError> {
        Ok(SigningKeys {
            keys: vec![SigningKey::generate(now)?],
        })
    }

    /// Reads a key file, checking every key (a bad one is an error, not a key skipped later).
    pub fn parse(bytes: &[u8]) -> Result<SigningKeys, KeysError> {
        let mut keys: SigningKeys = serde_json::from_slice(bytes)?;
        for key in &keys.keys {
            key.verifying_key()?;
        }
        keys.keys.sort_by_key(|key| key.not_before);
        Ok(keys)
    }

    pub fn to_json(&self) -> String {
        // Plain strings and numbers: serialising them cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The key that signs at `now`: the newest whose `not_before` has passed.
    pub fn active(&self, now: SystemTime) -> Option<&SigningKey> {
        let now = unix_seconds(now);
        self.keys.iter().rev().find(|key| key.not_before <= now)
    }

    /// Whether the newest key is `period` old at `now`: a scheduled rotation is due.
    pub fn rotation_due(&self, now: SystemTime, period: Duration) -> bool {
        self.keys
            .last()
            .is_none_or(|newest| newest.not_before + period.as_secs() <= unix_seconds(now))
    }

    /// Adds a key that starts signing `activation` after `now`, once the runtimes have had
    /// time to load its public half. Returns its id.
    pub fn rotate(&mut self, now: SystemTime, activation: Duration) -> Result<String, KeysError> {
        let key = SigningKey::generate(now + activation)?;
        let kid = key.kid.clone();
        self.keys.push(key);
        Ok(kid)
    }

    /// Drops the keys that a newer one has replaced for longer than `grace` at `now`; whether
    /// any went.
    pub fn retire(&mut self, now: SystemTime, grace: Duration) -> bool {
        let now = unix_seconds(now);
        let before = self.keys.len();
        let replaced_until = self
            .keys
            .iter()
            .rev()
            .find(|key| key.not_before + grace.as_secs() <= now)
            .map(|key| key.not_before);
        if let Some(replaced_until) = replaced_until {
            self.keys.retain(|key| key.not_before >= replaced_until);
        }
        self.keys.len() != before
    }

    /// At `now`: rotates when `asked` or when the schedule's period is up, and retires what
    /// its grace no longer covers.
    pub fn maintain(
        &mut self,
        now: SystemTime,
        schedule: Schedule,
        asked: bool,
    ) -> Result<Maintained, KeysError> {
        let rotated = if asked || self.rotation_due(now, schedule.period) {
            Some(self.rotate(now, schedule.activation)?)
        } else {
            None
        };
        let retired = self.retire(now, schedule.grace());
        Ok(Maintained {
            changed: rotated.is_some() || retired,
            rotated,
        })
    }

    /// The public halves, for the runtimes.
    pub fn verifying_keys(&self) -> Result<JwkSet, KeysError> {
        Ok(JwkSet {
            keys: self
                .keys
                .iter()
                .map(SigningKey::verifying_key)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn a_generated_key_reads_back_and_its_id_is_its_thumbprint() {
        let keys = SigningKeys::first(at(0)).unwrap();
        let parsed = SigningKeys::parse(keys.to_json().as_bytes()).unwrap();
        assert_eq!(parsed, keys);
        let jwk = keys.keys[0].verifying_key().unwrap();
        assert_eq!(
            jwk.common.key_id.as_deref(),
            Some(keys.keys[0].kid.as_str())
        );
        let published = serde_json::to_value(keys.verifying_keys().unwrap()).unwrap();
        let public = &published["keys"][0];
        assert_eq!(public["kty"], "OKP");
        assert_eq!(public["crv"], "Ed25519");
        assert_eq!(public["alg"], "EdDSA");
        assert!(public.get("d").is_none(), "no private part: {public}");
        assert_eq!(
            public["x"].as_str().unwrap().len(),
            43,
            "32 bytes, base64url"
        );
    }

    #[test]
    fn a_key_from_openssl_is_accepted() {
        // `openssl genpkey -algorithm ed25519`, RFC 8032's first test vector's seed.
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
                   -----END PRIVATE KEY-----\n";
        let jwk = public_jwk(pem, "").unwrap();
        let jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(params) = &jwk.algorithm else {
            panic!("{jwk:?}");
        };
        // RFC 8032, 7.1, TEST 1: the public key of that seed.
        assert_eq!(params.x, "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
    }

    #[test]
    fn a_key_whose_id_is_not_its_thumbprint_is_refused() {
        let mut keys = SigningKeys::first(at(0)).unwrap();
        keys.keys[0].kid = "chosen-by-hand".into();
        let error = SigningKeys::parse(keys.to_json().as_bytes()).unwrap_err();
        assert!(matches!(error, KeysError::KeyId { .. }), "{error}");
    }

    #[test]
    fn a_rotated_key_is_published_at_once_and_signs_after_the_activation_delay() {
        let mut keys = SigningKeys::first(at(0)).unwrap();
        let old = keys.keys[0].kid.clone();
        let new = keys.rotate(at(100), Duration::from_secs(120)).unwrap();
        assert_eq!(keys.verifying_keys().unwrap().keys.len(), 2);
        assert_eq!(keys.active(at(219)).unwrap().kid, old);
        assert_eq!(keys.active(at(220)).unwrap().kid, new);
    }

    #[test]
    fn a_replaced_key_verifies_through_the_grace_period_then_goes() {
        let mut keys = SigningKeys::first(at(0)).unwrap();
        let new = keys.rotate(at(100), Duration::from_secs(120)).unwrap();
        let grace = Duration::from_secs(60);
        assert!(
            !keys.retire(at(219), grace),
            "the new key does not sign yet"
        );
        assert!(
            !keys.retire(at(279), grace),
            "JWTs the old key signed may be in flight"
        );
        assert!(keys.retire(at(280), grace));
        assert_eq!(keys.keys.len(), 1);
        assert_eq!(keys.keys[0].kid, new);
        assert!(
            !keys.retire(at(10_000), grace),
            "the signing key always stays"
        );
    }

    #[test]
    fn a_pending_key_survives_retirement() {
        let mut keys = SigningKeys::first(at(0)).unwrap();
        keys.rotate(at(100), Duration::from_secs(120)).unwrap();
        keys.rotate(at(1_000), Duration::from_secs(120)).unwrap();
        keys.retire(at(1_050), Duration::from_secs(60));
        let not_before: Vec<u64> = keys.keys.iter().map(|k| k.not_before % 10_000).collect();
        assert_eq!(
            not_before,
            [220, 1_120],
            "the signing key and the pending one"
        );
    }

    #[test]
    fn a_rotation_is_due_a_period_after_the_newest_key() {
        let mut keys = SigningKeys::first(at(0)).unwrap();
        let day = Duration::from_secs(86_400);
        assert!(!keys.rotation_due(at(86_399), day));
        assert!(keys.rotation_due(at(86_400), day));
        keys.rotate(at(86_400), Duration::from_secs(120)).unwrap();
        assert!(!keys.rotation_due(at(86_401), day));
        assert!(SigningKeys::default().rotation_due(at(0), day));
    }

    #[test]
    fn maintenance_rotates_when_asked_or_due_and_retires_after_the_grace() {
        let schedule = Schedule {
            period: Duration::from_secs(86_400),
            activation: Duration::from_secs(60),
        };
        assert_eq!(schedule.grace(), Duration::from_secs(75));
        let mut keys = SigningKeys::first(at(0)).unwrap();
        assert_eq!(
            keys.maintain(at(10), schedule, false).unwrap(),
            Maintained::default()
        );
        let asked = keys.maintain(at(20), schedule, true).unwrap();
        assert!(asked.changed && asked.rotated.is_some());
        assert_eq!(keys.keys.len(), 2);
        // The new key signs from 80 s; the old one verifies until 155 s.
        assert!(!keys.maintain(at(154), schedule, false).unwrap().changed);
        let retired = keys.maintain(at(155), schedule, false).unwrap();
        assert_eq!((retired.changed, retired.rotated), (true, None));
        assert_eq!(keys.keys[0].kid, asked.rotated.unwrap());
        assert!(
            keys.maintain(at(80 + 86_400), schedule, false)
                .unwrap()
                .rotated
                .is_some(),
            "a period after the new key started"
        );
    }

    #[test]
    fn the_private_key_stays_out_of_debug_output() {
        let keys = SigningKeys::first(at(0)).unwrap();
        let debug = format!("{keys:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        let seed_line = keys.keys[0].private_key.lines().nth(1).unwrap();
        assert!(!debug.contains(&seed_line[20..]), "{debug}");
    }
}
