//! The proxy's YAML configuration file (docs/architecture.md, proxy file source): where to
//! listen, and the models and token records of the file source.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use crds::{Timeouts, TokenRecord};
use serde::Deserialize;

use crate::snapshot::{DEFAULT_MAX_BODY_BYTES, ModelSpec};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    metrics: Option<String>,
    threads: Option<usize>,
    #[serde(default)]
    models: Vec<ModelEntry>,
    #[serde(default)]
    tokens: Vec<TokenRecord>,
    /// Proxies serving these tokens side by side (behind one balancer): without a limits
    /// store each enforces 1/N of every token's limits.
    #[serde(default = "one", rename = "proxyReplicas")]
    proxy_replicas: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ModelEntry {
    id: String,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    timeouts: Timeouts,
    max_body_bytes: Option<u64>,
    /// Hold requests while the model has no endpoint (it is scaling up from zero) instead of
    /// refusing them.
    #[serde(default)]
    hold_when_idle: bool,
}

/// Process settings: read once at start; a reload that changes them logs that a restart is
/// needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub threads: usize,
}

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: ListenConfig,
    pub models: Vec<ModelSpec>,
    pub tokens: Vec<TokenRecord>,
    /// Proxies sharing per-token limits (`proxyReplicas`, default 1).
    pub proxy_replicas: usize,
}

/// Why a configuration file was refused; names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.to_string(),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = serde_yaml::from_str(text)?;
        let address = |value: Option<String>, default: &str, field: &str| {
            value
                .as_deref()
                .unwrap_or(default)
                .parse::<SocketAddr>()
                .map_err(|e| invalid(field, e))
        };
        let threads = match file.threads {
            Some(0) => return Err(invalid("threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        let listen = ListenConfig {
            listen: address(file.listen, "127.0.0.1:8080", "listen")?,
            metrics: address(file.metrics, "127.0.0.1:9090", "metrics")?,
            threads,
        };

        let mut ids = HashSet::new();
        let mut models = Vec::with_capacity(file.models.len());
        for (i, entry) in file.models.into_iter().enumerate() {
            let field = |name: &str| format!("models[{i}].{name}");
            if crate::request::parse_model_path(&format!("/models/{}/proxy", entry.id)).is_none() {
                return Err(invalid(
                    field("id"),
                    "must match [A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?",
                ));
            }
            if !ids.insert(entry.id.clone()) {
                return Err(invalid(
                    field("id"),
                    format!("duplicate model id {:?}", entry.id),
                ));
            }
            let endpoints = entry
                .endpoints
                .iter()
                .map(|e| {
                    e.parse::<SocketAddr>()
                        .map_err(|err| invalid(field("endpoints"), format!("{e:?}: {err}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let timeouts = entry
                .timeouts
                .resolve()
                .map_err(|e| invalid(field("timeouts"), e))?;
            let max_body_bytes = entry.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
            models.push(ModelSpec {
                id: entry.id,
                timeouts,
                max_body_bytes,
                endpoints,
                hold_when_idle: entry.hold_when_idle,
            });
        }

        let mut digests = HashSet::new();
        for (i, record) in file.tokens.iter().enumerate() {
            record
                .validate()
                .map_err(|e| invalid(format!("tokens[{i}]"), e))?;
            if !digests.insert(record.sha256.as_str()) {
                return Err(invalid(
                    format!("tokens[{i}].sha256"),
                    format!("same token as another record (id {:?})", record.id),
                ));
            }
        }
        if file.proxy_replicas == 0 {
            return Err(invalid("proxyReplicas", "must be at least 1"));
        }
        Ok(Config {
            listen,
            models,
            tokens: file.tokens,
            proxy_replicas: file.proxy_replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_design_example_parses() {
        let text = format!(
            r#"
listen: 127.0.0.1:8080
metrics: 127.0.0.1:9090
threads: 2
models:
  - id: minilm
    endpoints: ["127.0.0.1:9001"]
    timeouts: {{default: 120s, max: 600s}}
tokens:
  - {{id: t1, name: demo/t1, sha256: "{DIGEST}", models: [minilm], expiresAt: null, revoked: false}}
"#
        );
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.listen.threads, 2);
        assert_eq!(
            config.models[0].endpoints,
            vec!["127.0.0.1:9001".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(config.models[0].timeouts.max, Duration::from_secs(600));
        assert_eq!(config.models[0].max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(config.tokens[0].id, "t1");
    }

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_at_fault() {
        assert!(error_of("listen: nowhere").starts_with("listen:"));
        assert!(error_of("threads: 0").starts_with("threads:"));
        assert!(
            error_of("models: [{id: m, endpoints: [localhost]}]")
                .starts_with("models[0].endpoints:")
        );
        assert!(
            error_of("models: [{id: m, timeouts: {default: 5m, max: 1m}}]")
                .starts_with("models[0].timeouts:")
        );
        assert!(error_of("models: [{id: m}, {id: m}]").contains("duplicate model id"));
        assert!(error_of("models: [{id: 'a/b'}]").starts_with("models[0].id:"));
        let bad_digest = "tokens: [{id: t, name: a/b, sha256: abc, models: [], expiresAt: null, revoked: false}]";
        assert!(error_of(bad_digest).starts_with("tokens[0]:"));
    }

    #[test]
    fn unknown_keys_are_refused_rather_than_ignored() {
        assert!(error_of("listn: 127.0.0.1:1").contains("unknown field `listn`"));
        assert!(error_of("models: [{id: m, endpoint: []}]").contains("unknown field `endpoint`"));
    }

    #[test]
    fn the_same_token_twice_is_refused() {
        let record = format!(
            r#"{{id: t, name: a/b, sha256: "{DIGEST}", models: [], expiresAt: null, revoked: false}}"#
        );
        assert!(
            error_of(&format!("tokens: [{record}, {record}]"))
                .contains("same token as another record")
        );
    }
}
