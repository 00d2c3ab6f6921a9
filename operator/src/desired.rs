//! The objects a ModelDeployment should become, as pure functions of its spec: a Deployment of
//! runtime pods, the Service in front of them and the NetworkPolicy that lets only the proxy
//! (and a metrics scraper) reach them. The controller applies what these return; tests check
//! them without a cluster.

use std::collections::BTreeMap;

use crds::names::{VERIFYING_KEYS_CONFIG_MAP, VERIFYING_KEYS_KEY, runtime_service_name};
use crds::{ModelDeployment, ModelUri, RequestTimeouts};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

/// Port the builtin runtime listens on inside its pod.
pub const RUNTIME_PORT: i32 = 8080;
/// Where the model's files are mounted in the runtime container.
pub const MODEL_MOUNT: &str = "/model";
/// Where the builtin runtime finds the proxy's public keys (the ConfigMap the operator
/// publishes in the ModelDeployment's namespace).
pub const INTERNAL_KEYS_MOUNT: &str = "/etc/infergate/internal-keys";
/// Seconds the pod gets after SIGTERM beyond the longest deadline (docs/architecture.md, limits:
/// max deadline + 10 s).
const TERMINATION_SLACK_SECONDS: i64 = 10;
/// Seconds a deleted runtime pod keeps serving before SIGTERM (a preStop sleep): endpoint
/// removal reaches every proxy in well under this, so no new request is sent to a pod that has
/// stopped accepting, while the requests it has finish (scale-down drain).
pub const DRAIN_SECONDS: i64 = 5;
/// A startup probe of 5 s × 360 gives a big model 30 minutes to load before the kubelet gives up.
const STARTUP_PROBE_FAILURES: i32 = 360;

/// Settings of the operator that shape every runtime.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuntimeDefaults {
    /// Image of the builtin infergate runtime.
    pub image: String,
    /// CPU and memory of a runtime pod whose ModelDeployment sets none (requests and limits).
    pub cpu: Option<Quantity>,
    pub memory: Option<Quantity>,
    /// Deadlines of models that set none: the longest one sizes the pods' grace period.
    pub timeouts: RequestTimeouts,
    /// Who may connect to runtime pods.
    pub access: NetworkAccess,
    /// The node directory that keeps downloaded models across pods; none downloads into
    /// each pod's own volume.
    pub model_cache: Option<ModelCache>,
}

/// The node cache of downloaded models (a hostPath on every node).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCache {
    pub host_path: String,
    /// Least recently used models are evicted beyond it.
    pub max_bytes: u64,
}

/// Where the download container sees the node cache and the store's credentials.
pub const MODEL_CACHE_MOUNT: &str = "/var/cache/infergate/models";
pub const CREDENTIALS_MOUNT: &str = "/var/run/secrets/infergate/model-store";

/// Pods, by the labels of their namespace and their own labels; an empty map matches all.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Peer {
    pub namespace_labels: BTreeMap<String, String>,
    pub pod_labels: BTreeMap<String, String>,
}

/// Who may open connections to runtime pods: the proxy, and a metrics scraper where one
/// scrapes runtimes directly.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkAccess {
    pub proxy: Peer,
    pub scraper: Option<Peer>,
}

