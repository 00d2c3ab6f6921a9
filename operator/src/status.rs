//! The status the operator reports, as pure functions of what it observed: conditions that
//! follow the Kubernetes API conventions (`Ready`, `Progressing`, `Degraded`, each with a reason
//! and a message a person can act on) and the events worth telling a person about.

use crds::names::model_endpoint;
use crds::{AccessTokenPhase, ModelDeployment, ModelDeploymentStatus};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::desired::pod_selector;

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
/// Whether the runtime pods got the model's files (downloaded sources only): each pod's
/// download container writes one line, `REASON: what happened`, as its termination message.
pub const MODEL_FETCHED: &str = "ModelFetched";
/// On AccessTokens of a rotation (`infergate token rotate`): which replaces which, and until when
/// both are valid.
pub const ROTATED: &str = "Rotated";
/// The init container that fetches a downloaded model (see desired.rs).
const DOWNLOAD_CONTAINER: &str = "download";

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

/// A download container's outcome line, split into its reason and the rest. A crash's log
/// tail (the fallback message) has no reason of its own.
fn outcome_line(terminated: &ContainerStateTerminated) -> (String, String) {
    let message = terminated.message.as_deref().unwrap_or_default();
    let line = message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    match line.split_once(": ") {
        Some((reason, rest))
            if !reason.is_empty() && reason.chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            (reason.to_owned(), rest.to_owned())
        }
        _ if line.is_empty() => (
            "FetchFailed".to_owned(),
            format!(
                "the download container exited with code {} and no message",
                terminated.exit_code
            ),
        ),
        _ => ("FetchFailed".to_owned(), line.to_owned()),
    }
}

/// Failures that a retry of the pod can fix by itself; the others need a person.
fn transient_fetch_failure(reason: &str) -> bool {
    matches!(reason, "StoreUnreachable" | "ObjectChanged")
}

/// `ModelFetched` from the pods' download containers: False while any pod's last attempt
/// failed (naming the pod and what to fix), True once they have the files (naming where from:
/// downloaded, or the node cache), Unknown while the first download runs.
pub fn model_fetched(pods: &[Pod], generation: Option<i64>) -> Option<Condition> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut running = Vec::new();
    for pod in pods {
        let Some(download) = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|statuses| statuses.iter().find(|c| c.name == DOWNLOAD_CONTAINER))
        else {
            continue;
        };
        let current = download.state.as_ref().and_then(|s| s.terminated.as_ref());
        let last = download
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref());
        match (current, last) {
            (Some(done_now), _) if done_now.exit_code == 0 => done.push((pod, done_now)),
            (Some(failure), _) => failed.push((pod, failure)),
            (None, Some(failure)) if failure.exit_code != 0 => failed.push((pod, failure)),
            _ => running.push(pod),
        }
    }
    let newest_first = |items: &mut Vec<(&Pod, &ContainerStateTerminated)>| {
        items.sort_by(|a, b| {
            b.1.finished_at
                .as_ref()
                .map(|t| t.0)
                .cmp(&a.1.finished_at.as_ref().map(|t| t.0))
        });
    };
    newest_first(&mut done);
    newest_first(&mut failed);
    if let Some((pod, failure)) = failed.first() {
        let (reason, rest) = outcome_line(failure);
        let others = match failed.len() - 1 {
            0 => String::new(),
            n => format!(" ({n} more pods failing)"),
        };
        return Some(condition(
            MODEL_FETCHED,
            false,
            &reason,
            format!("pod {}: {rest}{others}", pod.name_any()),
            generation,
        ));
    }
    if let Some((_, newest)) = done.first() {
        let (reason, _) = outcome_line(newest);
        let lines: Vec<String> = done
            .iter()
            .take(4)
            .map(|(pod, terminated)| {
                let (reason, rest) = outcome_line(terminated);
                format!("pod {}: {reason}: {rest}", pod.name_any())
            })
            .collect();
        return Some(condition(
            MODEL_FETCHED,
            true,
            &reason,
            lines.join("; "),
            generation,
        ));
    }
    running.first().map(|pod| {
        condition(
            MODEL_FETCHED,
            false,
            "Fetching",
            format!("pod {} is fetching the model", pod.name_any()),
            generation,
        )
    })
}

