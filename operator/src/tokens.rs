//! What an AccessToken should become, as pure functions: the token record the proxy reads (in
//! the gateway namespace), the user's Secret with the plaintext (issued once), and the phase
//! `kubectl get at` shows.

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

/// Why an AccessToken cannot be issued as written; shown in its `Invalid` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("spec.models names ModelDeployments that do not exist in this namespace: {}", .0.join(", "))]
    UnknownModels(Vec<String>),
    #[error("spec.tokenHash must be sha256: followed by 64 lower-case hex digits")]
    BadTokenHash,
    #[error("the AccessToken has no UID or namespace yet")]
    Unstored,
}

/// The model version ids of the ModelDeployments `spec.models` names, in the token's namespace.
pub fn resolve_models(
    token: &AccessToken,
    deployments: &[ModelDeployment],
) -> Result<Vec<String>, IssueError> {
    let namespace = token.namespace();
    let mut ids = Vec::new();
    let mut unknown = Vec::new();
    for name in &token.spec.models {
        let found = deployments
            .iter()
            .find(|d| d.namespace() == namespace && &d.name_any() == name);
        match found.and_then(ModelDeployment::model_version_id) {
            Some(id) => ids.push(id),
            None => unknown.push(name.clone()),
        }
    }
    if unknown.is_empty() {
        Ok(ids)
    } else {
        Err(IssueError::UnknownModels(unknown))
    }
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

/// The record of `token`, issued at `issued_at` for the resolved `models`.
pub fn record(
    token: &AccessToken,
    sha256: String,
    models: Vec<String>,
    issued_at: Timestamp,
) -> Result<TokenRecord, IssueError> {
    let (uid, namespace) = (
        token.uid().ok_or(IssueError::Unstored)?,
        token.namespace().ok_or(IssueError::Unstored)?,
    );
    Ok(TokenRecord {
        id: uid,
        name: format!("{namespace}/{}", token.name_any()),
        sha256,
        models,
        expires_at: token.spec.expiry(issued_at),
        revoked: token.spec.revoked,
    })
}

/// The Secret holding `record` in the gateway namespace, named after the token's UID so that
/// tokens of the same name in two namespaces never collide.
pub fn record_secret(token: &AccessToken, record: &TokenRecord, gateway_namespace: &str) -> Secret {
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
            name: Some(format!("token-record-{}", record.id)),
            namespace: Some(gateway_namespace.to_owned()),
            labels: Some(labels),
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
            Ok(vec!["minilm-v1".into(), "uid-llama".into()])
        );
        assert_eq!(
            resolve_models(&token, &deployments[..1]),
            Err(IssueError::UnknownModels(vec!["llama".into()]))
        );
    }

    #[test]
    fn the_record_carries_the_ids_expiry_from_ttl_and_revocation() {
        let token =
            access_token(serde_json::json!({"models": ["minilm"], "ttl": "24h", "revoked": true}));
        let record = record(
            &token,
            "ab".repeat(32),
            vec!["minilm-v1".into()],
            at("2026-11-25T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            (record.id.as_str(), record.name.as_str()),
            ("7f1e", "demo/chat-app")
        );
        assert_eq!(record.expires_at, Some(at("2026-11-26T00:00:00Z")));
        assert!(record.revoked);
        let secret = record_secret(&token, &record, "infergate-system");
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
        let issued = record(
            &token,
            "ab".repeat(32),
            vec!["m".into()],
            at("2026-11-25T00:00:00Z"),
        )
        .unwrap();
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