/// Why a ModelDeployment cannot become runtime pods.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("spec.model.uri: {0}")]
    ModelUri(#[from] crds::ModelUriError),
    #[error("spec.timeouts: {0}")]
    Timeouts(#[from] crds::TimeoutsError),
    #[error("the ModelDeployment has no name or namespace yet")]
    Unnamed,
}

/// The label that names a runtime pod's ModelDeployment.
pub const MODEL_DEPLOYMENT_LABEL: &str = "infergate.dev/model-deployment";

/// Labels of everything made for one ModelDeployment; the selector uses the last two.
pub fn labels(model_deployment: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "infergate-runtime"),
        ("app.kubernetes.io/managed-by", "infergate-operator"),
        ("app.kubernetes.io/instance", model_deployment),
        (MODEL_DEPLOYMENT_LABEL, model_deployment),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn selector(model_deployment: &str) -> BTreeMap<String, String> {
    labels(model_deployment)
        .into_iter()
        .filter(|(k, _)| k != "app.kubernetes.io/managed-by" && k != "app.kubernetes.io/instance")
        .collect()
}

/// The pods' selector as a label query, as the scale subresource reports it.
pub fn pod_selector(model_deployment: &str) -> String {
    let pairs: Vec<String> = selector(model_deployment)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.join(",")
}

fn owned_metadata(md: &ModelDeployment, name: String) -> Result<ObjectMeta, BuildError> {
    let namespace = md.namespace().ok_or(BuildError::Unnamed)?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        labels: Some(labels(&md.name_any())),
        owner_references: md.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    })
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The model volume and its mount, by URI scheme.
fn model_volume(uri: &ModelUri) -> (Volume, VolumeMount) {
    let mount = |sub_path: Option<String>| VolumeMount {
        name: "model".to_owned(),
        mount_path: MODEL_MOUNT.to_owned(),
        read_only: Some(true),
        sub_path: sub_path.filter(|p| !p.is_empty()),
        ..VolumeMount::default()
    };
    match uri {
        ModelUri::Pvc { claim, path } => (
            Volume {
                name: "model".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            },
            mount(Some(path.clone())),
        ),
        ModelUri::File { path } => (
            Volume {
                name: "model".to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: path.clone(),
                    type_: Some("Directory".to_owned()),
                }),
                ..Volume::default()
            },
            mount(None),
        ),
        // Filled by the download init container; lives as long as the pod.
        ModelUri::Https { .. } | ModelUri::Remote { .. } => (
            Volume {
                name: "model".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            mount(None),
        ),
    }
}

/// For a model to download (https:// or an object store), the init container that fetches it
/// into the model volume: the builtin runtime image's `download` subcommand, so no other image
/// is needed. Its one-line outcome is the termination message the operator reads back; the
/// credentials Secret is a volume of this container alone (files, so never in an environment
/// a crash dump or `/proc` shows). Returns the container and the volumes it adds.
fn download_container(
    md: &ModelDeployment,
    uri: &ModelUri,
    image: &str,
    cache: Option<&ModelCache>,
) -> Option<(Container, Vec<Volume>)> {
    let source = match uri {
        ModelUri::Https { url } => url,
        ModelUri::Remote { uri } => uri,
        ModelUri::Pvc { .. } | ModelUri::File { .. } => return None,
    };
    let model = &md.spec.model;
    let mut args = vec![
        "download".to_owned(),
        "--source".to_owned(),
        source.clone(),
        "--dest".to_owned(),
        MODEL_MOUNT.to_owned(),
    ];
    let mut flag = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            args.extend([format!("--{name}"), value.clone()]);
        }
    };
    flag("sha256", model.sha256.as_ref());
    flag("endpoint", model.endpoint.as_ref());
    flag("region", model.region.as_ref());
    flag("credentials-secret", model.credentials_secret.as_ref());
    if model.path_style == Some(true) {
        args.push("--path-style".to_owned());
    }
    let mut mounts = vec![VolumeMount {
        name: "model".to_owned(),
        mount_path: MODEL_MOUNT.to_owned(),
        ..VolumeMount::default()
    }];
    let mut volumes = Vec::new();
    if let Some(secret) = &model.credentials_secret {
        args.extend(["--credentials-dir".to_owned(), CREDENTIALS_MOUNT.to_owned()]);
        mounts.push(VolumeMount {
            name: "model-store-credentials".to_owned(),
            mount_path: CREDENTIALS_MOUNT.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "model-store-credentials".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let mut security_context = None;
    if let Some(cache) = cache {
        args.extend([
            "--cache".to_owned(),
            MODEL_CACHE_MOUNT.to_owned(),
            "--cache-max-bytes".to_owned(),
            cache.max_bytes.to_string(),
        ]);
        mounts.push(VolumeMount {
            name: "model-cache".to_owned(),
            mount_path: MODEL_CACHE_MOUNT.to_owned(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "model-cache".to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: cache.host_path.clone(),
                type_: Some("DirectoryOrCreate".to_owned()),
            }),
            ..Volume::default()
        });
        // The kubelet creates a hostPath directory owned by root, mode 0755: only root may
        // write it. Root without a single capability can (the owner's bits), and nothing
        // else; hostPath volumes already need a namespace at Pod Security's privileged level.
        security_context = Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        });
    }
    let container = Container {
        name: "download".to_owned(),
        image: Some(image.to_owned()),
        args: Some(args),
        volume_mounts: Some(mounts),
        security_context,
        // A crash before the outcome line is written still leaves its last words.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };
    Some((container, volumes))
}

