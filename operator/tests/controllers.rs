//! The controllers against a real Kubernetes API over HTTPS: the cluster test bed
//! (`e2e/cluster/up.sh`), or any cluster whose kubeconfig `INFERGATE_TEST_KUBECONFIG` names (the
//! kind job). Each test runs its own operator in-process, scoped to a fresh namespace with its
//! own gateway namespace, so tests run side by side.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use crds::names::{TOKEN_RECORD_KEY, TOKEN_SECRET_KEY};
use crds::{AccessToken, AccessTokenPhase, ModelDeployment, Token, TokenRecord};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use operator::controller::{self, Config as OperatorConfig};
use operator::desired::RuntimeDefaults;
use operator::lease::{LeaderLease, Timing};
use operator::telemetry::{Health, Metrics};
use tokio::sync::oneshot;

fn cluster() -> &'static e2e::TestBed {
    e2e::test_bed()
}

fn kubectl(args: &[&str]) -> std::process::Output {
    cluster().kubectl(args, None)
}

/// Counts the requests that change something: every method but GET (lists and watches are GETs).
#[derive(Clone, Default)]
struct WriteCounter(Arc<AtomicUsize>);

impl<S> tower::Layer<S> for WriteCounter {
    type Service = CountWrites<S>;
    fn layer(&self, inner: S) -> CountWrites<S> {
        CountWrites {
            inner,
            writes: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct CountWrites<S> {
    inner: S,
    writes: Arc<AtomicUsize>,
}

impl<S, B> tower::Service<http::Request<B>> for CountWrites<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, request: http::Request<B>) -> S::Future {
        if request.method() != http::Method::GET {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.call(request)
    }
}

async fn config(impersonate: Option<&str>) -> Config {
    let kubeconfig = Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    if let Some(user) = impersonate {
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ]);
    }
    config
}

async fn admin() -> Client {
    Client::try_from(config(None).await).unwrap()
}

async fn counting_client(writes: &WriteCounter) -> Client {
    ClientBuilder::try_from(config(None).await)
        .unwrap()
        .with_layer(writes)
        .build()
}

fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

async fn create_namespace(client: &Client, name: &str) {
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {}
        Err(error) => panic!("creating namespace {name}: {error}"),
    }
}

/// An operator running in this process for one test.
struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
}

