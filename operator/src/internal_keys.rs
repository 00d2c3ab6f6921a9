//! The proxy's signing keys in a cluster. The private keys live in one Secret in the gateway
//! namespace, which only the proxy's pods mount; their public halves go to a ConfigMap in every
//! namespace with a ModelDeployment, which builtin runtime pods mount. The leading operator
//! creates the first key, replaces it on a schedule and when the Secret's rotate annotation
//! changes, and retires a replaced key once no JWT it signed can still be valid. The kubelet
//! refreshes mounted Secrets and ConfigMaps in place and both binaries re-read their file, so a
//! rotation restarts nothing; the schedule's activation delay covers the kubelet's refresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crds::names::{
    ROTATE_ANNOTATION, SIGNING_KEYS_KEY, SIGNING_KEYS_SECRET, VERIFYING_KEYS_CONFIG_MAP,
    VERIFYING_KEYS_KEY,
};
use internal_token::{Schedule, SigningKeys};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use crate::apply::apply_if_changed;
use crate::controller::{Context, Error};

/// Annotation on the signing Secret: the value of [`ROTATE_ANNOTATION`] last acted on, so that
/// one request makes one rotation.
pub const ROTATED_FOR_ANNOTATION: &str = "infergate.dev/rotated-for";

/// How often the leader looks at the Secret: the delay of a rotation asked for, and the
/// precision of scheduled rotations and retirements.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The public keys as last read or written, and where they have been published.
#[derive(Debug, Default)]
pub struct PublicKeys {
    /// The JWK set's JSON; `None` until the Secret has been read.
    jwks: Mutex<Option<String>>,
    /// The JWK set each namespace's ConfigMap was last written with.
    published: Mutex<HashMap<String, String>>,
}

impl PublicKeys {
    fn current(&self) -> Option<String> {
        self.jwks.lock().expect("jwks lock").clone()
    }
}

/// The ConfigMap of public keys that runtime pods in `namespace` mount.
pub fn verifying_keys_config_map(namespace: &str, jwks: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(VERIFYING_KEYS_CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "infergate-operator".to_owned(),
                ),
                (
                    "app.kubernetes.io/name".to_owned(),
                    "infergate-internal-keys".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            VERIFYING_KEYS_KEY.to_owned(),
            jwks.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// How far `publish` trusts its memory of what each namespace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Skip a namespace this operator already wrote these keys to: the key loop, every 2 s.
    Remembered,
    /// Read the ConfigMap (one GET), so that one deleted by hand comes back: a ModelDeployment's
    /// reconcile.
    Live,
}

/// Writes the public keys to `namespace`'s ConfigMap unless it already holds them. Before the
/// Secret has been read there is nothing to write: the key loop publishes to every namespace
/// with a ModelDeployment once it has.
pub async fn publish(ctx: &Context, namespace: &str, check: Check) -> Result<(), Error> {
    let Some(jwks) = ctx.public_keys.current() else {
        return Ok(());
    };
    let remembered = ctx
        .public_keys
        .published
        .lock()
        .expect("published lock")
        .get(namespace)
        == Some(&jwks);
    if remembered && check == Check::Remembered {
        return Ok(());
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    apply_if_changed(&config_maps, verifying_keys_config_map(namespace, &jwks)).await?;
    ctx.public_keys
        .published
        .lock()
        .expect("published lock")
        .insert(namespace.to_owned(), jwks);
    Ok(())
}

/// Keeps the keys rotated and published while this replica leads.
pub async fn maintain(ctx: Arc<Context>, schedule: Schedule) {
    loop {
        if let Err(error) = maintain_once(&ctx, schedule, SystemTime::now()).await {
            ctx.metrics.failed("internal-keys", error.kind());
            tracing::warn!(%error, "maintaining the internal signing keys failed; retrying");
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

/// One look at the Secret: created when missing, rotated when due or asked, retired keys
/// dropped; the public keys published first, so no runtime meets a key it has not loaded.
async fn maintain_once(ctx: &Context, schedule: Schedule, now: SystemTime) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.gateway_namespace);
    let Some(mut secret) = secrets.get_opt(SIGNING_KEYS_SECRET).await? else {
        let keys = SigningKeys::first(now)?;
        // A create, not an apply: if another writer made the Secret meanwhile, theirs stands
        // and the next look reads it.
        secrets
            .create(&PostParams::default(), &signing_keys_secret(ctx, &keys))
            .await?;
        tracing::info!(secret = SIGNING_KEYS_SECRET, kid = %keys.keys[0].kid, "created the internal signing key");
        return Ok(());
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|data| data.get(SIGNING_KEYS_KEY))
        .ok_or(Error::SigningKeysMissing)?;
    let mut keys = SigningKeys::parse(&data.0)?;
    let requested = secret.annotations().get(ROTATE_ANNOTATION).cloned();
    let asked = requested.is_some()
        && requested != secret.annotations().get(ROTATED_FOR_ANNOTATION).cloned();
    let maintained = keys.maintain(now, schedule, asked)?;

    *ctx.public_keys.jwks.lock().expect("jwks lock") =
        Some(serde_json::to_string(&keys.verifying_keys()?).expect("a JWK set serializes"));
    let namespaces: std::collections::BTreeSet<String> = ctx
        .models
        .state()
        .iter()
        .filter_map(|md| md.namespace())
        .collect();
    for namespace in &namespaces {
        publish(ctx, namespace, Check::Remembered).await?;
    }

    if maintained.changed || asked {
        secret.data.get_or_insert_default().insert(
            SIGNING_KEYS_KEY.to_owned(),
            ByteString(keys.to_json().into_bytes()),
        );
        if let Some(requested) = requested {
            secret
                .annotations_mut()
                .insert(ROTATED_FOR_ANNOTATION.to_owned(), requested);
        }
        // A replace carries the resourceVersion read above: a concurrent write makes it fail,
        // and the next look starts again from what is there.
        secrets
            .replace(SIGNING_KEYS_SECRET, &PostParams::default(), &secret)
            .await?;
        match &maintained.rotated {
            Some(kid) => {
                tracing::info!(%kid, activation = ?schedule.activation, asked, "internal signing key rotated")
            }
            None => tracing::info!("replaced internal signing key retired"),
        }
    }
    Ok(())
}

fn signing_keys_secret(ctx: &Context, keys: &SigningKeys) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SIGNING_KEYS_SECRET.to_owned()),
            namespace: Some(ctx.config.gateway_namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "infergate-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            SIGNING_KEYS_KEY.to_owned(),
            ByteString(keys.to_json().into_bytes()),
        )])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_keys_config_map_holds_only_the_jwk_set() {
        let keys = SigningKeys::first(SystemTime::now()).unwrap();
        let jwks = serde_json::to_string(&keys.verifying_keys().unwrap()).unwrap();
        let config_map = verifying_keys_config_map("models", &jwks);
        assert_eq!(config_map.metadata.namespace.as_deref(), Some("models"));
        let data = config_map.data.unwrap();
        assert_eq!(data.len(), 1);
        assert!(!data[VERIFYING_KEYS_KEY].contains("PRIVATE"));
        internal_token::Verifier::parse(data[VERIFYING_KEYS_KEY].as_bytes(), "any").unwrap();
    }
}
