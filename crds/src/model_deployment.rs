//! `ModelDeployment`: one model version, the task it serves and where its weights live.
//! The operator turns it into runtime pods; the proxy routes `/models/<id>/proxy/...` to them.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::timeouts::Timeouts;

/// Desired state of a served model version.
// Clippy reads the repeated `type_ = ...` of the printcolumn arguments as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "infergate.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    category = "infergate",
    cel,
    doc = "A model version served by infergate: its task, its weights and the pods that run it.",
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.task"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Identifier clients use in `/models/<id>/proxy/...`. Defaults to the object's UID; unique
    /// across the cluster and immutable, since tokens are scoped to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelVersionId is immutable: tokens are scoped to it"))]
    pub model_version_id: Option<String>,

    /// What the model does; selects the runtime's endpoints.
    pub task: Task,

    /// Where the weights live.
    pub model: ModelSource,

    /// Which server runs the model; the builtin infergate runtime when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,

    /// Number of runtime pods. With `autoscaling` the operator sets it (leave it out of applied
    /// manifests); 0 stops every pod, and requests are refused until it rises again. The scale
    /// subresource points here, so an HPA or KEDA scaler may own it instead.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Replicas that follow the load the proxies see, down to zero if `minReplicas` is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// Compute each runtime pod gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,

    /// Node labels a runtime pod must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Taints the runtime pods tolerate (GPU nodes are usually tainted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Request deadlines the proxy applies to this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,

    /// Sampling defaults for text generation when a request sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationDefaults>,
}

impl ModelDeployment {
    /// The id clients put in `/models/<id>/proxy/...`: `spec.modelVersionId`, or the object's
    /// UID. `None` only for an object the API server has not stored yet (it has no UID).
    pub fn model_version_id(&self) -> Option<String> {
        use kube::ResourceExt;
        self.spec.model_version_id.clone().or_else(|| self.uid())
    }

    /// Who wins when two ModelDeployments claim the same model version id: the one created
    /// first, then by namespace and name. The proxy routes only the winner and the operator marks
    /// the others `Degraded/IdConflict`, so both must order by this one key.
    pub fn id_claim_order(&self) -> (Option<jiff::Timestamp>, Option<String>, Option<String>) {
        (
            self.metadata.creation_timestamp.as_ref().map(|t| t.0),
            self.metadata.namespace.clone(),
            self.metadata.name.clone(),
        )
    }
}

fn default_replicas() -> i32 {
    1
}

/// The kind of model served, which fixes the runtime's endpoints (docs/architecture.md,
/// runtime contract).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    TextGeneration,
    TextClassification,
    Embedding,
    Rerank,
    Translation,
    SpeechRecognition,
    TextToSpeech,
    TextToImage,
    Tabular,
}

impl Task {
    /// Every task, in the order of the contract.
    pub const ALL: [Task; 9] = [
        Task::TextGeneration,
        Task::TextClassification,
        Task::Embedding,
        Task::Rerank,
        Task::Translation,
        Task::SpeechRecognition,
        Task::TextToSpeech,
        Task::TextToImage,
        Task::Tabular,
    ];

    /// The name used in manifests and on the runtime's `--task` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::TextGeneration => "text-generation",
            Task::TextClassification => "text-classification",
            Task::Embedding => "embedding",
            Task::Rerank => "rerank",
            Task::Translation => "translation",
            Task::SpeechRecognition => "speech-recognition",
            Task::TextToSpeech => "text-to-speech",
            Task::TextToImage => "text-to-image",
            Task::Tabular => "tabular",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Task::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown task {s:?}; expected one of {}", known.join(", "))
            })
    }
}