/// libtorch threads for a CPU limit: whole CPUs, at least one. A container sees every core of
/// its node, and libtorch's default of one thread per core oversubscribes a limited pod (its
/// threads spin while the kernel throttles them).
fn torch_threads(cpu: &Quantity) -> Option<u32> {
    let text = cpu.0.trim();
    let cpus = match text.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().ok()? / 1000.0,
        None => text.parse::<f64>().ok()?,
    };
    (cpus.is_finite() && cpus > 0.0).then(|| (cpus.floor() as u32).max(1))
}

fn resources(md: &ModelDeployment, defaults: &RuntimeDefaults) -> Option<ResourceRequirements> {
    let spec = md.spec.resources.clone().unwrap_or_default();
    let mut amounts = BTreeMap::new();
    if let Some(cpu) = spec.cpu.or_else(|| defaults.cpu.clone()) {
        amounts.insert("cpu".to_owned(), cpu);
    }
    if let Some(memory) = spec.memory.or_else(|| defaults.memory.clone()) {
        amounts.insert("memory".to_owned(), memory);
    }
    let mut limits = amounts.clone();
    if spec.gpus > 0 {
        // GPUs are limits only: Kubernetes sets the request equal to the limit for extended resources.
        limits.insert("nvidia.com/gpu".to_owned(), Quantity(spec.gpus.to_string()));
    }
    if amounts.is_empty() && limits.is_empty() {
        return None;
    }
    Some(ResourceRequirements {
        requests: (!amounts.is_empty()).then_some(amounts),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// The builtin runtime's command line for `md`: its task, model, id and generation defaults.
/// Local mode starts the same command, so both run a model the same way.
pub fn runtime_args(md: &ModelDeployment, model_dir: &str, listen: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--task",
        md.spec.task.as_str(),
        "--model-dir",
        model_dir,
        "--listen",
        listen,
    ]
    .map(str::to_owned)
    .into();
    if let Some(id) = md.model_version_id() {
        args.extend(["--model-id".to_owned(), id]);
    }
    if let Some(generation) = &md.spec.generation {
        let defaults = [
            ("--default-temperature", generation.temperature),
            ("--default-top-p", generation.top_p),
            (
                "--default-max-new-tokens",
                generation.max_new_tokens.map(f64::from),
            ),
        ];
        for (flag, value) in defaults {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value.to_string()]);
            }
        }
    }
    args
}

/// A preStop sleep (no shell needed in the image) of [`DRAIN_SECONDS`].
fn drain_first() -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: DRAIN_SECONDS,
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    }
}

