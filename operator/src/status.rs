//! The status the operator reports, as pure functions of what it observed: conditions that
//! follow the Kubernetes API conventions (`Ready`, `Progressing`, `Degraded`, each with a reason
//! and a message a person can act on) and the events worth telling a person about.

use crds::names::model_endpoint;
use crds::{AccessTokenPhase, ModelDeployment, ModelDeploymentStatus};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

/// Why a ModelDeployment has no runtime of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// The spec cannot become a Deployment (the message names the field).
    InvalidSpec(String),
    /// Another ModelDeployment, created earlier, serves the same model version id.
    IdConflict { id: String, holder: String },
}

impl Blocked {
    fn reason(&self) -> &'static str {
        match self {
            Blocked::InvalidSpec(_) => "InvalidSpec",
            Blocked::IdConflict { .. } => "IdConflict",
        }
    }

    fn message(&self) -> String {
        match self {
            Blocked::InvalidSpec(message) => message.clone(),
            Blocked::IdConflict { id, holder } => format!(
                "model version id {id} is already served by ModelDeployment {holder}, created earlier; \
                 set a different spec.modelVersionId"
            ),
        }
    }
}

/// The ModelDeployment among `all` that owns `md`'s model version id, when it is another one.
pub fn id_holder<'a>(
    md: &ModelDeployment,
    all: impl IntoIterator<Item = &'a ModelDeployment>,
) -> Option<&'a ModelDeployment> {
    let id = md.model_version_id()?;
    let holder = all
        .into_iter()
        .filter(|other| other.model_version_id().as_deref() == Some(id.as_str()))
        .min_by_key(|other| other.id_claim_order())?;
    (holder.uid() != md.uid()).then_some(holder)
}

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// Sets each condition's `lastTransitionTime`: kept from `previous` while its status is
/// unchanged, else `now` (whole seconds, as the API server stores it, so a status read back
/// compares equal to the one computed).
pub fn stamp_transitions(conditions: &mut [Condition], previous: &[Condition], now: Timestamp) {
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    for condition in conditions {
        condition.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == condition.type_ && p.status == condition.status)
            .map(|p| p.last_transition_time.clone())
            .unwrap_or(Time(now));
    }
}

/// A rollout the Deployment controller gave up on: no progress within its deadline, or pods it
/// could not create (quota, admission).
fn rollout_failure(deployment: &Deployment) -> Option<String> {
    let conditions = deployment.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| {
            (c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
                || (c.type_ == "ReplicaFailure" && c.status == "True")
        })
        .map(|c| {
            format!(
                "the runtime Deployment reports {}: {}",
                c.reason.as_deref().unwrap_or(&c.type_),
                c.message.as_deref().unwrap_or("no message")
            )
        })
}

/// The status of `md`, given why it is blocked (if it is) and its Deployment as last read.
/// `lastTransitionTime`s are left for [`stamp_transitions`].
pub fn model_deployment_status(
    md: &ModelDeployment,
    blocked: Option<&Blocked>,
    deployment: Option<&Deployment>,
) -> ModelDeploymentStatus {
    let generation = md.metadata.generation;
    let id = md.model_version_id();
    let observed = deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let desired = md.spec.replicas;
    let ready = observed.ready_replicas.unwrap_or(0);
    let updated = observed.updated_replicas.unwrap_or(0);
    let deployment_current = deployment.is_some_and(|d| {
        observed.observed_generation.is_some()
            && observed.observed_generation == d.metadata.generation
    });
    let pods_hint = format!(
        "kubectl get pods -n {} -l infergate.dev/model-deployment={}",
        md.namespace().unwrap_or_default(),
        md.name_any()
    );

    let degraded = match (blocked, deployment.and_then(rollout_failure)) {
        (Some(blocked), _) => condition(
            DEGRADED,
            true,
            blocked.reason(),
            blocked.message(),
            generation,
        ),
        (None, Some(failure)) => condition(
            DEGRADED,
            true,
            "RolloutFailed",
            format!("{failure}; see {pods_hint}"),
            generation,
        ),
        (None, None) => condition(DEGRADED, false, "AsExpected", String::new(), generation),
    };
    let progressing = match blocked {
        Some(blocked) => condition(
            PROGRESSING,
            false,
            blocked.reason(),
            blocked.message(),
            generation,
        ),
        None if deployment.is_none() => condition(
            PROGRESSING,
            true,
            "Creating",
            "creating the runtime Deployment".to_owned(),
            generation,
        ),
        None if !deployment_current || updated < desired || ready < desired => condition(
            PROGRESSING,
            true,
            "RollingOut",
            format!("{ready} of {desired} runtime replicas ready"),
            generation,
        ),
        None => condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            format!("{ready} of {desired} runtime replicas ready"),
            generation,
        ),
    };
    let ready_condition = match (blocked, ready) {
        (Some(blocked), _) => condition(
            READY,
            false,
            blocked.reason(),
            blocked.message(),
            generation,
        ),
        (None, 0) => condition(
            READY,
            false,
            "NoReadyReplicas",
            format!("no runtime pod passes its /health probe yet; see {pods_hint}"),
            generation,
        ),
        (None, ready) => condition(
            READY,
            true,
            "ReplicasReady",
            format!(
                "{ready} of {desired} runtime replicas ready; serving at {}",
                model_endpoint(id.as_deref().unwrap_or_default())
            ),
            generation,
        ),
    };
    ModelDeploymentStatus {
        endpoint: id.as_deref().map(model_endpoint),
        model_version_id: id,
        replicas: observed.replicas.unwrap_or(0),
        ready_replicas: ready,
        observed_generation: generation,
        conditions: vec![ready_condition, progressing, degraded],
    }
}