/// The location of a model's files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.sha256) || self.uri.startsWith('https://')").message("model.sha256 applies only to https:// URIs"),
    validation = Rule::new("!self.uri.contains('/../') && !self.uri.endsWith('/..')").message("model.uri must not contain '..' segments"),
    validation = Rule::new("!has(self.credentialsSecret) || self.uri.startsWith('s3://') || self.uri.startsWith('gs://') || self.uri.startsWith('az://') || self.uri.startsWith('hf://')").message("model.credentialsSecret applies only to s3://, gs://, az:// and hf:// URIs"),
    validation = Rule::new("!has(self.endpoint) || self.uri.startsWith('s3://') || self.uri.startsWith('az://') || self.uri.startsWith('hf://')").message("model.endpoint applies only to s3://, az:// and hf:// URIs"),
    validation = Rule::new("(!has(self.region) && !has(self.pathStyle)) || self.uri.startsWith('s3://')").message("model.region and model.pathStyle apply only to s3:// URIs")
)]
pub struct ModelSource {
    /// `pvc://CLAIM/PATH`, `file:///ABSOLUTE/PATH` (a host path; local mode), `https://...`
    /// (one file or a tar archive), the directory of the model's files in an object store:
    /// `s3://BUCKET/PREFIX` (S3 and compatible stores), `gs://BUCKET/PREFIX` or
    /// `az://CONTAINER/PREFIX`, or a Hugging Face Hub repository `hf://ORG/NAME[@REVISION]`
    /// (default `main`; the files a runtime loads, at the commit the revision resolves to).
    /// Downloads happen before the runtime starts, through the node's model cache.
    #[schemars(
        length(min = 1, max = 2048),
        regex(
            pattern = r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^\s]*)?|file:///[^\s]*|https://[^\s/]+(/[^\s]*)?|(s3|gs|az)://[a-z0-9]([-a-z0-9._]*[a-z0-9])?(/[^\s]*)?|hf://[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?(@[^\s@]+)?)$"
        )
    )]
    pub uri: String,

    /// Lower-case hex SHA-256 of the downloaded file, checked before the runtime starts.
    /// An object store prefix is checked against its own `SHA256SUMS` object instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// A Secret in the ModelDeployment's namespace whose keys are the store's credentials:
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) for s3://,
    /// `GOOGLE_SERVICE_ACCOUNT_KEY` for gs://, `AZURE_STORAGE_ACCOUNT_NAME` with
    /// `AZURE_STORAGE_ACCOUNT_KEY` or `AZURE_STORAGE_SAS_KEY` for az://, `HF_TOKEN` for
    /// hf://. Mounted into the download container only. Without it the store sees the pod's own identity (IRSA,
    /// workload identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub credentials_secret: Option<String>,

    /// The store's endpoint, for S3-compatible stores (MinIO, Ceph, ...), Azure emulators and
    /// Hub mirrors (`HF_ENDPOINT`): `http://minio.storage:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^https?://[^\s/]+(/[^\s]*)?$")
    )]
    pub endpoint: Option<String>,

    /// The S3 region (`us-east-1` when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// Path-style S3 addressing (`ENDPOINT/BUCKET/KEY`), which most self-hosted stores need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
}

impl ModelSource {
    /// The URI, parsed.
    pub fn parsed_uri(&self) -> Result<ModelUri, ModelUriError> {
        self.uri.parse()
    }
}

/// A model URI, split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelUri {
    /// A path inside a PersistentVolumeClaim of the ModelDeployment's namespace.
    Pvc { claim: String, path: String },
    /// An absolute path on the node (or, in local mode, on this machine).
    File { path: String },
    /// A file to download.
    Https { url: String },
    /// A directory of an object store (`s3://`, `gs://`, `az://`) or a Hub repository
    /// (`hf://`) to download.
    Remote { uri: String },
}

/// Why a model URI was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelUriError {
    #[error("model URI must start with pvc://, file:///, https://, s3://, gs://, az:// or hf://")]
    UnsupportedScheme,
    #[error("pvc:// URI needs a claim name: pvc://CLAIM/PATH")]
    MissingClaim,
    #[error("file:// URI needs an absolute path: file:///PATH")]
    RelativePath,
    #[error("https:// URI needs a host")]
    MissingHost,
    #[error(
        "an object store URI needs a bucket (s3://BUCKET/PREFIX), a Hub URI a repository (hf://ORG/NAME)"
    )]
    MissingBucket,
    #[error("model URI must not contain whitespace or '..' segments")]
    UnsafePath,
}

