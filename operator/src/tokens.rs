//! What an AccessToken should become, as pure functions: the token record the proxy reads (in
//! the gateway namespace), the user's Secret with the plaintext (issued once), and the phase
//! `kubectl get at` shows.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use crds::names::{
    TOKEN_RECORD_KEY, TOKEN_RECORD_LABEL, TOKEN_RECORD_LABEL_VALUE, TOKEN_SECRET_KEY,
};
use crds::{AccessToken, AccessTokenPhase, ModelDeployment, Token, TokenRecord};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

/// Labels on a token record naming its AccessToken, since a record lives in another namespace
/// and cannot be owned by it.
pub const ACCESS_TOKEN_NAMESPACE_LABEL: &str = "infergate.dev/access-token-namespace";
pub const ACCESS_TOKEN_NAME_LABEL: &str = "infergate.dev/access-token-name";

/// Why an AccessToken cannot be issued as written; shown in its conditions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("spec.tokenHash must be sha256: followed by 64 lower-case hex digits")]
    BadTokenHash,
    #[error(
        "Secret {0} already exists and does not belong to this AccessToken; set spec.secretName to a free name"
    )]
    SecretTaken(String),
    #[error("the AccessToken has no UID or namespace yet")]
    Unstored,
}

impl IssueError {
    /// `reason` of the condition that reports this error.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::BadTokenHash => "InvalidTokenHash",
            IssueError::SecretTaken(_) => "SecretTaken",
            IssueError::Unstored => "NotStored",
        }
    }
}

/// What `spec.models` names, resolved in the token's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedModels {
    /// Model version ids of the ModelDeployments that exist.
    pub ids: Vec<String>,
    /// Names with no ModelDeployment (yet): the token is issued without them, and gains them
    /// when they appear.
    pub unknown: Vec<String>,
}

/// The model version ids of the ModelDeployments `spec.models` names, in the token's namespace.
pub fn resolve_models<D: Borrow<ModelDeployment>>(
    token: &AccessToken,
    deployments: &[D],
) -> ResolvedModels {
    let namespace = token.namespace();
    let mut resolved = ResolvedModels::default();
    for name in &token.spec.models {
        let found = deployments
            .iter()
            .map(Borrow::borrow)
            .find(|d| d.namespace() == namespace && &d.name_any() == name);
        match found.and_then(ModelDeployment::model_version_id) {
            Some(id) => resolved.ids.push(id),
            None => resolved.unknown.push(name.clone()),
        }
    }
    resolved
}

/// The digest of a bring-your-own token (`spec.tokenHash`), as records store it.
pub fn own_token_digest(token: &AccessToken) -> Result<Option<String>, IssueError> {
    let Some(hash) = &token.spec.token_hash else {
        return Ok(None);
    };
    let digest = hash
        .strip_prefix("sha256:")
        .ok_or(IssueError::BadTokenHash)?;
    let valid = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        Ok(Some(digest.to_owned()))
    } else {
        Err(IssueError::BadTokenHash)
    }
}

/// What issuing a token leaves that later reconciles need, kept as the record Secret's data and
/// annotations so that the record alone says whether (and when) a token was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuance {
    pub sha256: String,
    /// `igt_` and four characters; none for a bring-your-own token, whose plaintext we never see.
    pub prefix: Option<String>,
    pub issued_at: Timestamp,
}

pub const ISSUED_AT_ANNOTATION: &str = "infergate.dev/issued-at";
pub const TOKEN_PREFIX_ANNOTATION: &str = "infergate.dev/token-prefix";

impl Issuance {
    /// A freshly generated token.
    pub fn of_token(token: &Token, issued_at: Timestamp) -> Issuance {
        Issuance {
            sha256: token.sha256_hex(),
            prefix: Some(token.display_prefix().to_owned()),
            issued_at: whole_second(issued_at),
        }
    }

    /// A token brought by its owner, known only by its digest.
    pub fn of_digest(sha256: String, issued_at: Timestamp) -> Issuance {
        Issuance {
            sha256,
            prefix: None,
            issued_at: whole_second(issued_at),
        }
    }

    /// What an existing record Secret says was issued; `None` when it is not a complete record
    /// (then the token is issued again from the user's Secret or `spec.tokenHash`).
    pub fn from_record_secret(secret: &Secret) -> Option<Issuance> {
        let data = secret.data.as_ref()?.get(TOKEN_RECORD_KEY)?;
        let record = TokenRecord::from_json(&data.0).ok()?;
        let annotations = secret.annotations();
        Some(Issuance {
            sha256: record.sha256,
            prefix: annotations.get(TOKEN_PREFIX_ANNOTATION).cloned(),
            issued_at: annotations.get(ISSUED_AT_ANNOTATION)?.parse().ok()?,
        })
    }
}

