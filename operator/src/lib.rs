//! infergate's operator: reconciles ModelDeployments into runtime pods and AccessTokens into
//! token records. So far: the identity rule, the desired objects of a ModelDeployment
//! (`desired`) and of an AccessToken (`tokens`), as pure functions; the controllers that apply
//! them are built on top in the operator issue.

#![forbid(unsafe_code)]

pub mod desired;
pub mod tokens;

use crds::ModelDeployment;
use kube::ResourceExt;

/// The id clients put in `/models/<id>/proxy/...`: `spec.modelVersionId`, or the object's UID.
/// `None` only for an object the API server has not stored yet (it has no UID).
pub fn model_version_id(deployment: &ModelDeployment) -> Option<String> {
    deployment
        .spec
        .model_version_id
        .clone()
        .or_else(|| deployment.uid())
}

#[cfg(test)]
mod tests {
    use crds::{ModelDeploymentSpec, ModelSource, Task};

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
            model_version_id(&deployment(Some("minilm-v1"), Some("9a1e"))).as_deref(),
            Some("minilm-v1")
        );
    }

    #[test]
    fn the_uid_is_the_id_when_the_spec_names_none() {
        assert_eq!(
            model_version_id(&deployment(None, Some("9a1e"))).as_deref(),
            Some("9a1e")
        );
        assert_eq!(model_version_id(&deployment(None, None)), None);
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
                sha256: None
            }
        );
    }
}