/// The status of `md`, given why it is blocked (if it is), its Deployment as last read and its
/// runtime pods. `lastTransitionTime`s are left for [`stamp_transitions`].
pub fn model_deployment_status(
    md: &ModelDeployment,
    blocked: Option<&Blocked>,
    deployment: Option<&Deployment>,
    pods: &[Pod],
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

    let downloaded = md.spec.model.parsed_uri().is_ok_and(|uri| {
        matches!(
            uri,
            crds::ModelUri::Https { .. } | crds::ModelUri::Remote { .. }
        )
    });
    let fetched = if downloaded {
        model_fetched(pods, generation)
    } else {
        None
    };
    let fetch_failure = fetched.as_ref().filter(|c| {
        c.status == "False" && c.reason != "Fetching" && !transient_fetch_failure(&c.reason)
    });
    let degraded = match (blocked, deployment.and_then(rollout_failure)) {
        (None, None) if fetch_failure.is_some() => {
            let failure = fetch_failure.expect("checked");
            condition(
                DEGRADED,
                true,
                &failure.reason,
                format!("{}; the pod retries with back-off", failure.message),
                generation,
            )
        }
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
        (None, 0) if desired == 0 && md.spec.autoscaling.is_some() => condition(
            READY,
            true,
            "ScaledToZero",
            format!(
                "no runtime pod while idle; the proxy holds the next request while one starts; serving at {}",
                model_endpoint(id.as_deref().unwrap_or_default())
            ),
            generation,
        ),
        (None, 0) if desired == 0 => condition(
            READY,
            false,
            "ScaledToZero",
            "spec.replicas is 0: no runtime pod runs and requests are refused".to_owned(),
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
        selector: Some(pod_selector(&md.name_any())),
        // Set by the reconcile once the ConfigMap is written.
        snippets_config_map: None,
        // The autoscaler's own field, which this field manager never writes.
        autoscaling: None,
        observed_generation: generation,
        conditions: [ready_condition, progressing, degraded]
            .into_iter()
            .chain(fetched)
            .collect(),
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

/// The `Rotated` condition of an AccessToken that a rotation replaced (valid until
/// `expires_at`) or that replaces another; `None` for a token outside any rotation.
pub fn token_rotation(
    token: &crds::AccessToken,
    expires_at: Option<Timestamp>,
    generation: Option<i64>,
) -> Option<Condition> {
    use crds::names::{ROTATED_FROM_ANNOTATION, ROTATED_TO_ANNOTATION};
    let annotations = token.annotations();
    if let Some(successor) = annotations.get(ROTATED_TO_ANNOTATION) {
        let until = expires_at.map_or_else(|| "its expiry".to_owned(), |at| at.to_string());
        return Some(condition(
            ROTATED,
            true,
            "ReplacedByRotation",
            format!(
                "replaced by AccessToken {successor}; both are valid until {until}, when the proxy starts refusing this one"
            ),
            generation,
        ));
    }
    annotations.get(ROTATED_FROM_ANNOTATION).map(|predecessor| {
        condition(
            ROTATED,
            true,
            "ReplacesRotated",
            format!(
                "replaces AccessToken {predecessor}, which stays valid until its grace period ends (see its status)"
            ),
            generation,
        )
    })
}

/// A change of a condition that a person should see as an Event: (warning?, reason, message).
pub fn transitions(previous: &[Condition], current: &[Condition]) -> Vec<(bool, String, String)> {
    current
        .iter()
        .filter(|c| {
            c.type_ == READY
                || c.type_ == ROTATED
                || (c.type_ == DEGRADED && c.status == "True")
                || (c.type_ == MODEL_FETCHED && c.reason != "Fetching")
        })
        .filter(|c| {
            !previous
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
        })
        .map(|c| {
            let warning = (c.type_ == DEGRADED)
                || (c.type_ == MODEL_FETCHED && c.status == "False")
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
        let status = model_deployment_status(&second, Some(&blocked), None, &[]);
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
        let creating = model_deployment_status(&md, None, None, &[]);
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
        let status = model_deployment_status(&md, None, Some(&half), &[]);
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
        let status = model_deployment_status(&md, None, Some(&full), &[]);
        assert_eq!(find(&status, PROGRESSING).status, "False");
        assert_eq!(find(&status, DEGRADED).status, "False");

        let stale = deployment(DeploymentStatus {
            observed_generation: Some(6),
            ..full.status.clone().unwrap()
        });
        assert_eq!(
            find(
                &model_deployment_status(&md, None, Some(&stale), &[]),
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
        let degraded = find(
            &model_deployment_status(&md, None, Some(&stuck), &[]),
            DEGRADED,
        )
        .clone();
        assert_eq!(degraded.reason, "RolloutFailed");
        assert!(degraded.message.contains("timed out progressing"));
        assert!(degraded.message.contains("kubectl get pods -n demo"));
    }

    #[test]
    fn transition_times_move_only_when_a_status_changes() {
        let md = md("m", None, "2026-01-01T00:00:00Z");
        let t1: Timestamp = "2026-11-25T10:00:00.75Z".parse().unwrap();
        let t2: Timestamp = "2026-11-25T11:00:00Z".parse().unwrap();
        let mut first = model_deployment_status(&md, None, None, &[]);
        stamp_transitions(&mut first.conditions, &[], t1);
        assert_eq!(
            find(&first, READY).last_transition_time.0,
            "2026-11-25T10:00:00Z".parse().unwrap()
        );

        let mut again = model_deployment_status(&md, None, None, &[]);
        stamp_transitions(&mut again.conditions, &first.conditions, t2);
        assert_eq!(again, first, "nothing changed, so nothing to write");

        let blocked = Blocked::InvalidSpec("spec.model.uri: bad".into());
        let mut broken = model_deployment_status(&md, Some(&blocked), None, &[]);
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

    /// A runtime pod whose download container's status has the fields of `download`.
    fn pod(name: &str, download: serde_json::Value) -> Pod {
        let mut status = serde_json::json!(
            {"name": "download", "image": "r", "imageID": "", "ready": false, "restartCount": 1}
        );
        let fields = download.as_object().unwrap().clone();
        status.as_object_mut().unwrap().extend(fields);
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo"},
            "status": {"initContainerStatuses": [status]}
        }))
        .unwrap()
    }

    fn terminated(code: i32, message: &str, finished: &str) -> serde_json::Value {
        serde_json::json!({"terminated": {"exitCode": code, "message": message, "finishedAt": finished}})
    }

    fn s3_model() -> ModelDeployment {
        let mut md = md("m", None, "2026-01-01T00:00:00Z");
        md.spec.model.uri = "s3://models/minilm".into();
        md
    }

    #[test]
    fn model_fetched_says_where_each_pods_files_came_from() {
        let pods = [
            pod(
                "m-a",
                serde_json::json!({"state": terminated(0, "Downloaded: s3://models/minilm: 5 files, 90.9 MB downloaded in 1.2 s", "2026-12-05T10:00:00Z")}),
            ),
            pod(
                "m-b",
                serde_json::json!({"state": terminated(0, "CacheHit: s3://models/minilm: 5 files, 90.9 MB from the node cache", "2026-12-05T10:00:05Z")}),
            ),
        ];
        let status = model_deployment_status(&s3_model(), None, None, &pods);
        let fetched = find(&status, MODEL_FETCHED);
        assert_eq!(
            (fetched.status.as_str(), fetched.reason.as_str()),
            ("True", "CacheHit")
        );
        assert_eq!(
            fetched.message,
            "pod m-b: CacheHit: s3://models/minilm: 5 files, 90.9 MB from the node cache; \
             pod m-a: Downloaded: s3://models/minilm: 5 files, 90.9 MB downloaded in 1.2 s"
        );
        assert_eq!(find(&status, DEGRADED).status, "False");
    }

    #[test]
    fn a_failed_download_is_named_in_model_fetched_and_degraded_while_the_pod_retries() {
        let refused = "CredentialsRefused: s3://models/minilm: the store refused the credentials (HTTP 403 SignatureDoesNotMatch); check the keys in Secret keys";
        let pods = [
            pod(
                "m-a",
                serde_json::json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": terminated(1, refused, "2026-12-05T10:00:00Z")}),
            ),
            pod("m-b", serde_json::json!({"state": {"running": {}}})),
        ];
        let previous = model_deployment_status(&s3_model(), None, None, &[]);
        let status = model_deployment_status(&s3_model(), None, None, &pods);
        let fetched = find(&status, MODEL_FETCHED);
        assert_eq!(
            (fetched.status.as_str(), fetched.reason.as_str()),
            ("False", "CredentialsRefused")
        );
        assert!(
            fetched
                .message
                .starts_with("pod m-a: s3://models/minilm: the store refused"),
            "{}",
            fetched.message
        );
        let degraded = find(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "CredentialsRefused")
        );
        let events = transitions(&previous.conditions, &status.conditions);
        assert!(
            events
                .iter()
                .any(|(warning, reason, _)| *warning && reason == "CredentialsRefused")
        );

        let unreachable =
            "StoreUnreachable: s3://models/minilm: cannot reach the store (connection refused)";
        let pods = [pod(
            "m-a",
            serde_json::json!({"state": {"running": {}}, "lastState": terminated(1, unreachable, "2026-12-05T10:00:00Z")}),
        )];
        let status = model_deployment_status(&s3_model(), None, None, &pods);
        assert_eq!(find(&status, MODEL_FETCHED).reason, "StoreUnreachable");
        assert_eq!(
            find(&status, DEGRADED).status,
            "False",
            "a retry may fix an unreachable store"
        );
    }

    #[test]
    fn a_crash_without_an_outcome_line_shows_its_last_log_line() {
        let pods = [pod(
            "m-a",
            serde_json::json!({"state": {"running": {}}, "lastState": terminated(101, "thread main panicked\nat weights/src/lib.rs:10", "2026-12-05T10:00:00Z")}),
        )];
        let fetched = model_fetched(&pods, None).unwrap();
        assert_eq!(fetched.reason, "FetchFailed");
        assert_eq!(fetched.message, "pod m-a: at weights/src/lib.rs:10");
        let running = [pod("m-a", serde_json::json!({"state": {"running": {}}}))];
        assert_eq!(model_fetched(&running, None).unwrap().reason, "Fetching");
        let local =
            model_deployment_status(&md("m", None, "2026-01-01T00:00:00Z"), None, None, &pods);
        assert!(
            local.conditions.iter().all(|c| c.type_ != MODEL_FETCHED),
            "a model on a volume is not fetched"
        );
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
