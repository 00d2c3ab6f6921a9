//! The token record: what the proxy knows of an issued token. One Secret per AccessToken in
//! the gateway namespace holds it under `record.json`; local mode lists the same records in the
//! proxy's YAML config.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::TokenLimits;

/// An issued token as the proxy sees it: its hash, its scope and whether it still counts.
//
// Unknown fields are accepted on purpose: a proxy that refused records written by a newer
// operator would lock every client out during a rolling upgrade.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// Stable identifier; the only name logs and metrics use for the token.
    pub id: String,
    /// The AccessToken it was issued for, as `namespace/name`.
    pub name: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
    /// Model version ids the token may call.
    pub models: Vec<String>,
    /// Instant from which the token is refused; `null` when it never expires.
    pub expires_at: Option<Timestamp>,
    /// A revoked token is refused whatever its expiry.
    pub revoked: bool,
    /// The token's limits (the AccessToken's `spec.limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TokenLimits>,
}

/// Why bytes are not a usable token record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("token record is not valid JSON of the record format: {0}")]
    Json(#[from] serde_json::Error),
    #[error("token record {id:?} has a sha256 that is not 64 lower-case hex digits")]
    BadDigest { id: String },
    #[error("token record has an empty id")]
    EmptyId,
}

impl TokenRecord {
    /// Parses and checks a record, e.g. the `record.json` of a record Secret.
    pub fn from_json(bytes: &[u8]) -> Result<TokenRecord, RecordError> {
        let record: TokenRecord = serde_json::from_slice(bytes)?;
        record.validate()?;
        Ok(record)
    }

    /// The record's JSON, as stored under `record.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a token record always serialises")
    }

    /// Checks what serde cannot: a usable id and a well-formed digest.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.id.is_empty() {
            return Err(RecordError::EmptyId);
        }
        let is_digest = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_digest {
            return Err(RecordError::BadDigest {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Whether the token is past its expiry at `now`. Expiry is inclusive: at `expiresAt` the
    /// token is already refused.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|expires_at| now >= expires_at)
    }

    /// Whether the token may call model version `model_version_id`.
    pub fn allows_model(&self, model_version_id: &str) -> bool {
        self.models.iter().any(|m| m == model_version_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Token;

    fn record(expires_at: Option<&str>) -> TokenRecord {
        TokenRecord {
            id: "3b4f7c1e".into(),
            name: "demo/chat-token".into(),
            sha256: Token::generate().unwrap().sha256_hex(),
            models: vec!["llama-chat".into(), "minilm".into()],
            expires_at: expires_at.map(|t| t.parse().unwrap()),
            revoked: false,
            limits: None,
        }
    }

    #[test]
    fn record_json_round_trips_in_the_documented_shape() {
        let record = record(Some("2027-01-01T00:00:00Z"));
        let json = record.to_json();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "id": "3b4f7c1e",
                "name": "demo/chat-token",
                "sha256": record.sha256,
                "models": ["llama-chat", "minilm"],
                "expiresAt": "2027-01-01T00:00:00Z",
                "revoked": false
            })
        );
        assert_eq!(TokenRecord::from_json(json.as_bytes()).unwrap(), record);
    }

    #[test]
    fn a_record_without_expiry_serialises_expires_at_as_null() {
        let json = record(None).to_json();
        assert!(json.contains(r#""expiresAt":null"#), "{json}");
    }

    #[test]
    fn expiry_is_inclusive_of_the_expiry_instant() {
        let record = record(Some("2027-01-01T00:00:00Z"));
        assert!(!record.is_expired_at("2026-12-31T23:59:59.999Z".parse().unwrap()));
        assert!(record.is_expired_at("2027-01-01T00:00:00Z".parse().unwrap()));
        assert!(record.is_expired_at("2030-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn a_record_without_expiry_never_expires() {
        assert!(!record(None).is_expired_at("9999-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn records_accept_rfc3339_offsets_and_fields_from_newer_writers() {
        let json = format!(
            r#"{{"id":"t1","name":"a/b","sha256":"{}","models":["m"],"expiresAt":"2027-01-01T02:00:00+02:00","revoked":true,"note":"new"}}"#,
            "ab".repeat(32)
        );
        let parsed = TokenRecord::from_json(json.as_bytes()).unwrap();
        assert_eq!(
            parsed.expires_at,
            Some("2027-01-01T00:00:00Z".parse().unwrap())
        );
        assert!(parsed.revoked);
    }

    #[test]
    fn malformed_records_are_refused() {
        let digest = "ab".repeat(32);
        let cases = [
            r#"{"id":"t1"}"#.to_owned(),
            format!(r#"{{"id":"","name":"a/b","sha256":"{digest}","models":[],"expiresAt":null,"revoked":false}}"#),
            r#"{"id":"t1","name":"a/b","sha256":"ABCD","models":[],"expiresAt":null,"revoked":false}"#.to_owned(),
            format!(r#"{{"id":"t1","name":"a/b","sha256":"{}","models":[],"expiresAt":null,"revoked":false}}"#, "AB".repeat(32)),
            format!(r#"{{"id":"t1","name":"a/b","sha256":"{digest}","models":[],"expiresAt":"tomorrow","revoked":false}}"#),
        ];
        for case in cases {
            assert!(TokenRecord::from_json(case.as_bytes()).is_err(), "{case}");
        }
    }

    #[test]
    fn scope_is_an_exact_match_on_the_model_version_id() {
        let record = record(None);
        assert!(record.allows_model("minilm"));
        assert!(!record.allows_model("minilm-v2"));
        assert!(!record.allows_model("MINILM"));
    }
}