/// The Deployment of runtime pods for `md`.
pub fn runtime_deployment(
    md: &ModelDeployment,
    defaults: &RuntimeDefaults,
) -> Result<Deployment, BuildError> {
    let name = md.name_any();
    let timeouts: RequestTimeouts = md
        .spec
        .timeouts
        .clone()
        .unwrap_or_default()
        .resolve_with(defaults.timeouts)?;
    let uri = md.spec.model.parsed_uri()?;
    let (volume, mount) = model_volume(&uri);
    let builtin_image = md
        .spec
        .runtime
        .as_ref()
        .and_then(|r| r.image.clone())
        .unwrap_or_else(|| defaults.image.clone());
    let custom = md.spec.runtime.as_ref().and_then(|r| r.container.as_ref());
    let container = match custom {
        Some(custom) => Container {
            name: "runtime".to_owned(),
            image: Some(custom.image.clone()),
            command: custom.command.clone(),
            args: custom.args.clone(),
            env: custom.env.clone(),
            ports: Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: custom.port,
                ..ContainerPort::default()
            }]),
            readiness_probe: Some(http_probe(&custom.health_path, "http", 5, 3)),
            startup_probe: Some(http_probe(
                &custom.health_path,
                "http",
                5,
                STARTUP_PROBE_FAILURES,
            )),
            volume_mounts: Some(vec![mount]),
            resources: resources(md, defaults),
            lifecycle: Some(drain_first()),
            ..Container::default()
        },
        None => Container {
            name: "runtime".to_owned(),
            image: Some(builtin_image.clone()),
            args: Some(
                runtime_args(md, MODEL_MOUNT, &format!("0.0.0.0:{RUNTIME_PORT}"))
                    .into_iter()
                    .chain([
                        "--internal-keys".to_owned(),
                        format!("{INTERNAL_KEYS_MOUNT}/{VERIFYING_KEYS_KEY}"),
                    ])
                    .chain(
                        md.spec
                            .resources
                            .as_ref()
                            .and_then(|r| r.cpu.as_ref())
                            .or(defaults.cpu.as_ref())
                            .and_then(torch_threads)
                            .into_iter()
                            .flat_map(|n| ["--torch-threads".to_owned(), n.to_string()]),
                    )
                    .collect(),
            ),
            ports: Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: RUNTIME_PORT,
                ..ContainerPort::default()
            }]),
            readiness_probe: Some(http_probe("/health", "http", 5, 3)),
            startup_probe: Some(http_probe("/health", "http", 5, STARTUP_PROBE_FAILURES)),
            volume_mounts: Some(vec![
                mount,
                VolumeMount {
                    name: "internal-keys".to_owned(),
                    mount_path: INTERNAL_KEYS_MOUNT.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]),
            resources: resources(md, defaults),
            lifecycle: Some(drain_first()),
            ..Container::default()
        },
    };
    // A custom container cannot verify the proxy's JWT: the NetworkPolicy alone guards it.
    let mut volumes = vec![volume];
    if custom.is_none() {
        volumes.push(Volume {
            name: "internal-keys".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: VERIFYING_KEYS_CONFIG_MAP.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let init_containers =
        match download_container(md, &uri, &builtin_image, defaults.model_cache.as_ref()) {
            Some((download, download_volumes)) => {
                volumes.extend(download_volumes);
                Some(vec![download])
            }
            None => None,
        };
    let pod = PodSpec {
        init_containers,
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: md.spec.node_selector.clone(),
        tolerations: md.spec.tolerations.clone(),
        termination_grace_period_seconds: Some(
            DRAIN_SECONDS + timeouts.max.as_secs() as i64 + TERMINATION_SLACK_SECONDS,
        ),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: owned_metadata(md, name.clone())?,
        spec: Some(DeploymentSpec {
            replicas: Some(md.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(&name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// The NetworkPolicy of `md`'s runtime pods: connections to their port from the proxy's pods
/// (and the metrics scraper's, where configured), nothing else. Enforced only where the
/// cluster's network plugin implements NetworkPolicy; the builtin runtime also refuses any
/// request without the proxy's JWT, which holds everywhere.
pub fn runtime_network_policy(
    md: &ModelDeployment,
    access: &NetworkAccess,
) -> Result<NetworkPolicy, BuildError> {
    let name = md.name_any();
    let selector_of = |labels: &BTreeMap<String, String>| LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    };
    let ingress = [Some(&access.proxy), access.scraper.as_ref()]
        .into_iter()
        .flatten()
        .map(|peer| NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(selector_of(&peer.namespace_labels)),
                pod_selector: Some(selector_of(&peer.pod_labels)),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..NetworkPolicyPort::default()
            }]),
        })
        .collect();
    Ok(NetworkPolicy {
        metadata: owned_metadata(md, name.clone())?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector_of(&selector(&name))),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// The Service whose EndpointSlices the proxy routes by (`kubernetes.io/service-name`).
pub fn runtime_service(md: &ModelDeployment) -> Result<Service, BuildError> {
    let name = md.name_any();
    Ok(Service {
        metadata: owned_metadata(md, runtime_service_name(&name))?,
        spec: Some(ServiceSpec {
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: RUNTIME_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The ConfigMap of client code for `md`: a snippet per language that has one for its task
/// (`python.py`, `curl.sh`, ...), and the proxy URL and deadline they were made with.
pub fn snippets_config_map(
    md: &ModelDeployment,
    target: &crate::snippets::Target,
) -> Result<ConfigMap, BuildError> {
    use crate::snippets;
    let mut data = snippets::all(target);
    data.insert(snippets::URL_KEY.to_owned(), target.base_url.clone());
    data.insert(
        snippets::TIMEOUT_KEY.to_owned(),
        target.timeout_seconds.to_string(),
    );
    Ok(ConfigMap {
        metadata: owned_metadata(md, crds::names::snippets_config_map(&md.name_any()))?,
        data: Some(data),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use crds::{ModelDeploymentSpec, Task};

    use super::*;

    pub(crate) fn deployment(spec: serde_json::Value) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(spec).unwrap();
        let mut md = ModelDeployment::new("minilm", spec);
        md.metadata.namespace = Some("demo".into());
        md.metadata.uid = Some("0d9a".into());
        md
    }

    fn defaults() -> RuntimeDefaults {
        RuntimeDefaults {
            image: "infergate/runtime:0.1.0".into(),
            ..RuntimeDefaults::default()
        }
    }

    fn grace_period(d: &Deployment) -> Option<i64> {
        d.spec
            .as_ref()?
            .template
            .spec
            .as_ref()?
            .termination_grace_period_seconds
    }

    fn container(d: &Deployment) -> &Container {
        &d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    #[test]
    fn every_task_runs_the_builtin_runtime_with_its_task_flag() {
        for task in Task::ALL {
            let md = deployment(
                serde_json::json!({"task": task.as_str(), "model": {"uri": "file:///models/m"}}),
            );
            let d = runtime_deployment(&md, &defaults()).unwrap();
            let c = container(&d);
            assert_eq!(c.image.as_deref(), Some("infergate/runtime:0.1.0"));
            assert_eq!(
                c.args.as_ref().unwrap()[..2],
                ["--task".to_owned(), task.as_str().to_owned()]
            );
            assert_eq!(
                c.readiness_probe
                    .as_ref()
                    .unwrap()
                    .http_get
                    .as_ref()
                    .unwrap()
                    .path
                    .as_deref(),
                Some("/health")
            );
        }
    }

    #[test]
    fn the_runtime_is_told_its_model_id_and_the_generation_defaults() {
        let md = deployment(serde_json::json!({
            "task": "text-generation", "modelVersionId": "chat-v1",
            "model": {"uri": "file:///models/m"},
            "generation": {"temperature": 0.2, "maxNewTokens": 256},
        }));
        let d = runtime_deployment(&md, &defaults()).unwrap();
        assert_eq!(
            container(&d).args.as_ref().unwrap().join(" "),
            "--task text-generation --model-dir /model --listen 0.0.0.0:8080 --model-id chat-v1 \
             --default-temperature 0.2 --default-max-new-tokens 256 \
             --internal-keys /etc/infergate/internal-keys/jwks.json"
        );
    }

    #[test]
    fn the_builtin_runtime_mounts_the_proxys_public_keys_and_a_custom_container_does_not() {
        let builtin =
            deployment(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}}));
        let d = runtime_deployment(&builtin, &defaults()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let keys = &pod.volumes.as_ref().unwrap()[1];
        assert_eq!(
            keys.config_map.as_ref().unwrap().name,
            VERIFYING_KEYS_CONFIG_MAP
        );
        assert_eq!(keys.config_map.as_ref().unwrap().optional, None, "required");
        let mount = &container(&d).volume_mounts.as_ref().unwrap()[1];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (INTERNAL_KEYS_MOUNT, Some(true))
        );
        let custom = deployment(serde_json::json!({
            "task": "rerank", "model": {"uri": "file:///m"},
            "runtime": {"container": {"image": "ghcr.io/huggingface/tei:1.9", "port": 80}}
        }));
        let d = runtime_deployment(&custom, &defaults()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.volumes.as_ref().unwrap().len(), 1);
    }

    fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_network_policy_admits_the_proxy_and_the_scraper_to_the_runtime_port_only() {
        let md =
            deployment(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}}));
        let proxy = Peer {
            namespace_labels: labels_of(&[("kubernetes.io/metadata.name", "infergate-system")]),
            pod_labels: labels_of(&[("app.kubernetes.io/name", "infergate-proxy")]),
        };
        let only_proxy = NetworkAccess {
            proxy: proxy.clone(),
            scraper: None,
        };
        let policy = runtime_network_policy(&md, &only_proxy).unwrap();
        let spec = policy.spec.as_ref().unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned()][..])
        );
        assert_eq!(
            spec.pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector("minilm"))
        );
        let rules = spec.ingress.as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        let from = &rules[0].from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector.as_ref().unwrap().match_labels,
            Some(proxy.namespace_labels.clone()),
            "the proxy's namespace and its pods, both"
        );
        assert_eq!(
            from.pod_selector.as_ref().unwrap().match_labels,
            Some(proxy.pod_labels.clone())
        );
        assert_eq!(
            rules[0].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(
            policy.metadata.owner_references.as_ref().unwrap()[0].name,
            "minilm"
        );
        let with_scraper = NetworkAccess {
            proxy,
            scraper: Some(Peer {
                namespace_labels: labels_of(&[("kubernetes.io/metadata.name", "monitoring")]),
                pod_labels: BTreeMap::new(),
            }),
        };
        let policy = runtime_network_policy(&md, &with_scraper).unwrap();
        assert_eq!(policy.spec.unwrap().ingress.unwrap().len(), 2);
    }

    #[test]
    fn installation_defaults_fill_the_resources_and_deadlines_a_model_leaves_unset() {
        let defaults = RuntimeDefaults {
            image: "infergate/runtime:0.1.0".into(),
            cpu: Some(Quantity("2".into())),
            memory: Some(Quantity("4Gi".into())),
            timeouts: RequestTimeouts {
                default: std::time::Duration::from_secs(30),
                max: std::time::Duration::from_secs(50),
            },
            access: NetworkAccess::default(),
            model_cache: None,
        };
        let bare =
            deployment(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}}));
        let d = runtime_deployment(&bare, &defaults).unwrap();
        let resources = container(&d).resources.clone().unwrap();
        assert_eq!(
            resources.requests.unwrap()["memory"],
            Quantity("4Gi".into())
        );
        assert_eq!(resources.limits.unwrap()["cpu"], Quantity("2".into()));
        let grace = grace_period(&d);
        assert_eq!(grace, Some(DRAIN_SECONDS + 50 + TERMINATION_SLACK_SECONDS));
        let own = deployment(serde_json::json!({
            "task": "embedding", "model": {"uri": "file:///m"},
            "resources": {"cpu": "8", "gpus": 1}, "timeouts": {"max": "900s"},
        }));
        let d = runtime_deployment(&own, &defaults).unwrap();
        let limits = container(&d).resources.clone().unwrap().limits.unwrap();
        assert_eq!(
            limits["cpu"],
            Quantity("8".into()),
            "the model's own value wins"
        );
        assert_eq!(limits["memory"], Quantity("4Gi".into()));
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        let grace = grace_period(&d);
        assert_eq!(grace, Some(DRAIN_SECONDS + 900 + TERMINATION_SLACK_SECONDS));
    }

    #[test]
    fn a_pvc_source_mounts_the_claim_read_only_at_its_path() {
        let md = deployment(
            serde_json::json!({"task": "embedding", "model": {"uri": "pvc://models/llama/v1"}}),
        );
        let d = runtime_deployment(&md, &defaults()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let claim = pod.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("models", Some(true))
        );
        let mount = &container(&d).volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.sub_path.as_deref()),
            ("/model", Some("llama/v1"))
        );
    }

    #[test]
    fn gpus_become_nvidia_limits_with_the_node_selector_and_tolerations() {
        let md = deployment(serde_json::json!({
            "task": "text-generation", "model": {"uri": "file:///m"},
            "resources": {"gpus": 2, "cpu": "4", "memory": "16Gi"},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        }));
        let d = runtime_deployment(&md, &defaults()).unwrap();
        let resources = container(&d).resources.as_ref().unwrap();
        assert_eq!(
            resources.limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("2".into())
        );
        assert_eq!(
            resources.requests.as_ref().unwrap()["memory"],
            Quantity("16Gi".into())
        );
        assert!(
            !resources
                .requests
                .as_ref()
                .unwrap()
                .contains_key("nvidia.com/gpu")
        );
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.node_selector.as_ref().unwrap()["gpu"], "a100");
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn a_custom_container_keeps_its_image_port_and_health_path() {
        let md = deployment(serde_json::json!({
            "task": "rerank", "model": {"uri": "file:///m"},
            "runtime": {"container": {"image": "ghcr.io/huggingface/tei:1.9", "args": ["--model-id", "/model"], "port": 80, "healthPath": "/health"}}
        }));
        let d = runtime_deployment(&md, &defaults()).unwrap();
        let c = container(&d);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/huggingface/tei:1.9"));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 80);
        assert_eq!(
            c.args.as_deref(),
            Some(&["--model-id".to_owned(), "/model".to_owned()][..])
        );
    }

    #[test]
    fn a_cpu_limit_sets_the_runtimes_threads_to_its_whole_cpus() {
        let threads = |cpu: Option<&str>| {
            let mut spec = serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}});
            if let Some(cpu) = cpu {
                spec["resources"] = serde_json::json!({"cpu": cpu});
            }
            let d = runtime_deployment(&deployment(spec), &defaults()).unwrap();
            let args = container(&d).args.clone().unwrap();
            args.iter()
                .position(|a| a == "--torch-threads")
                .map(|i| args[i + 1].clone())
        };
        assert_eq!(threads(Some("4")), Some("4".to_owned()));
        assert_eq!(threads(Some("2500m")), Some("2".to_owned()));
        assert_eq!(threads(Some("500m")), Some("1".to_owned()));
        assert_eq!(threads(None), None, "no limit: libtorch's own default");
    }

    #[test]
    fn a_stopping_pod_drains_then_gets_the_longest_deadline_to_finish() {
        let md = deployment(
            serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}, "timeouts": {"max": "15m"}}),
        );
        let d = runtime_deployment(&md, &defaults()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        // 5 s out of the endpoints before SIGTERM, 900 s for the longest request, 10 s slack.
        assert_eq!(pod.termination_grace_period_seconds, Some(915));
        let pre_stop = container(&d).lifecycle.as_ref().unwrap().pre_stop.as_ref();
        assert_eq!(pre_stop.unwrap().sleep.as_ref().unwrap().seconds, 5);
    }

    #[test]
    fn an_https_source_is_downloaded_by_an_init_container_into_an_empty_dir() {
        let sha = "ab".repeat(32);
        let md = deployment(serde_json::json!({
            "task": "embedding",
            "model": {"uri": "https://models.example.com/minilm.tar.gz", "sha256": sha},
            "runtime": {"container": {"image": "ghcr.io/huggingface/tei:1.9", "port": 80, "healthPath": "/health"}}
        }));
        let d = runtime_deployment(&md, &defaults()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(pod.volumes.as_ref().unwrap()[0].empty_dir.is_some());
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            init.image.as_deref(),
            Some("infergate/runtime:0.1.0"),
            "the builtin image downloads, even for a custom server"
        );
        assert_eq!(
            init.args.as_ref().unwrap().join(" "),
            format!(
                "download --source https://models.example.com/minilm.tar.gz --dest /model --sha256 {sha}"
            )
        );
        assert_eq!(init.volume_mounts.as_ref().unwrap()[0].read_only, None);
        assert_eq!(
            container(&d).volume_mounts.as_ref().unwrap()[0].read_only,
            Some(true),
            "the server only reads what was downloaded"
        );
    }

    #[test]
    fn an_object_store_source_is_fetched_through_the_node_cache_with_its_secret_mounted_as_files() {
        let md = deployment(serde_json::json!({
            "task": "embedding",
            "model": {"uri": "s3://models/team/minilm", "credentialsSecret": "store-keys",
                      "endpoint": "http://minio.storage:9000", "region": "eu-west-1", "pathStyle": true},
        }));
        let mut defaults = defaults();
        defaults.model_cache = Some(ModelCache {
            host_path: "/var/cache/infergate/models".into(),
            max_bytes: 50_000_000_000,
        });
        let d = runtime_deployment(&md, &defaults).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            init.args.as_ref().unwrap().join(" "),
            "download --source s3://models/team/minilm --dest /model --endpoint http://minio.storage:9000 \
             --region eu-west-1 --credentials-secret store-keys --path-style \
             --credentials-dir /var/run/secrets/infergate/model-store \
             --cache /var/cache/infergate/models --cache-max-bytes 50000000000"
        );
        assert!(init.env.is_none(), "credentials are files, not variables");
        let volume = |name: &str| {
            pod.volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!("no volume {name}"))
                .clone()
        };
        assert_eq!(
            volume("model-store-credentials")
                .secret
                .unwrap()
                .secret_name
                .as_deref(),
            Some("store-keys")
        );
        let cache = volume("model-cache").host_path.unwrap();
        assert_eq!(
            (cache.path.as_str(), cache.type_.as_deref()),
            ("/var/cache/infergate/models", Some("DirectoryOrCreate"))
        );
        let context = init.security_context.as_ref().unwrap();
        assert_eq!(
            context.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(
            init.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let runtime_mounts: Vec<_> = container(&d)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert!(
            !runtime_mounts.contains(&"model-store-credentials")
                && !runtime_mounts.contains(&"model-cache"),
            "the server sees neither the credentials nor the node cache: {runtime_mounts:?}"
        );
    }

    #[test]
    fn local_sources_need_no_init_container() {
        let md =
            deployment(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}}));
        let d = runtime_deployment(&md, &defaults()).unwrap();
        assert!(
            d.spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .init_containers
                .is_none()
        );
    }

    #[test]
    fn the_service_selects_the_pods_and_is_named_for_the_proxy() {
        let md =
            deployment(serde_json::json!({"task": "embedding", "model": {"uri": "file:///m"}}));
        let service = runtime_service(&md).unwrap();
        let d = runtime_deployment(&md, &defaults()).unwrap();
        assert_eq!(
            service.metadata.name.as_deref(),
            Some(runtime_service_name("minilm").as_str())
        );
        let selector = service.spec.as_ref().unwrap().selector.as_ref().unwrap();
        let pod_labels = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        let owner = &service.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ModelDeployment", Some(true))
        );
    }
}
