//! Names that more than one part of infergate relies on. Changing one is a breaking change of
//! the contract in docs/architecture.md.

/// API group of both custom resources.
pub const API_GROUP: &str = "infergate.dev";

/// Namespace of the proxy and of the token records when nothing else is configured.
pub const DEFAULT_GATEWAY_NAMESPACE: &str = "infergate-system";

/// Label that marks a Secret as a token record. The proxy watches only Secrets carrying it.
pub const TOKEN_RECORD_LABEL: &str = "infergate.dev/token-record";

/// Value of [`TOKEN_RECORD_LABEL`] on a token record Secret.
pub const TOKEN_RECORD_LABEL_VALUE: &str = "true";

/// Data key of a token record Secret; its value is the record's JSON.
pub const TOKEN_RECORD_KEY: &str = "record.json";

/// Data key of the user's Secret that holds the plaintext token.
pub const TOKEN_SECRET_KEY: &str = "token";

/// Request header that carries a client's deadline in seconds, and the remaining time upstream.
pub const REQUEST_TIMEOUT_HEADER: &str = "OICM-Request-Timeout";

/// Path prefix under which the proxy exposes a model version's runtime.
pub fn model_endpoint(model_version_id: &str) -> String {
    format!("/models/{model_version_id}/proxy/v1")
}

/// Name of the Service (and so of the EndpointSlices' `kubernetes.io/service-name` label) that
/// the operator gives a ModelDeployment's runtime pods, in the ModelDeployment's namespace.
pub fn runtime_service_name(model_deployment_name: &str) -> String {
    model_deployment_name.to_owned()
}

/// Name of the ConfigMap of client code the operator publishes for a ModelDeployment, in its
/// namespace.
pub fn snippets_config_map(model_deployment_name: &str) -> String {
    format!("{model_deployment_name}-snippets")
}

/// Secret in the gateway namespace holding the proxy's signing keys under
/// [`SIGNING_KEYS_KEY`] (the JSON `internal-token` reads). The operator writes it; only the
/// proxy's pods mount it.
pub const SIGNING_KEYS_SECRET: &str = "infergate-internal-signing-keys";

/// Data key of [`SIGNING_KEYS_SECRET`].
pub const SIGNING_KEYS_KEY: &str = "signing.json";

/// Annotation on [`SIGNING_KEYS_SECRET`]: setting it to a new value asks the operator for a
/// rotation now (`kubectl annotate --overwrite secret ... infergate.dev/rotate=$(date +%s)`).
pub const ROTATE_ANNOTATION: &str = "infergate.dev/rotate";

/// ConfigMap, in each namespace with a ModelDeployment, of the signing keys' public halves (a
/// JWK set under [`VERIFYING_KEYS_KEY`]); builtin runtime pods mount it.
pub const VERIFYING_KEYS_CONFIG_MAP: &str = "infergate-internal-keys";

/// Data key of [`VERIFYING_KEYS_CONFIG_MAP`].
pub const VERIFYING_KEYS_KEY: &str = "jwks.json";

/// On an AccessToken that `infergate token rotate` replaced: the name of the one replacing it.
pub const ROTATED_TO_ANNOTATION: &str = "infergate.dev/rotated-to";

/// On the AccessToken `infergate token rotate` made: the name of the one it replaces.
pub const ROTATED_FROM_ANNOTATION: &str = "infergate.dev/rotated-from";

/// Label of the AccessTokens `infergate token` makes: the name of the first of a line of
/// rotations, after which its successors are named.
pub const TOKEN_FAMILY_LABEL: &str = "infergate.dev/token-family";
