//! The Kubernetes source: token records from the labelled Secrets of the proxy's own namespace
//! (never Secrets cluster-wide), model versions from ModelDeployments, ready endpoints from
//! EndpointSlices. Kubernetes types stop here: the watchers feed pure functions that build the
//! same `ModelSpec`s and `TokenRecord`s the file source does, published as one snapshot.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use crds::names::{
    TOKEN_RECORD_KEY, TOKEN_RECORD_LABEL, TOKEN_RECORD_LABEL_VALUE, runtime_service_name,
};
use crds::{ModelDeployment, RequestTimeouts, TokenRecord};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::snapshot::{DEFAULT_MAX_BODY_BYTES, ModelSpec};
use crate::state::Shared;

/// Label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Watches the cluster and publishes a snapshot on every change once all three watchers have
/// listed their objects; until then `/readyz` answers 503.
#[derive(Debug)]
pub struct KubeSource {
    pub shared: Arc<Shared>,
    /// The gateway namespace, where the token record Secrets live.
    pub namespace: String,
    /// The proxy's own Service in `namespace`, whose ready endpoints are its replicas.
    pub peers_service: String,
    /// Deadlines of models whose ModelDeployment sets none.
    pub default_timeouts: RequestTimeouts,
}

#[derive(Debug, Clone, Copy)]
enum Watched {
    Secrets,
    Models,
    Slices,
}

#[async_trait]
impl BackgroundService for KubeSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            result = self.run() => {
                if let Err(error) = result {
                    // Without a source the proxy can only refuse; exit so the orchestrator
                    // restarts it and the failure is visible.
                    tracing::error!(%error, "the Kubernetes source failed");
                    std::process::exit(1);
                }
            }
            _ = shutdown.changed() => {}
        }
    }
}

impl KubeSource {
    async fn run(&self) -> anyhow::Result<()> {
        let client = Client::try_default().await?;
        let (secrets, secrets_writer) = reflector::store::<Secret>();
        let (models, models_writer) = reflector::store::<ModelDeployment>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let record_selector = format!("{TOKEN_RECORD_LABEL}={TOKEN_RECORD_LABEL_VALUE}");
        let secret_events = reflector(
            secrets_writer,
            watcher(
                Api::<Secret>::namespaced(client.clone(), &self.namespace),
                watcher::Config::default().labels(&record_selector),
            ),
        )
        .default_backoff()
        .map(|event| {
            (
                Watched::Secrets,
                event.map(|e| matches!(e, watcher::Event::InitDone)),
            )
        });
        let model_events = reflector(
            models_writer,
            watcher(
                Api::<ModelDeployment>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|event| {
            (
                Watched::Models,
                event.map(|e| matches!(e, watcher::Event::InitDone)),
            )
        });
        let slice_events = reflector(
            slices_writer,
            watcher(
                Api::<EndpointSlice>::all(client),
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
            ),
        )
        .default_backoff()
        .map(|event| {
            (
                Watched::Slices,
                event.map(|e| matches!(e, watcher::Event::InitDone)),
            )
        });

        let mut events = stream::select_all([
            secret_events.boxed(),
            model_events.boxed(),
            slice_events.boxed(),
        ]);
        let mut synced = [false; 3];
        while let Some((watched, event)) = events.next().await {
            match event {
                Ok(init_done) => {
                    synced[watched as usize] |= init_done;
                    if synced.iter().all(|s| *s) {
                        let tokens = token_records(&secrets.state());
                        let models =
                            model_specs(&models.state(), &slices.state(), self.default_timeouts);
                        tracing::debug!(
                            models = models.len(),
                            tokens = tokens.len(),
                            "publishing a snapshot"
                        );
                        let peers = peers(&slices.state(), &self.namespace, &self.peers_service);
                        self.shared.publish(models, tokens, peers);
                    }
                }
                Err(error) => {
                    tracing::warn!(?watched, %error, "watch failed; retrying with back-off")
                }
            }
        }
        anyhow::bail!("the watch streams ended")
    }
}

/// The records of the token record Secrets. A Secret whose record cannot be used is skipped and
/// logged by name, and so is a second record of the same token.
pub fn token_records(secrets: &[Arc<Secret>]) -> Vec<TokenRecord> {
    let mut seen = HashSet::new();
    let mut records = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let name = secret.name_any();
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(TOKEN_RECORD_KEY)) else {
            tracing::warn!(secret = %name, "token record Secret has no {TOKEN_RECORD_KEY}");
            continue;
        };
        match TokenRecord::from_json(&bytes.0) {
            Ok(record) if seen.insert(record.sha256.clone()) => records.push(record),
            Ok(record) => {
                tracing::warn!(secret = %name, token = %record.id, "a second record of the same token is ignored")
            }
            Err(error) => tracing::warn!(secret = %name, %error, "unusable token record"),
        }
    }
    records
}