impl std::str::FromStr for ModelUri {
    type Err = ModelUriError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        if uri.chars().any(char::is_whitespace) {
            return Err(ModelUriError::UnsafePath);
        }
        let uri = if let Some(rest) = uri.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if claim.is_empty() {
                return Err(ModelUriError::MissingClaim);
            }
            ModelUri::Pvc {
                claim: claim.to_owned(),
                path: path.to_owned(),
            }
        } else if let Some(rest) = uri.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(ModelUriError::RelativePath);
            }
            ModelUri::File {
                path: rest.to_owned(),
            }
        } else if let Some(rest) = uri.strip_prefix("https://") {
            if rest.split('/').next().is_none_or(str::is_empty) {
                return Err(ModelUriError::MissingHost);
            }
            ModelUri::Https {
                url: uri.to_owned(),
            }
        } else if let Some(rest) = ["s3://", "gs://", "az://", "hf://"]
            .iter()
            .find_map(|scheme| uri.strip_prefix(scheme))
        {
            if rest.split('/').next().is_none_or(str::is_empty) {
                return Err(ModelUriError::MissingBucket);
            }
            ModelUri::Remote {
                uri: uri.to_owned(),
            }
        } else {
            return Err(ModelUriError::UnsupportedScheme);
        };
        // A path that climbs out of its volume would let a manifest read another model's files.
        let path = match &uri {
            ModelUri::Pvc { path, .. } | ModelUri::File { path } => path.as_str(),
            ModelUri::Remote { uri } => uri.as_str(),
            ModelUri::Https { .. } => "",
        };
        if path.split('/').any(|segment| segment == "..") {
            return Err(ModelUriError::UnsafePath);
        }
        Ok(uri)
    }
}

/// The server that runs the model: the builtin runtime (optionally another image of it), or any
/// container serving HTTP.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.image) && has(self.container))").message("set runtime.image or runtime.container, not both"))]
pub struct RuntimeSpec {
    /// Image of the builtin infergate runtime to use instead of the default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// A custom server (vLLM, TGI, TEI, ...) that replaces the builtin runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
}

/// A custom model server container.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Container image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Port the server listens on for HTTP.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Path answering 200 once the model is loaded; used as the readiness probe.
    #[serde(default = "default_health_path")]
    #[schemars(regex(pattern = r"^/"))]
    pub health_path: String,
}

fn default_health_path() -> String {
    "/health".to_owned()
}

/// Compute per runtime pod.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
pub struct Resources {
    /// Number of `nvidia.com/gpu`; 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    /// CPU request and limit, e.g. `"4"` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `16Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Sampling defaults for text generation; a request's own values win.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationDefaults {
    /// Softmax temperature; 0 means greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    #[x_kube(validation = Rule::new("self > 0.0").message("generation.topP must be greater than 0"))]
    pub top_p: Option<f64>,
    /// Upper bound of generated tokens when a request sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_new_tokens: Option<i32>,
}

/// How the operator sizes a ModelDeployment from its load: the Kubernetes HPA algorithm (tolerance
/// and stabilization windows) on the requests in progress per replica, as the proxies count them.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    validation = Rule::new("!has(self.scaleToZeroAfterSeconds) || self.minReplicas == 0").message("autoscaling.scaleToZeroAfterSeconds applies only with minReplicas 0")
)]
pub struct Autoscaling {
    /// Fewest runtime pods. 0 lets an idle model cost nothing: the proxy holds the next request
    /// while a pod starts.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most runtime pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Requests in progress per replica to aim for: those the proxies are forwarding to the
    /// model and those they hold for it, averaged over the operator's sampling interval.
    #[x_kube(validation = Rule::new("self > 0.0").message("autoscaling.inFlightPerReplica must be greater than 0"))]
    #[schemars(range(max = 100000.0))]
    pub in_flight_per_replica: f64,
    /// Seconds of recommendations a scale-up takes the lowest of (HPA `scaleUp`
    /// stabilization); 0 follows a rise at once.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// Seconds of recommendations a scale-down takes the highest of (HPA `scaleDown`
    /// stabilization), so a dip in load does not remove pods it needs again.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// With `minReplicas: 0`: seconds without any request before the last pod goes (default
    /// 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_to_zero_after_seconds: Option<i32>,
}

/// Idle seconds before a `minReplicas: 0` model loses its last pod, when the spec sets none.
pub const DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS: i32 = 300;

fn default_min_replicas() -> i32 {
    1
}

fn default_scale_down_stabilization() -> i32 {
    300
}