/// `issuedAt` (and so a ttl's `expiresAt`) in whole seconds: the precision of the status fields
/// that show them, so the record, the annotation and the status always agree.
fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// Name of the record Secret of the AccessToken with `uid`: by UID, so that tokens of the same
/// name in two namespaces never collide.
pub fn record_secret_name(uid: &str) -> String {
    format!("token-record-{uid}")
}

/// The record of `token` as `issuance` issued it, for the resolved `models`.
pub fn record(
    token: &AccessToken,
    issuance: &Issuance,
    models: Vec<String>,
) -> Result<TokenRecord, IssueError> {
    let (uid, namespace) = (
        token.uid().ok_or(IssueError::Unstored)?,
        token.namespace().ok_or(IssueError::Unstored)?,
    );
    Ok(TokenRecord {
        id: uid,
        name: format!("{namespace}/{}", token.name_any()),
        sha256: issuance.sha256.clone(),
        models,
        expires_at: token.spec.expiry(issuance.issued_at),
        revoked: token.spec.revoked,
        limits: token.spec.limits,
    })
}

/// The Secret holding `record` in the gateway namespace.
pub fn record_secret(
    token: &AccessToken,
    record: &TokenRecord,
    issuance: &Issuance,
    gateway_namespace: &str,
) -> Secret {
    let labels: BTreeMap<String, String> = [
        (TOKEN_RECORD_LABEL, TOKEN_RECORD_LABEL_VALUE.to_owned()),
        (
            ACCESS_TOKEN_NAMESPACE_LABEL,
            token.namespace().unwrap_or_default(),
        ),
        (ACCESS_TOKEN_NAME_LABEL, token.name_any()),
        (
            "app.kubernetes.io/managed-by",
            "infergate-operator".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(record_secret_name(&record.id)),
            namespace: Some(gateway_namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(
                [(
                    ISSUED_AT_ANNOTATION.to_owned(),
                    issuance.issued_at.to_string(),
                )]
                .into_iter()
                .chain(
                    issuance
                        .prefix
                        .clone()
                        .map(|p| (TOKEN_PREFIX_ANNOTATION.to_owned(), p)),
                )
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                TOKEN_RECORD_KEY.to_owned(),
                ByteString(record.to_json().into_bytes()),
            )]
            .into(),
        ),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// Name of the user's Secret: `spec.secretName`, or `<name>-token`.
pub fn user_secret_name(token: &AccessToken) -> String {
    token
        .spec
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-token", token.name_any()))
}

/// The user's Secret with the plaintext, owned by the AccessToken so it goes with it.
pub fn user_secret(token: &AccessToken, plaintext: &Token) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(user_secret_name(token)),
            namespace: token.namespace(),
            owner_references: token.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                TOKEN_SECRET_KEY.to_owned(),
                ByteString(plaintext.expose_secret().as_bytes().to_vec()),
            )]
            .into(),
        ),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// The phase at `now`: revocation wins over expiry, which wins over being active.
pub fn phase(
    token: &AccessToken,
    issued: Result<&TokenRecord, &IssueError>,
    now: Timestamp,
) -> AccessTokenPhase {
    match issued {
        Err(_) => AccessTokenPhase::Invalid,
        Ok(_) if token.spec.revoked => AccessTokenPhase::Revoked,
        Ok(record) if record.is_expired_at(now) => AccessTokenPhase::Expired,
        Ok(_) => AccessTokenPhase::Active,
    }
}

#[cfg(test)]
mod tests {
    use crds::AccessTokenSpec;

    use super::*;

    fn access_token(spec: serde_json::Value) -> AccessToken {
        let spec: AccessTokenSpec = serde_json::from_value(spec).unwrap();
        let mut token = AccessToken::new("chat-app", spec);
        token.metadata.namespace = Some("demo".into());
        token.metadata.uid = Some("7f1e".into());
        token
    }