/// The id clients call a ModelDeployment by: as the operator reported it, as the spec sets it,
/// or the object's UID.
fn model_version_id(model: &ModelDeployment) -> Option<String> {
    model
        .status
        .as_ref()
        .and_then(|s| s.model_version_id.clone())
        .or_else(|| model.model_version_id())
}

/// Ready addresses of a Service's slices: the `http` port (or the only one) of every endpoint
/// not marked unready (an absent `ready` means ready, as the API documents).
fn ready_endpoints<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> Vec<SocketAddr> {
    let mut addresses = BTreeSet::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .or(ports.first())
            .and_then(|p| p.port);
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    addresses.insert(SocketAddr::new(ip, port));
                }
            }
        }
    }
    addresses.into_iter().collect()
}

/// The ready endpoints of Service `service` in `namespace`: the proxy replicas that share
/// per-token limits (at least this one).
pub fn peers(slices: &[Arc<EndpointSlice>], namespace: &str, service: &str) -> usize {
    let own = slices.iter().map(Arc::as_ref).filter(|slice| {
        slice.namespace().as_deref() == Some(namespace)
            && slice.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service)
    });
    ready_endpoints(own).len().max(1)
}

/// One `ModelSpec` per ModelDeployment with a usable id and timeouts. When two claim the same
/// id, the older one keeps it (the operator marks the other `IdConflict`).
pub fn model_specs(
    models: &[Arc<ModelDeployment>],
    slices: &[Arc<EndpointSlice>],
    default_timeouts: RequestTimeouts,
) -> Vec<ModelSpec> {
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
            by_service
                .entry((slice.namespace().unwrap_or_default(), service.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut ordered: Vec<&Arc<ModelDeployment>> = models.iter().collect();
    ordered.sort_by_key(|m| m.id_claim_order());
    let mut ids = HashSet::new();
    let mut specs = Vec::new();
    for model in ordered {
        let name = model.name_any();
        let namespace = model.namespace().unwrap_or_default();
        let Some(id) = model_version_id(model) else {
            continue;
        };
        if !ids.insert(id.clone()) {
            tracing::warn!(model = %id, deployment = %format!("{namespace}/{name}"), "model version id already in use; ignored");
            continue;
        }
        let timeouts = match model
            .spec
            .timeouts
            .clone()
            .unwrap_or_default()
            .resolve_with(default_timeouts)
        {
            Ok(timeouts) => timeouts,
            Err(error) => {
                tracing::warn!(model = %id, %error, "unusable timeouts; model not routed");
                continue;
            }
        };
        let service = (namespace, runtime_service_name(&name));
        let endpoints = ready_endpoints(by_service.get(&service).into_iter().flatten().copied());
        specs.push(ModelSpec {
            id,
            timeouts,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            endpoints,
            // An autoscaled model may be at zero replicas: the operator starts a pod for the
            // requests held.
            hold_when_idle: model.spec.autoscaling.is_some(),
        });
    }
    specs
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn secret(name: &str, record: Option<&str>) -> Arc<Secret> {
        Arc::new(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: record.map(|r| {
                [(
                    TOKEN_RECORD_KEY.to_owned(),
                    ByteString(r.as_bytes().to_vec()),
                )]
                .into()
            }),
            ..Default::default()
        })
    }

    fn record(id: &str, digest_byte: &str) -> String {
        format!(
            r#"{{"id":"{id}","name":"demo/{id}","sha256":"{}","models":["m"],"expiresAt":null,"revoked":false}}"#,
            digest_byte.repeat(64)
        )
    }

    #[test]
    fn records_come_from_record_json_and_bad_or_duplicate_ones_are_skipped() {
        let secrets = [
            secret("a", Some(&record("a", "a"))),
            secret("b", Some("not json")),
            secret("c", None),
            secret("d", Some(&record("d", "a"))),
            secret("e", Some(&record("e", "b"))),
        ];
        let ids: Vec<String> = token_records(&secrets).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "e"]);
    }

    fn deployment(
        name: &str,
        spec_id: Option<&str>,
        status_id: Option<&str>,
        created: &str,
    ) -> Arc<ModelDeployment> {
        let spec = serde_json::from_value(serde_json::json!({
            "task": "embedding", "model": {"uri": "file:///m"}, "modelVersionId": spec_id,
            "timeouts": {"default": "30s"}
        }))
        .unwrap();
        let mut model = ModelDeployment::new(name, spec);
        model.metadata.namespace = Some("demo".into());
        model.metadata.uid = Some(format!("uid-{name}"));
        model.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created.parse().unwrap()),
        );
        model.status = status_id.map(|id| crds::ModelDeploymentStatus {
            model_version_id: Some(id.into()),
            ..Default::default()
        });
        Arc::new(model)
    }

    fn slice(
        service: &str,
        port_name: &str,
        endpoints: &[(&str, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abc")),
                namespace: Some("demo".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![(*ip).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![
                EndpointPort {
                    name: Some("metrics".into()),
                    port: Some(9090),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some(port_name.into()),
                    port: Some(8080),
                    ..Default::default()
                },
            ]),
        })
    }

    #[test]
    fn the_replicas_sharing_limits_are_the_ready_endpoints_of_the_proxys_own_service() {
        let slices = [
            slice(
                "infergate-proxy",
                "http",
                &[
                    ("10.0.0.1", Some(true)),
                    ("10.0.0.2", None),
                    ("10.0.0.3", Some(false)),
                ],
            ),
            slice("minilm", "http", &[("10.0.1.1", Some(true))]),
        ];
        assert_eq!(peers(&slices, "demo", "infergate-proxy"), 2);
        assert_eq!(
            peers(&slices, "other", "infergate-proxy"),
            1,
            "at least this one"
        );
        assert_eq!(peers(&[], "demo", "infergate-proxy"), 1);
    }

    #[test]
    fn the_installations_default_deadlines_fill_what_a_model_leaves_unset() {
        let models = [deployment("minilm", None, None, "2026-01-01T00:00:00Z")];
        let fallback = RequestTimeouts {
            default: std::time::Duration::from_secs(45),
            max: std::time::Duration::from_secs(900),
        };
        let specs = model_specs(&models, &[], fallback);
        assert_eq!(
            (specs[0].timeouts.default, specs[0].timeouts.max),
            (
                std::time::Duration::from_secs(30),
                std::time::Duration::from_secs(900)
            ),
            "the model's own default, the installation's max"
        );
    }

    #[test]
    fn models_are_routed_to_the_ready_endpoints_of_their_service() {
        let models = [deployment(
            "minilm",
            Some("minilm-v1"),
            None,
            "2026-01-01T00:00:00Z",
        )];
        let slices = [
            slice(
                "minilm",
                "http",
                &[
                    ("10.0.0.5", Some(true)),
                    ("10.0.0.6", Some(false)),
                    ("10.0.0.7", None),
                ],
            ),
            slice("other", "http", &[("10.0.0.9", Some(true))]),
        ];
        let specs = model_specs(&models, &slices, RequestTimeouts::default());
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].id, "minilm-v1");
        assert_eq!(
            specs[0].timeouts.default,
            std::time::Duration::from_secs(30)
        );
        let expected: Vec<SocketAddr> = vec![
            "10.0.0.5:8080".parse().unwrap(),
            "10.0.0.7:8080".parse().unwrap(),
        ];
        assert_eq!(specs[0].endpoints, expected);
    }

    #[test]
    fn the_id_comes_from_status_then_spec_then_uid_and_the_older_deployment_keeps_a_contested_id() {
        let models = [
            deployment("b", Some("shared"), None, "2026-02-01T00:00:00Z"),
            deployment("a", Some("shared"), None, "2026-01-01T00:00:00Z"),
            deployment(
                "c",
                Some("spec-id"),
                Some("status-id"),
                "2026-01-01T00:00:00Z",
            ),
            deployment("d", None, None, "2026-01-01T00:00:00Z"),
        ];
        let slices = [
            slice("a", "http", &[("10.0.0.1", Some(true))]),
            slice("b", "http", &[("10.0.0.2", Some(true))]),
        ];
        let specs = model_specs(&models, &slices, RequestTimeouts::default());
        let mut ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["shared", "status-id", "uid-d"]);
        let shared = specs.iter().find(|s| s.id == "shared").unwrap();
        let older: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(shared.endpoints, vec![older], "a, the older, keeps the id");
    }
}