impl Operator {
    async fn start(client: Client, namespace: &str, gateway: &str) -> Operator {
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics = Metrics::new();
        let config = OperatorConfig {
            gateway_namespace: gateway.to_owned(),
            watch_namespace: Some(namespace.to_owned()),
            runtime: RuntimeDefaults {
                image: "infergate/runtime:test".into(),
                ..RuntimeDefaults::default()
            },
            key_schedule: internal_token::Schedule {
                period: Duration::from_secs(24 * 3600),
                activation: Duration::from_secs(1),
            },
            instance: "test".into(),
            autoscaler: operator::autoscaler::Settings::default(),
            proxy_url: "https://inference.example.com".into(),
        };
        let health = Arc::new(Health::default());
        let task = tokio::spawn(controller::run(
            client,
            config,
            metrics.clone(),
            health,
            async {
                let _ = stopped.await;
            },
        ));
        Operator {
            stop: Some(stop),
            task,
            metrics,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the controllers stop on shutdown")
            .unwrap();
    }
}

/// A test's namespaces and running operator.
struct Scene {
    client: Client,
    namespace: String,
    gateway: String,
    /// Whether the gateway namespace is this test's alone (and so deleted with it).
    own_gateway: bool,
    operator: Option<Operator>,
}

impl Scene {
    async fn new(tag: &str) -> Scene {
        let client = admin().await;
        let namespace = unique(tag);
        let gateway = format!("{namespace}-gw");
        create_namespace(&client, &namespace).await;
        create_namespace(&client, &gateway).await;
        let operator = Operator::start(client.clone(), &namespace, &gateway).await;
        Scene {
            client,
            namespace,
            gateway,
            own_gateway: true,
            operator: Some(operator),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn records(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.gateway)
    }

    async fn create_model(&self, name: &str, spec: serde_json::Value) -> ModelDeployment {
        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "infergate.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.api()
            .create(&PostParams::default(), &md)
            .await
            .unwrap()
    }

    async fn create_token(&self, name: &str, spec: serde_json::Value) -> AccessToken {
        let at: AccessToken = serde_json::from_value(serde_json::json!({
            "apiVersion": "infergate.dev/v1alpha1", "kind": "AccessToken",
            "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.api()
            .create(&PostParams::default(), &at)
            .await
            .unwrap()
    }

    async fn merge_spec<K>(&self, name: &str, spec: serde_json::Value)
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        self.api::<K>()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// The token's record, once its status says `phase`.
    async fn token_in_phase(&self, name: &str, phase: AccessTokenPhase) -> AccessToken {
        eventually(
            &format!("AccessToken {name} in phase {phase:?}"),
            || async {
                let at = self.api::<AccessToken>().get(name).await.ok()?;
                (at.status.as_ref()?.phase == Some(phase)).then_some(at)
            },
        )
        .await
    }

    async fn record_of(&self, token: &AccessToken) -> Option<TokenRecord> {
        let secret = self
            .records()
            .get_opt(&format!("token-record-{}", token.uid().unwrap()))
            .await
            .unwrap()?;
        Some(TokenRecord::from_json(&secret.data.unwrap()[TOKEN_RECORD_KEY].0).unwrap())
    }

    /// Deletes what the test made while the operator still runs (AccessTokens hold a finalizer
    /// that only it removes), then stops it and deletes the namespaces.
    async fn finish(mut self) {
        let tokens = self.api::<AccessToken>();
        tokens
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        eventually("AccessTokens gone", || async {
            tokens
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await;
        self.operator.take().unwrap().stop().await;
        let gateway = self.own_gateway.then_some(&self.gateway);
        for namespace in std::iter::once(&self.namespace).chain(gateway) {
            Api::<Namespace>::all(self.client.clone())
                .delete(namespace, &DeleteParams::default())
                .await
                .unwrap();
        }
    }
}

/// Polls `probe` every 50 ms until it yields a value; panics after 20 s.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"))
}

async fn events_for(scene: &Scene, name: &str) -> Vec<Event> {
    scene
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

fn model_spec(id: &str) -> serde_json::Value {
    serde_json::json!({"task": "embedding", "model": {"uri": "file:///models/minilm"}, "modelVersionId": id})
}

/// The key ids of the JWK set the ConfigMap in the scene's namespace publishes.
async fn published_kids(scene: &Scene) -> Option<Vec<String>> {
    let config_map = scene
        .api::<ConfigMap>()
        .get_opt(crds::names::VERIFYING_KEYS_CONFIG_MAP)
        .await
        .ok()??;
    let jwks: serde_json::Value =
        serde_json::from_str(&config_map.data?[crds::names::VERIFYING_KEYS_KEY]).ok()?;
    Some(
        jwks["keys"]
            .as_array()?
            .iter()
            .filter_map(|key| key["kid"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// The signing keys in the scene's gateway namespace, with the Secret's annotations.
async fn signing_keys(
    scene: &Scene,
) -> Option<(
    internal_token::SigningKeys,
    std::collections::BTreeMap<String, String>,
)> {
    let secret = scene
        .records()
        .get_opt(crds::names::SIGNING_KEYS_SECRET)
        .await
        .ok()??;
    let keys =
        internal_token::SigningKeys::parse(&secret.data.as_ref()?[crds::names::SIGNING_KEYS_KEY].0)
            .ok()?;
    Some((keys, secret.annotations().clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_is_made_published_to_runtimes_guarded_and_rotated_when_asked() {
    let scene = Scene::new("keys").await;
    scene
        .create_model("minilm", model_spec("minilm-keys"))
        .await;
    let (keys, _) = eventually("the signing key Secret", || signing_keys(&scene)).await;
    assert_eq!(keys.keys.len(), 1);
    let first = keys.keys[0].kid.clone();
    // The public half, in the model's namespace, before its pods need it.
    let published = eventually("the public keys ConfigMap", || published_kids(&scene)).await;
    assert_eq!(published, std::slice::from_ref(&first));
    let policy = eventually("the NetworkPolicy", || async {
        scene.api::<NetworkPolicy>().get_opt("minilm").await.ok()?
    })
    .await;
    assert_eq!(
        policy.spec.unwrap().policy_types,
        Some(vec!["Ingress".to_owned()])
    );

    // Asked for by annotation: a second key, published to the runtimes as well, and the
    // request recorded so that it is done once.
    scene
        .records()
        .patch(
            crds::names::SIGNING_KEYS_SECRET,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                crds::names::ROTATE_ANNOTATION: "now"
            }}})),
        )
        .await
        .unwrap();
    let (keys, annotations) = eventually("a rotation", || async {
        signing_keys(&scene)
            .await
            .filter(|(keys, _)| keys.keys.len() == 2)
    })
    .await;
    assert_eq!(
        annotations.get(operator::internal_keys::ROTATED_FOR_ANNOTATION),
        Some(&"now".to_owned())
    );
    let kids: Vec<String> = keys.keys.iter().map(|key| key.kid.clone()).collect();
    assert_eq!(kids[0], first);
    assert_eq!(published_kids(&scene).await.unwrap(), kids);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        signing_keys(&scene).await.unwrap().0.keys.len(),
        2,
        "one request, one rotation; the old key still verifies"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_deployment_becomes_a_deployment_and_service_and_follows_updates() {
    let scene = Scene::new("md").await;
    let md = scene.create_model("minilm", model_spec("minilm-v1")).await;

    let deployment = eventually("the runtime Deployment", || async {
        scene.api::<Deployment>().get_opt("minilm").await.unwrap()
    })
    .await;
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ModelDeployment", md.uid().unwrap().as_str())
    );
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("infergate/runtime:test")
    );
    let ours: Vec<_> = deployment
        .managed_fields()
        .iter()
        .filter(|f| f.manager.as_deref() == Some("infergate-operator"))
        .map(|f| f.operation.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        ours,
        ["Apply"],
        "the operator writes with server-side apply, one field manager"
    );
    let service = scene.api::<Service>().get("minilm").await.unwrap();
    assert_eq!(service.owner_references()[0].uid, md.uid().unwrap());

    let status = eventually("the ModelDeployment's status", || async {
        let md = scene.api::<ModelDeployment>().get("minilm").await.ok()?;
        md.status.filter(|s| !s.conditions.is_empty())
    })
    .await;
    assert_eq!(status.model_version_id.as_deref(), Some("minilm-v1"));
    assert_eq!(
        status.endpoint.as_deref(),
        Some("/models/minilm-v1/proxy/v1")
    );
    assert_eq!(status.observed_generation, md.metadata.generation);
    // Client code for the deployment, published beside it for people without the plugin.
    assert_eq!(
        status.snippets_config_map.as_deref(),
        Some("minilm-snippets")
    );
    let snippets = scene
        .api::<ConfigMap>()
        .get("minilm-snippets")
        .await
        .unwrap();
    assert_eq!(snippets.owner_references()[0].uid, md.uid().unwrap());
    let data = snippets.data.unwrap();
    let files: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        files,
        [
            "curl.sh",
            "huggingface.py",
            "javascript.mjs",
            "openai-node.mjs",
            "openai-python.py",
            "python.py",
            "requestTimeoutSeconds",
            "url",
        ]
    );
    assert_eq!(data["url"], "https://inference.example.com");
    assert_eq!(data["requestTimeoutSeconds"], "120");
    assert!(
        data["python.py"].contains("\"https://inference.example.com/models/minilm-v1/proxy/v1\""),
        "{}",
        data["python.py"]
    );
    // The test bed schedules no pods (no node agent yet): the rollout stays in progress.
    let ready = condition(&status.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoReadyReplicas")
    );
    assert_eq!(condition(&status.conditions, "Progressing").status, "True");
    assert_eq!(condition(&status.conditions, "Degraded").status, "False");
    let applied = eventually("an Applied event", || async {
        let events = events_for(&scene, "minilm").await;
        events
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Applied"))
    })
    .await;
    assert_eq!(applied.type_.as_deref(), Some("Normal"));

    scene
        .merge_spec::<ModelDeployment>(
            "minilm",
            serde_json::json!({"replicas": 3, "runtime": {"image": "infergate/runtime:next"}, "timeouts": {"default": "300s"}}),
        )
        .await;
    eventually("the Deployment following the new spec", || async {
        let d = scene.api::<Deployment>().get("minilm").await.ok()?;
        let spec = d.spec?;
        let image = spec.template.spec?.containers[0].image.clone();
        (spec.replicas == Some(3) && image.as_deref() == Some("infergate/runtime:next"))
            .then_some(())
    })
    .await;
    eventually("the status of generation 2", || async {
        let md = scene.api::<ModelDeployment>().get("minilm").await.ok()?;
        (md.status?.observed_generation == Some(2)).then_some(())
    })
    .await;
    eventually("the snippets sending the new default deadline", || async {
        let snippets = scene.api::<ConfigMap>().get("minilm-snippets").await.ok()?;
        (snippets.data?["requestTimeoutSeconds"] == "300").then_some(())
    })
    .await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_claim_on_a_model_version_id_is_degraded_until_the_first_goes() {
    let scene = Scene::new("conflict").await;
    scene.create_model("first", model_spec("shared-id")).await;
    eventually("the first runtime", || async {
        scene.api::<Deployment>().get_opt("first").await.unwrap()
    })
    .await;
    scene.create_model("second", model_spec("shared-id")).await;
    let status = eventually("the second degraded", || async {
        let md = scene.api::<ModelDeployment>().get("second").await.ok()?;
        md.status.filter(|s| !s.conditions.is_empty())
    })
    .await;
    let degraded = condition(&status.conditions, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "IdConflict")
    );
    assert!(
        degraded
            .message
            .contains(&format!("{}/first", scene.namespace)),
        "{}",
        degraded.message
    );
    assert!(
        scene
            .api::<Deployment>()
            .get_opt("second")
            .await
            .unwrap()
            .is_none(),
        "a loser gets no runtime pods"
    );
    let warning = eventually("an IdConflict warning event", || async {
        events_for(&scene, "second")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("IdConflict"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));

    scene
        .api::<ModelDeployment>()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the second taking the id over", || async {
        scene.api::<Deployment>().get_opt("second").await.unwrap()
    })
    .await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_is_issued_once_and_its_record_follows_the_spec() {
    let scene = Scene::new("token").await;
    scene.create_model("minilm", model_spec("minilm-v1")).await;
    scene
        .create_token(
            "app",
            serde_json::json!({"models": ["minilm", "later"], "secretName": "app-credentials"}),
        )
        .await;
    let token = scene.token_in_phase("app", AccessTokenPhase::Active).await;
    let status = token.status.clone().unwrap();
    let user_secret = scene.api::<Secret>().get("app-credentials").await.unwrap();
    let plaintext = std::str::from_utf8(&user_secret.data.as_ref().unwrap()[TOKEN_SECRET_KEY].0)
        .unwrap()
        .to_owned();
    let plaintext = Token::parse(&plaintext).expect("a well-formed token");
    assert_eq!(
        status.token_prefix.as_deref(),
        Some(plaintext.display_prefix())
    );
    assert_eq!(status.secret_name.as_deref(), Some("app-credentials"));
    assert_eq!(user_secret.owner_references()[0].uid, token.uid().unwrap());
    let ready = condition(&status.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "UnknownModels")
    );
    assert!(ready.message.contains("later"));

    let record = scene
        .record_of(&token)
        .await
        .expect("a record in the gateway namespace");
    assert_eq!(record.sha256, plaintext.sha256_hex());
    assert_eq!(record.models, ["minilm-v1"]);
    assert_eq!(record.name, format!("{}/app", scene.namespace));
    assert!(!record.revoked && record.expires_at.is_none());

    // A model created later joins the scope; the token itself is never issued again.
    scene.create_model("later", model_spec("later-v1")).await;
    eventually("the record gaining the new model", || async {
        let record = scene.record_of(&token).await?;
        (record.models == ["minilm-v1", "later-v1"]).then_some(())
    })
    .await;
    let again = scene.api::<Secret>().get("app-credentials").await.unwrap();
    assert_eq!(
        again.data, user_secret.data,
        "the plaintext is written once"
    );

    scene
        .merge_spec::<AccessToken>("app", serde_json::json!({"revoked": true}))
        .await;
    let revoked_at = Instant::now();
    eventually("the record revoked", || async {
        scene.record_of(&token).await?.revoked.then_some(())
    })
    .await;
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "revocation reached the record in {took:?}"
    );
    scene.token_in_phase("app", AccessTokenPhase::Revoked).await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_turns_expired_on_time() {
    let scene = Scene::new("expiry").await;
    scene.create_model("minilm", model_spec("minilm-exp")).await;
    scene
        .create_token(
            "short",
            serde_json::json!({"models": ["minilm"], "ttl": "3s"}),
        )
        .await;
    let token = scene
        .token_in_phase("short", AccessTokenPhase::Active)
        .await;
    let status = token.status.clone().unwrap();
    let issued = status.issued_at.unwrap().0;
    let expires = status.expires_at.unwrap().0;
    assert_eq!(expires.duration_since(issued).as_secs(), 3);
    assert_eq!(
        scene.record_of(&token).await.unwrap().expires_at,
        Some(expires)
    );

    let expired = scene
        .token_in_phase("short", AccessTokenPhase::Expired)
        .await;
    let late = jiff::Timestamp::now().duration_since(expires);
    assert!(
        late.as_secs_f64() < 1.5,
        "Expired {late:?} after the expiry"
    );
    let ready = condition(&expired.status.unwrap().conditions, "Ready").clone();
    assert_eq!(ready.reason, "Expired");
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_access_token_deletes_its_record_through_the_finalizer() {
    let scene = Scene::new("delete").await;
    scene.create_model("minilm", model_spec("minilm-del")).await;
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    scene
        .create_token(
            "own",
            serde_json::json!({"models": ["minilm"], "tokenHash": format!("sha256:{digest}")}),
        )
        .await;
    let token = scene.token_in_phase("own", AccessTokenPhase::Active).await;
    assert!(
        token
            .finalizers()
            .iter()
            .any(|f| f == "infergate.dev/token-record")
    );
    assert_eq!(scene.record_of(&token).await.unwrap().sha256, digest);
    let status = token.status.clone().unwrap();
    assert_eq!(
        (status.token_prefix, status.secret_name),
        (None, None),
        "a brought token is never seen"
    );
    assert!(
        scene
            .api::<Secret>()
            .get_opt("own-token")
            .await
            .unwrap()
            .is_none()
    );

    scene
        .api::<AccessToken>()
        .delete("own", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the record and the AccessToken gone", || async {
        let record_gone = scene.record_of(&token).await.is_none();
        let token_gone = scene
            .api::<AccessToken>()
            .get_opt("own")
            .await
            .unwrap()
            .is_none();
        (record_gone && token_gone).then_some(())
    })
    .await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_is_not_the_tokens_own_is_never_overwritten() {
    let scene = Scene::new("taken").await;
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "taken"}, "stringData": {"token": "someone else's"}
    }))
    .unwrap();
    scene
        .api::<Secret>()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    scene
        .create_token(
            "app",
            serde_json::json!({"models": ["minilm"], "secretName": "taken"}),
        )
        .await;
    let token = scene.token_in_phase("app", AccessTokenPhase::Invalid).await;
    let ready = condition(&token.status.as_ref().unwrap().conditions, "Ready").clone();
    assert_eq!(ready.reason, "SecretTaken");
    assert!(ready.message.contains("spec.secretName"));
    let secret = scene.api::<Secret>().get("taken").await.unwrap();
    assert_eq!(secret.data.unwrap()["token"].0, b"someone else's");
    assert!(scene.record_of(&token).await.is_none());
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_changed_a_restarted_operator_writes_nothing() {
    let mut scene = Scene::new("idem").await;
    scene
        .create_model("minilm", model_spec("minilm-idem"))
        .await;
    scene
        .create_token("app", serde_json::json!({"models": ["minilm"]}))
        .await;
    scene
        .create_token(
            "later",
            serde_json::json!({"models": ["minilm"], "ttl": "720h"}),
        )
        .await;
    scene.token_in_phase("app", AccessTokenPhase::Active).await;
    scene
        .token_in_phase("later", AccessTokenPhase::Active)
        .await;
    eventually("the ModelDeployment's status", || async {
        let md = scene.api::<ModelDeployment>().get("minilm").await.ok()?;
        md.status.filter(|s| !s.conditions.is_empty())
    })
    .await;
    // Let the Deployment controller's own status updates (and our reactions) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.operator.take().unwrap().stop().await;

    let writes = WriteCounter::default();
    let restarted = Operator::start(
        counting_client(&writes).await,
        &scene.namespace,
        &scene.gateway,
    )
    .await;
    eventually("a full pass of both controllers", || async {
        let m = &restarted.metrics;
        (m.reconciles("modeldeployment") >= 1 && m.reconciles("accesstoken") >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes.0.load(Ordering::SeqCst), 0, "a second pass wrote");
    scene.operator = Some(restarted);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_needs_no_more_than_its_rbac_and_the_proxy_reads_only_records() {
    // The gateway namespace of the RBAC files; shared by concurrent runs, so everything this
    // test writes there is named by its own namespace.
    let gateway = "infergate-system";
    let admin = admin().await;
    create_namespace(&admin, gateway).await;
    let rbac = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/infergate/rbac");
    for file in ["operator.yaml", "proxy.yaml"] {
        let applied = kubectl(&["apply", "-f", rbac.join(file).to_str().unwrap()]);
        assert!(
            applied.status.success(),
            "{}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    let namespace = unique("rbac");
    create_namespace(&admin, &namespace).await;

    let operator_user = "system:serviceaccount:infergate-system:infergate-operator";
    let as_operator = Client::try_from(config(Some(operator_user)).await).unwrap();
    let operator = Operator::start(as_operator, &namespace, gateway).await;
    let scene = Scene {
        client: admin.clone(),
        namespace: namespace.clone(),
        gateway: gateway.to_owned(),
        own_gateway: false,
        operator: Some(operator),
    };
    scene
        .create_model("minilm", model_spec(&format!("{namespace}-minilm")))
        .await;
    scene
        .create_token("app", serde_json::json!({"models": ["minilm"]}))
        .await;
    let token = scene.token_in_phase("app", AccessTokenPhase::Active).await;
    assert!(scene.record_of(&token).await.is_some());
    eventually("the runtime Deployment", || async {
        scene.api::<Deployment>().get_opt("minilm").await.unwrap()
    })
    .await;

    let can = |user: &str, args: &[&str]| {
        let mut all = vec!["auth", "can-i", "--as", user];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&kubectl(&all).stdout).trim() == "yes"
    };
    let proxy_user = "system:serviceaccount:infergate-system:infergate-proxy";
    assert!(can(proxy_user, &["watch", "secrets", "-n", gateway]));
    assert!(
        !can(proxy_user, &["get", "secrets", "-n", &namespace]),
        "the proxy reads Secrets only in its namespace"
    );
    assert!(!can(proxy_user, &["create", "secrets", "-n", gateway]));
    assert!(can(
        proxy_user,
        &["list", "endpointslices.discovery.k8s.io", "-A"]
    ));
    assert!(
        !can(operator_user, &["list", "secrets", "-n", &namespace]),
        "the operator never lists users' Secrets"
    );
    assert!(!can(
        operator_user,
        &["delete", "deployments", "-n", &namespace]
    ));
    // Pods are read for their download containers' outcomes (ModelFetched), never touched.
    assert!(can(operator_user, &["watch", "pods", "-n", &namespace]));
    for verb in ["create", "delete", "patch"] {
        assert!(
            !can(operator_user, &[verb, "pods", "-n", &namespace]),
            "{verb} pods"
        );
    }
    assert!(!can(
        operator_user,
        &["create", "pods/exec", "-n", &namespace]
    ));
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_a_standby_takes_over_when_the_lease_goes_unrenewed() {
    let client = admin().await;
    let namespace = unique("lease");
    create_namespace(&client, &namespace).await;
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let timing = Timing {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry: Duration::from_millis(200),
    };
    let mut a = LeaderLease::new(api.clone(), "operator", "a", timing);
    let mut b = LeaderLease::new(api.clone(), "operator", "b", timing);
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert!(a.try_acquire_or_renew().await.unwrap(), "the holder renews");

    // `a` stops renewing (as if it hung); `b` must wait a whole lease duration, then take over.
    let waiting = Instant::now();
    b.acquire(|| {}).await;
    let waited = waiting.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "took over after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "took over after {waited:?}"
    );
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "the old holder sees it lost"
    );
    let lease = api.get("operator").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));

    // A leader that ends its work releases the Lease, so a standby needs no expiry to take over.
    b.lead(async {}).await.unwrap();
    assert!(a.try_acquire_or_renew().await.unwrap());
    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await
        .unwrap();
}

/// `GET path` on 127.0.0.1:`port`: the status code and body, or `None` when nothing listens.
/// A child process that a failing test does not leave running (it would hold the test's
/// output pipe open).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_leads_serves_health_and_metrics_and_no_token_reaches_logs_events_or_status() {
    let client = admin().await;
    let namespace = unique("binary");
    let gateway = format!("{namespace}-gw");
    create_namespace(&client, &namespace).await;
    create_namespace(&client, &gateway).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("{namespace}.log"));
    // At TRACE, where kube's and hyper's own lines are on too.
    let mut operator = KilledOnDrop(
        Command::new(env!("CARGO_BIN_EXE_infergate-operator"))
            .env("KUBECONFIG", &cluster().kubeconfig)
            .env("RUST_LOG", "trace")
            .args([
                "--gateway-namespace",
                &gateway,
                "--watch-namespace",
                &namespace,
            ])
            .args([
                "--lease-namespace",
                &gateway,
                "--identity",
                "smoke",
                "--log-json",
            ])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    eventually("/readyz answering 200", || async {
        (http_get(port, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    eventually("the replica leading", || async {
        http_get(port, "/metrics")?
            .1
            .contains("infergate_operator_leader 1")
            .then_some(())
    })
    .await;
    let lease = Api::<Lease>::namespaced(client.clone(), &gateway)
        .get("infergate-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("smoke")
    );

    let scene = Scene {
        client: client.clone(),
        namespace: namespace.clone(),
        gateway: gateway.clone(),
        own_gateway: true,
        operator: None,
    };
    scene
        .create_model("minilm", model_spec(&format!("{namespace}-m")))
        .await;
    // Tokens in every phase and every status message, each issued, then revoked or expired.
    let minted = [
        (
            "app",
            serde_json::json!({"models": ["minilm"]}),
            AccessTokenPhase::Active,
        ),
        (
            "brief",
            serde_json::json!({"models": ["minilm"], "ttl": "1s"}),
            AccessTokenPhase::Expired,
        ),
        (
            "unscoped",
            serde_json::json!({"models": ["missing"]}),
            AccessTokenPhase::Active,
        ),
        (
            "dropped",
            serde_json::json!({"models": ["minilm"]}),
            AccessTokenPhase::Active,
        ),
    ];
    let mut plaintexts = Vec::new();
    for (name, spec, phase) in &minted {
        scene.create_token(name, spec.clone()).await;
        scene.token_in_phase(name, *phase).await;
        let secret = scene
            .api::<Secret>()
            .get(&format!("{name}-token"))
            .await
            .unwrap();
        plaintexts
            .push(String::from_utf8(secret.data.unwrap()[TOKEN_SECRET_KEY].0.clone()).unwrap());
    }
    scene
        .merge_spec::<AccessToken>("dropped", serde_json::json!({"revoked": true}))
        .await;
    scene
        .token_in_phase("dropped", AccessTokenPhase::Revoked)
        .await;
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("infergate_operator_reconciles_total{controller=\"accesstoken\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("infergate_operator_reconcile_duration_seconds_bucket"));
    // Everything a token's life left in the API: Events, the objects' status, the records.
    let mut written = String::new();
    for events in [
        scene.api::<Event>(),
        Api::namespaced(client.clone(), &gateway),
    ] {
        let events = events.list(&ListParams::default()).await.unwrap().items;
        written.push_str(&serde_json::to_string(&events).unwrap());
    }
    assert!(
        written.contains("AccessToken"),
        "no Events to judge: {written}"
    );
    let tokens = scene
        .api::<AccessToken>()
        .list(&ListParams::default())
        .await
        .unwrap();
    written.push_str(&serde_json::to_string(&tokens.items).unwrap());
    let models = scene
        .api::<ModelDeployment>()
        .list(&ListParams::default())
        .await
        .unwrap();
    written.push_str(&serde_json::to_string(&models.items).unwrap());
    let records = scene.records().list(&ListParams::default()).await.unwrap();
    written.push_str(&serde_json::to_string(&records.items).unwrap());
    written.push_str(&metrics);
    for token in &plaintexts {
        let leaks = e2e::canary::token_leaks(token, &written);
        assert!(
            leaks.is_empty(),
            "a token reached Events, status, records or metrics: {leaks:?}"
        );
    }
    scene
        .api::<AccessToken>()
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the AccessToken gone", || async {
        scene
            .api::<AccessToken>()
            .get_opt("app")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    let terminated = Command::new("kill")
        .args(["-TERM", &operator.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let stopping = Instant::now();
    let exited = loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "the operator ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "{exited:?}");
    let lease = Api::<Lease>::namespaced(client.clone(), &gateway)
        .get("infergate-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "a stopping leader releases the Lease"
    );

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.lines().count() > 0);
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(logs.contains("TRACE"), "the operator logged at TRACE");
    for token in &plaintexts {
        let leaks = e2e::canary::token_leaks(token, &logs);
        assert!(leaks.is_empty(), "a token is in the logs: {leaks:?}");
    }
    std::fs::remove_file(log).unwrap();
    for namespace in [&namespace, &gateway] {
        Api::<Namespace>::all(client.clone())
            .delete(namespace, &DeleteParams::default())
            .await
            .unwrap();
    }
}