/// The autoscaler's last decision, for people and for `kubectl get`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas the autoscaler last set.
    pub desired_replicas: i32,
    /// Average requests in progress (held or forwarded) over the last sampling interval.
    pub in_flight: f64,
    /// When the autoscaler last changed `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The last decision in words, e.g. `scaled 2 → 4: 37.0 in flight, target 8 per replica`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Observed state of a ModelDeployment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The id clients use in the path (the spec's, or the object's UID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version_id: Option<String>,
    /// Path prefix of the model's API on the proxy: `/models/<id>/proxy/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// ConfigMap in this namespace holding client code for this deployment (`python.py`,
    /// `curl.sh`, ...), ready to run with `INFERGATE_TOKEN` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snippets_config_map: Option<String>,
    /// Runtime pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Runtime pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the runtime pods, for the scale subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Written by the autoscaler when `spec.autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, following the Kubernetes API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(model_version_id: Option<&str>, uid: Option<&str>) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(serde_json::json!({
            "task": "embedding",
            "model": {"uri": "file:///models/minilm"},
            "modelVersionId": model_version_id,
        }))
        .unwrap();
        let mut md = ModelDeployment::new("minilm", spec);
        md.metadata.uid = uid.map(str::to_owned);
        md
    }

    #[test]
    fn the_spec_id_wins_over_the_uid() {
        assert_eq!(
            deployment(Some("minilm-v1"), Some("9a1e"))
                .model_version_id()
                .as_deref(),
            Some("minilm-v1")
        );
    }

    #[test]
    fn the_uid_is_the_id_when_the_spec_names_none() {
        assert_eq!(
            deployment(None, Some("9a1e")).model_version_id().as_deref(),
            Some("9a1e")
        );
        assert_eq!(deployment(None, None).model_version_id(), None);
    }

    #[test]
    fn a_deployment_defaults_to_one_replica() {
        let md = deployment(None, None);
        assert_eq!(md.spec.replicas, 1);
        assert_eq!(md.spec.task, Task::Embedding);
        assert_eq!(
            md.spec.model,
            ModelSource {
                uri: "file:///models/minilm".into(),
                sha256: None,
                credentials_secret: None,
                endpoint: None,
                region: None,
                path_style: None,
            }
        );
    }

    #[test]
    fn task_names_round_trip_through_serde_and_from_str() {
        for task in Task::ALL {
            let json = serde_json::to_value(task).unwrap();
            assert_eq!(json, serde_json::Value::String(task.as_str().to_owned()));
            assert_eq!(task.as_str().parse::<Task>().unwrap(), task);
        }
        assert!(
            "chat"
                .parse::<Task>()
                .unwrap_err()
                .contains("text-generation")
        );
    }

    #[test]
    fn model_uris_split_into_their_parts() {
        assert_eq!(
            "pvc://models-pvc/llama-3.2-1b".parse(),
            Ok(ModelUri::Pvc {
                claim: "models-pvc".into(),
                path: "llama-3.2-1b".into()
            })
        );
        assert_eq!(
            "pvc://models-pvc".parse(),
            Ok(ModelUri::Pvc {
                claim: "models-pvc".into(),
                path: String::new()
            })
        );
        assert_eq!(
            "file:///srv/minilm".parse(),
            Ok(ModelUri::File {
                path: "/srv/minilm".into()
            })
        );
        assert_eq!(
            "https://example.com/m.tar".parse(),
            Ok(ModelUri::Https {
                url: "https://example.com/m.tar".into()
            })
        );
        for uri in [
            "s3://models/team/minilm",
            "gs://b/m",
            "az://weights",
            "hf://org/m@v1",
        ] {
            assert_eq!(uri.parse(), Ok(ModelUri::Remote { uri: uri.into() }));
        }
    }

    #[test]
    fn model_uris_that_cannot_be_served_are_refused() {
        let refused = [
            ("ftp://host/model", ModelUriError::UnsupportedScheme),
            ("s3:///model", ModelUriError::MissingBucket),
            ("gs://bucket/a/../b", ModelUriError::UnsafePath),
            ("http://example.com/m", ModelUriError::UnsupportedScheme),
            ("pvc:///path", ModelUriError::MissingClaim),
            ("file://relative/path", ModelUriError::RelativePath),
            ("https:///m.tar", ModelUriError::MissingHost),
            ("pvc://claim/../other", ModelUriError::UnsafePath),
            ("file:///srv/a b", ModelUriError::UnsafePath),
        ];
        for (uri, expected) in refused {
            assert_eq!(uri.parse::<ModelUri>(), Err(expected), "{uri}");
        }
    }
}