    fn model(name: &str, id: Option<&str>) -> ModelDeployment {
        let spec = serde_json::from_value(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}, "modelVersionId": id})).unwrap();
        let mut md = ModelDeployment::new(name, spec);
        md.metadata.namespace = Some("demo".into());
        md.metadata.uid = Some(format!("uid-{name}"));
        md
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn models_resolve_to_their_version_ids_in_the_same_namespace() {
        let token = access_token(serde_json::json!({"models": ["minilm", "llama"]}));
        let mut elsewhere = model("llama", Some("llama-other"));
        elsewhere.metadata.namespace = Some("other".into());
        let deployments = [
            model("minilm", Some("minilm-v1")),
            model("llama", None),
            elsewhere,
        ];
        assert_eq!(
            resolve_models(&token, &deployments),
            ResolvedModels {
                ids: vec!["minilm-v1".into(), "uid-llama".into()],
                unknown: vec![]
            }
        );
        assert_eq!(
            resolve_models(&token, &deployments[..1]),
            ResolvedModels {
                ids: vec!["minilm-v1".into()],
                unknown: vec!["llama".into()]
            }
        );
    }

    #[test]
    fn the_record_carries_the_ids_expiry_from_ttl_and_revocation() {
        let token =
            access_token(serde_json::json!({"models": ["minilm"], "ttl": "24h", "revoked": true}));
        let issuance = Issuance {
            sha256: "ab".repeat(32),
            prefix: Some("igt_AbCd".into()),
            issued_at: at("2026-11-25T00:00:00Z"),
        };
        let record = record(&token, &issuance, vec!["minilm-v1".into()]).unwrap();
        assert_eq!(
            (record.id.as_str(), record.name.as_str()),
            ("7f1e", "demo/chat-app")
        );
        assert_eq!(record.expires_at, Some(at("2026-11-26T00:00:00Z")));
        assert!(record.revoked);
        let secret = record_secret(&token, &record, &issuance, "infergate-system");
        assert_eq!(
            Issuance::from_record_secret(&secret),
            Some(issuance),
            "a later reconcile reads back what was issued"
        );
        assert_eq!(
            secret.metadata.namespace.as_deref(),
            Some("infergate-system")
        );
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()[TOKEN_RECORD_LABEL],
            "true"
        );
        let stored = &secret.data.as_ref().unwrap()[TOKEN_RECORD_KEY].0;
        assert_eq!(TokenRecord::from_json(stored).unwrap(), record);
        assert!(
            secret.metadata.owner_references.is_none(),
            "a record in another namespace cannot be owned"
        );
    }

    #[test]
    fn a_bring_your_own_hash_is_checked_and_unprefixed() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let good = access_token(
            serde_json::json!({"models": ["m"], "tokenHash": format!("sha256:{digest}")}),
        );
        assert_eq!(own_token_digest(&good), Ok(Some(digest.to_owned())));
        let bad = access_token(serde_json::json!({"models": ["m"], "tokenHash": "md5:abc"}));
        assert_eq!(own_token_digest(&bad), Err(IssueError::BadTokenHash));
        assert_eq!(
            own_token_digest(&access_token(serde_json::json!({"models": ["m"]}))),
            Ok(None)
        );
    }

    #[test]
    fn the_user_secret_holds_the_plaintext_and_belongs_to_the_token() {
        let token =
            access_token(serde_json::json!({"models": ["m"], "secretName": "app-credentials"}));
        let plaintext = Token::generate().unwrap();
        let secret = user_secret(&token, &plaintext);
        assert_eq!(secret.metadata.name.as_deref(), Some("app-credentials"));
        assert_eq!(
            secret.data.as_ref().unwrap()[TOKEN_SECRET_KEY].0,
            plaintext.expose_secret().as_bytes()
        );
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].kind,
            "AccessToken"
        );
        assert_eq!(
            user_secret_name(&access_token(serde_json::json!({"models": ["m"]}))),
            "chat-app-token"
        );
    }

    #[test]
    fn phases_follow_revocation_then_expiry() {
        let token =
            access_token(serde_json::json!({"models": ["m"], "expiresAt": "2027-01-01T00:00:00Z"}));
        let issuance = Issuance {
            sha256: "ab".repeat(32),
            prefix: None,
            issued_at: at("2026-11-25T00:00:00Z"),
        };
        let issued = record(&token, &issuance, vec!["m".into()]).unwrap();
        assert_eq!(
            phase(&token, Ok(&issued), at("2026-12-01T00:00:00Z")),
            AccessTokenPhase::Active
        );
        assert_eq!(
            phase(&token, Ok(&issued), at("2027-01-01T00:00:00Z")),
            AccessTokenPhase::Expired
        );
        let revoked = access_token(serde_json::json!({"models": ["m"], "revoked": true}));
        assert_eq!(
            phase(&revoked, Ok(&issued), at("2030-01-01T00:00:00Z")),
            AccessTokenPhase::Revoked
        );
        assert_eq!(
            phase(
                &token,
                Err(&IssueError::BadTokenHash),
                at("2026-12-01T00:00:00Z")
            ),
            AccessTokenPhase::Invalid
        );
    }
}
