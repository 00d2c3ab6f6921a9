//! The two controllers, wired to the API server: what they watch, the context they share, and
//! how a failed reconcile is retried.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::{AccessToken, ModelDeployment};
use futures::{FutureExt, StreamExt};
use internal_token::Schedule;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::desired::{MODEL_DEPLOYMENT_LABEL, RuntimeDefaults};
use crate::internal_keys::{self, PublicKeys};
use crate::telemetry::{Health, Metrics};
use crate::tokens::{ACCESS_TOKEN_NAME_LABEL, ACCESS_TOKEN_NAMESPACE_LABEL};
use crate::{access_tokens, model_deployments};

/// How the operator is configured (flags of `infergate-operator`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the proxy runs and the token records live.
    pub gateway_namespace: String,
    /// Reconcile only this namespace's resources; all namespaces when `None`.
    pub watch_namespace: Option<String>,
    pub runtime: RuntimeDefaults,
    /// When the proxy's signing key is replaced.
    pub key_schedule: Schedule,
    /// Names this replica in Events (the pod name in a cluster).
    pub instance: String,
    /// Where the autoscaler reads the proxies' load, and how often.
    pub autoscaler: crate::autoscaler::Settings,
    /// Where clients reach the proxy: the base URL of the published snippets.
    pub proxy_url: String,
}

/// Why a reconcile failed; it is retried with back-off.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Token(#[from] crds::TokenFormatError),
    #[error(
        "Secret {secret} in the gateway namespace: {0}; delete the Secret to start over with a new key",
        secret = crds::names::SIGNING_KEYS_SECRET
    )]
    SigningKeys(#[from] internal_token::KeysError),
    #[error(
        "Secret {secret} in the gateway namespace has no {key}; delete the Secret to start over with a new key",
        secret = crds::names::SIGNING_KEYS_SECRET,
        key = crds::names::SIGNING_KEYS_KEY
    )]
    SigningKeysMissing,
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Finalizer(_) => "finalizer",
            Error::Token(_) => "token",
            Error::SigningKeys(_) | Error::SigningKeysMissing => "signing_keys",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    /// Every ModelDeployment the operator sees: for id conflicts and to resolve token scopes.
    pub models: Store<ModelDeployment>,
    pub metrics: Metrics,
    /// The signing keys' public halves, for runtime pods.
    pub public_keys: PublicKeys,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Publishes an Event about `object`. Events are for people: failing to write one is
    /// logged, never a reason to fail the reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, object = %object.name_any(), reason, "could not publish an Event");
        }
    }
}

/// Delay before the `attempt`th retry of a failing object (1-based): 1 s doubling to 5 min,
/// so a broken object neither spins nor waits long once it is fixed.
pub fn backoff(attempt: u32) -> Duration {
    let seconds = 1u64
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(seconds.min(300))
}

fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let controller = K::kind(&()).to_lowercase();
    ctx.metrics.failed(&controller, error.kind());
    let attempt = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let attempt = failures.entry(key(object.as_ref())).or_insert(0);
        *attempt += 1;
        *attempt
    };
    let delay = backoff(attempt);
    tracing::warn!(%error, controller, object = %key(object.as_ref()), attempt, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Wraps a reconcile with metrics and the reset of its back-off.
async fn measured<K, F>(object: Arc<K>, ctx: Arc<Context>, reconcile: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: Future<Output = Result<Action, Error>>,
{
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics
        .reconciled(&K::kind(&()).to_lowercase(), started.elapsed());
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failures lock")
            .remove(&key(object.as_ref()));
    }
    result
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `shutdown` resolves. `health` turns ready once both caches are
/// filled.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let watched = config.watch_namespace.clone();
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=infergate-operator");

    let models_controller = Controller::new(
        api::<ModelDeployment>(&client, watched.as_deref()),
        watcher::Config::default(),
    )
    .owns(
        api::<Deployment>(&client, watched.as_deref()),
        managed.clone(),
    )
    .owns(api::<Service>(&client, watched.as_deref()), managed.clone())
    .owns(api::<NetworkPolicy>(&client, watched.as_deref()), managed);
    let models = models_controller.store();
    let claims = models.clone();
    // When the holder of an id goes, the next claimant of that id must be reconciled to take it.
    let models_controller = models_controller
        .watches(
            api::<ModelDeployment>(&client, watched.as_deref()),
            watcher::Config::default(),
            move |md| others_claiming(&claims, &md),
        )
        // Runtime pods belong to a ReplicaSet, not to the ModelDeployment: mapped by label, for
        // their download containers' outcomes (ModelFetched).
        .watches(
            api::<Pod>(&client, watched.as_deref()),
            watcher::Config::default().labels(MODEL_DEPLOYMENT_LABEL),
            |pod| {
                let name = pod.labels().get(MODEL_DEPLOYMENT_LABEL)?;
                Some(ObjectRef::<ModelDeployment>::new(name).within(&pod.namespace()?))
            },
        );

    let tokens_controller = Controller::new(
        api::<AccessToken>(&client, watched.as_deref()),
        watcher::Config::default(),
    );
    let tokens = tokens_controller.store();
    let tokens_controller = tokens_controller
        .watches(
            api::<ModelDeployment>(&client, watched.as_deref()),
            watcher::Config::default(),
            move |md| tokens_naming(&tokens, &md),
        )
        .watches(
            Api::<Secret>::namespaced(client.clone(), &config.gateway_namespace),
            watcher::Config::default().labels(&format!(
                "{}={}",
                crds::names::TOKEN_RECORD_LABEL,
                crds::names::TOKEN_RECORD_LABEL_VALUE
            )),
            |record| record_owner(&record),
        );

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: crate::apply::FIELD_MANAGER.to_owned(),
            instance: Some(config.instance.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client,
        config,
        models: models.clone(),
        metrics,
        public_keys: PublicKeys::default(),
        recorder,
        failures: Mutex::default(),
    });

    let shutdown = shutdown.shared();
    let models_run = models_controller
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |md, ctx| {
                measured(
                    md.clone(),
                    ctx.clone(),
                    model_deployments::reconcile(md, ctx),
                )
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let tokens_store = tokens_controller.store();
    let tokens_run = async {
        // Scopes resolve against the ModelDeployment cache: resolving before it is filled would
        // flap tokens to UnknownModels and back.
        let _ = models.wait_until_ready().await;
        tokens_controller
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |at, ctx| measured(at.clone(), ctx.clone(), access_tokens::reconcile(at, ctx)),
                error_policy,
                ctx.clone(),
            )
            .for_each(|_| async {})
            .await;
    };
    let readiness = async {
        let filled = models.wait_until_ready().await.is_ok()
            && tokens_store.wait_until_ready().await.is_ok();
        health.set_ready(filled);
    };
    let keys = async {
        // Published keys go to every namespace with a ModelDeployment: wait to know them all.
        let _ = models.wait_until_ready().await;
        let schedule = ctx.config.key_schedule;
        tokio::select! {
            () = internal_keys::maintain(ctx.clone(), schedule) => {}
            _ = shutdown.clone() => {}
        }
    };
    let autoscale = async {
        let _ = models.wait_until_ready().await;
        tokio::select! {
            () = crate::autoscaler::run(ctx.clone(), models.clone()) => {}
            _ = shutdown.clone() => {}
        }
    };
    futures::join!(models_run, tokens_run, readiness, keys, autoscale);
}

/// The other ModelDeployments that claim `md`'s model version id.
fn others_claiming(
    models: &Store<ModelDeployment>,
    md: &ModelDeployment,
) -> Vec<ObjectRef<ModelDeployment>> {
    let id = md.model_version_id();
    models
        .state()
        .iter()
        .filter(|other| other.uid() != md.uid() && other.model_version_id() == id)
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

/// The AccessTokens in `md`'s namespace whose `spec.models` names it.
fn tokens_naming(tokens: &Store<AccessToken>, md: &ModelDeployment) -> Vec<ObjectRef<AccessToken>> {
    let name = md.name_any();
    tokens
        .state()
        .iter()
        .filter(|at| at.namespace() == md.namespace() && at.spec.models.contains(&name))
        .map(|at| ObjectRef::from_obj(at.as_ref()))
        .collect()
}

/// The AccessToken a record Secret belongs to, from its labels (a record lives in another
/// namespace, so no owner reference can say it).
fn record_owner(record: &Secret) -> Option<ObjectRef<AccessToken>> {
    let labels = record.labels();
    Some(
        ObjectRef::new(labels.get(ACCESS_TOKEN_NAME_LABEL)?)
            .within(labels.get(ACCESS_TOKEN_NAMESPACE_LABEL)?),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_from_a_second_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 64, u32::MAX]
            .into_iter()
            .map(|a| backoff(a).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300, 300]);
    }
}