/// The `Ready` condition of an AccessToken: true while the proxy accepts it for every model it
/// names.
pub fn access_token_ready(
    phase: AccessTokenPhase,
    problem: Option<(&str, String)>,
    unknown_models: &[String],
    generation: Option<i64>,
) -> Condition {
    match (phase, problem) {
        (_, Some((reason, message))) => condition(READY, false, reason, message, generation),
        (AccessTokenPhase::Revoked, None) => condition(
            READY,
            false,
            "Revoked",
            "spec.revoked is true; the proxy rejects this token".to_owned(),
            generation,
        ),
        (AccessTokenPhase::Expired, None) => condition(
            READY,
            false,
            "Expired",
            "the token is past its expiry; issue a new AccessToken".to_owned(),
            generation,
        ),
        (_, None) if !unknown_models.is_empty() => condition(
            READY,
            false,
            "UnknownModels",
            format!(
                "spec.models names ModelDeployments that do not exist in this namespace: {}; \
                 the token works for the others and gains these when they are created",
                unknown_models.join(", ")
            ),
            generation,
        ),
        (_, None) => condition(
            READY,
            true,
            "Issued",
            "the proxy accepts this token for every model in spec.models".to_owned(),
            generation,
        ),
    }
}

/// A change of a condition that a person should see as an Event: (warning?, reason, message).
pub fn transitions(previous: &[Condition], current: &[Condition]) -> Vec<(bool, String, String)> {
    current
        .iter()
        .filter(|c| c.type_ == READY || (c.type_ == DEGRADED && c.status == "True"))
        .filter(|c| {
            !previous
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
        })
        .map(|c| {
            let warning = (c.type_ == DEGRADED)
                || (c.type_ == READY && c.status == "False" && c.reason != "NoReadyReplicas");
            (warning, c.reason.clone(), c.message.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};

    use super::*;

    fn md(name: &str, id: Option<&str>, created: &str) -> ModelDeployment {
        let spec = serde_json::from_value(serde_json::json!({
            "task": "embedding", "model": {"uri": "file:///m"}, "modelVersionId": id, "replicas": 2
        }))
        .unwrap();
        let mut md = ModelDeployment::new(name, spec);
        md.metadata.namespace = Some("demo".into());
        md.metadata.uid = Some(format!("uid-{name}"));
        md.metadata.generation = Some(3);
        md.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        md
    }

    fn deployment(status: DeploymentStatus) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(7);
        d.status = Some(status);
        d
    }

    fn find<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn the_first_created_holds_a_model_version_id() {
        let first = md("first", Some("shared"), "2026-01-01T00:00:00Z");
        let second = md("second", Some("shared"), "2026-02-01T00:00:00Z");
        let other = md("other", Some("other"), "2025-01-01T00:00:00Z");
        let all = [second.clone(), first.clone(), other.clone()];
        assert!(id_holder(&first, &all).is_none());
        assert_eq!(
            id_holder(&second, &all).map(|h| h.name_any()),
            Some("first".into())
        );
        assert!(id_holder(&other, &all).is_none());
    }

    #[test]
    fn a_conflict_is_degraded_and_not_ready_with_the_holder_named() {
        let second = md("second", Some("shared"), "2026-02-01T00:00:00Z");
        let blocked = Blocked::IdConflict {
            id: "shared".into(),
            holder: "demo/first".into(),
        };
        let status = model_deployment_status(&second, Some(&blocked), None);
        let degraded = find(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "IdConflict")
        );
        assert!(
            degraded.message.contains("demo/first"),
            "{}",
            degraded.message
        );
        assert_eq!(find(&status, READY).status, "False");
        assert_eq!(status.endpoint.as_deref(), Some("/models/shared/proxy/v1"));
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn a_rollout_progresses_until_every_replica_is_ready() {
        let md = md("m", None, "2026-01-01T00:00:00Z");
        let creating = model_deployment_status(&md, None, None);
        assert_eq!(find(&creating, PROGRESSING).reason, "Creating");
        assert_eq!(find(&creating, READY).reason, "NoReadyReplicas");
        assert_eq!(creating.model_version_id.as_deref(), Some("uid-m"));

        let half = deployment(DeploymentStatus {
            observed_generation: Some(7),
            replicas: Some(2),
            updated_replicas: Some(2),
            ready_replicas: Some(1),
            ..DeploymentStatus::default()
        });
        let status = model_deployment_status(&md, None, Some(&half));
        assert_eq!(find(&status, PROGRESSING).reason, "RollingOut");
        assert_eq!(find(&status, READY).status, "True");
        assert_eq!((status.replicas, status.ready_replicas), (2, 1));

        let full = deployment(DeploymentStatus {
            observed_generation: Some(7),
            replicas: Some(2),
            updated_replicas: Some(2),
            ready_replicas: Some(2),
            ..DeploymentStatus::default()
        });
        let status = model_deployment_status(&md, None, Some(&full));
        assert_eq!(find(&status, PROGRESSING).status, "False");
        assert_eq!(find(&status, DEGRADED).status, "False");

        let stale = deployment(DeploymentStatus {
            observed_generation: Some(6),
            ..full.status.clone().unwrap()
        });
        assert_eq!(
            find(
                &model_deployment_status(&md, None, Some(&stale)),
                PROGRESSING
            )
            .status,
            "True"
        );
    }

    #[test]
    fn a_stuck_rollout_is_degraded_with_the_deployments_words() {
        let md = md("m", None, "2026-01-01T00:00:00Z");
        let stuck = deployment(DeploymentStatus {
            conditions: Some(vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                message: Some("ReplicaSet \"m-5d4\" has timed out progressing.".into()),
                ..DeploymentCondition::default()
            }]),
            ..DeploymentStatus::default()
        });
        let degraded = find(&model_deployment_status(&md, None, Some(&stuck)), DEGRADED).clone();
        assert_eq!(degraded.reason, "RolloutFailed");
        assert!(degraded.message.contains("timed out progressing"));
        assert!(degraded.message.contains("kubectl get pods -n demo"));
    }

    #[test]
    fn transition_times_move_only_when_a_status_changes() {
        let md = md("m", None, "2026-01-01T00:00:00Z");
        let t1: Timestamp = "2026-11-25T10:00:00.75Z".parse().unwrap();
        let t2: Timestamp = "2026-11-25T11:00:00Z".parse().unwrap();
        let mut first = model_deployment_status(&md, None, None);
        stamp_transitions(&mut first.conditions, &[], t1);
        assert_eq!(
            find(&first, READY).last_transition_time.0,
            "2026-11-25T10:00:00Z".parse().unwrap()
        );

        let mut again = model_deployment_status(&md, None, None);
        stamp_transitions(&mut again.conditions, &first.conditions, t2);
        assert_eq!(again, first, "nothing changed, so nothing to write");

        let blocked = Blocked::InvalidSpec("spec.model.uri: bad".into());
        let mut broken = model_deployment_status(&md, Some(&blocked), None);
        stamp_transitions(&mut broken.conditions, &first.conditions, t2);
        assert_eq!(find(&broken, DEGRADED).last_transition_time.0, t2);
        assert_eq!(
            find(&broken, READY).last_transition_time.0,
            find(&first, READY).last_transition_time.0
        );
        let events = transitions(&first.conditions, &broken.conditions);
        assert!(
            events
                .iter()
                .any(|(warning, reason, _)| *warning && reason == "InvalidSpec")
        );
        assert!(transitions(&broken.conditions, &broken.conditions).is_empty());
    }

    #[test]
    fn token_readiness_names_what_is_wrong() {
        let unknown = vec!["llama".to_owned()];
        let c = access_token_ready(AccessTokenPhase::Active, None, &unknown, Some(1));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "UnknownModels")
        );
        assert!(c.message.contains("llama"));
        let c = access_token_ready(AccessTokenPhase::Active, None, &[], Some(1));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Issued"));
        let c = access_token_ready(AccessTokenPhase::Revoked, None, &[], Some(1));
        assert_eq!(c.reason, "Revoked");
        let c = access_token_ready(
            AccessTokenPhase::Invalid,
            Some(("SecretTaken", "Secret x exists".into())),
            &[],
            Some(1),
        );
        assert_eq!(c.reason, "SecretTaken");
    }
}
