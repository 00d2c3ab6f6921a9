//! `AccessToken`: a secret token scoped to model versions, shown once, with expiry and
//! instant revocation.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of an access token.
// Clippy reads the repeated `type_ = ...` of the printcolumn arguments as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "infergate.dev",
    version = "v1alpha1",
    kind = "AccessToken",
    namespaced,
    status = "AccessTokenStatus",
    shortname = "at",
    category = "infergate",
    cel,
    doc = "A bearer token for the models named in spec.models, issued once into a Secret.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Models", type_ = "string", json_path = ".spec.models"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!(has(self.expiresAt) && has(self.ttl))").message("set at most one of expiresAt and ttl"),
    validation = Rule::new("!(has(self.tokenHash) && has(self.secretName))").message("secretName has no use with tokenHash: no plaintext is stored")
)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenSpec {
    /// Names of ModelDeployments in this namespace the token may call.
    #[schemars(
        length(min = 1, max = 256),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
        )
    )]
    pub models: Vec<String>,

    /// Instant from which the token is refused (RFC 3339). Exclusive with `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Lifetime counted from issue, e.g. `720h`. Exclusive with `expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("ttl must be a positive duration"))]
    pub ttl: Option<Duration>,

    /// `true` revokes the token; the proxy refuses it within a second.
    #[serde(default)]
    pub revoked: bool,

    /// Secret (in this namespace) that receives the plaintext token once; `<name>-token` when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: Option<String>,

    /// `sha256:<hex>` of a token you generated yourself; no plaintext is then stored anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tokenHash is immutable: create a new AccessToken to rotate"))]
    pub token_hash: Option<String>,

    /// What the token may use, as one limit across all proxy replicas; unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TokenLimits>,
}

/// Limits of one token. The proxies enforce each as one limit: with a shared store (Redis or
/// Valkey) the counts are global; without one, each of N proxy replicas enforces 1/N of it.
/// A request over a limit gets 429 with `Retry-After` and a code naming the limit.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TokenLimits {
    /// Requests per minute, as a steady rate (one every 60/N seconds) that may burst by one
    /// second's worth (N/60, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_minute: Option<u32>,
    /// Requests in progress at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub concurrent_requests: Option<u32>,
    /// Prompt and completion tokens of text generation per minute. A request is admitted while
    /// the token is within the limit and charged what it used when it ends, so one long answer
    /// can overdraw it: the next requests then wait until the debt is paid off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub tokens_per_minute: Option<u64>,
}

impl AccessTokenSpec {
    /// The instant the token stops working, given when it was issued.
    pub fn expiry(&self, issued_at: Timestamp) -> Option<Timestamp> {
        match (&self.expires_at, self.ttl) {
            (Some(at), _) => Some(at.0),
            (None, Some(ttl)) => Some(
                issued_at
                    .saturating_add(std::time::Duration::from(ttl))
                    .unwrap_or(Timestamp::MAX),
            ),
            (None, None) => None,
        }
    }
}

/// Lifecycle of a token as shown by `kubectl get at`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessTokenPhase {
    /// Issued and accepted by the proxy.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked by `spec.revoked`.
    Revoked,
    /// Cannot be issued as written (e.g. names a model that does not exist); see conditions.
    Invalid,
}

/// Observed state of an AccessToken.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AccessTokenPhase>,
    /// `igt_` and four characters: enough to recognise the token, never enough to use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Secret holding the plaintext token, when infergate generated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the token was used for, summed over every proxy replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    /// How the proxies enforce `spec.limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsStatus>,
}

/// How `spec.limits` is enforced, as the proxies report it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LimitsStatus {
    /// `Global` (a shared store counts for every replica) or `PerReplica` (no store: each
    /// replica enforces its share).
    pub enforcement: String,
    /// Proxy replicas counted.
    pub replicas: u32,
    /// What each replica admits with `PerReplica`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_replica: Option<ReplicaShare>,
    pub message: String,
}

/// One replica's share of a token's limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaShare {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<f64>,
}

/// A token's use as the proxies counted it, written by the operator while it changes (at most
/// once per `--usage-interval-seconds`). Counts start when the operator first reads the
/// proxies; what they count between its last write and a restart of the operator is lost.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    /// When a request with the token last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
    /// Requests that presented the token, answered or refused after it was accepted.
    #[serde(default)]
    pub requests: u64,
    /// `requests` by status class: `2xx`, `4xx`, `5xx`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests_by_class: BTreeMap<String, u64>,
    /// Work done, in the tasks' units: `inputs` (texts, rows), `prompt_tokens`,
    /// `completion_tokens`, `audio_seconds_in`, `audio_seconds_out`, `images`, `steps`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, f64>,
    /// When these figures were last added to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AccessTokenSpec {
        AccessTokenSpec {
            models: vec!["minilm".into()],
            expires_at: None,
            ttl: None,
            revoked: false,
            secret_name: None,
            token_hash: None,
            limits: None,
        }
    }

    #[test]
    fn expiry_comes_from_expires_at_or_ttl_counted_from_issue() {
        let issued: Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
        assert_eq!(spec().expiry(issued), None);

        let with_ttl = AccessTokenSpec {
            ttl: Some("720h".parse().unwrap()),
            ..spec()
        };
        assert_eq!(
            with_ttl.expiry(issued),
            Some("2026-12-25T12:00:00Z".parse().unwrap())
        );

        let at: Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
        let with_instant = AccessTokenSpec {
            expires_at: Some(Time(at)),
            ..spec()
        };
        assert_eq!(with_instant.expiry(issued), Some(at));
    }
}
