//! `infergate-operator`: reconciles ModelDeployments into runtime pods and AccessTokens into
//! token records, as the leader of its replicas.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use crds::RequestTimeouts;
use futures::FutureExt;
use internal_token::Schedule;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{Api, Client};
use operator::controller::{self, Config};
use operator::desired::{ModelCache, NetworkAccess, Peer, RuntimeDefaults};
use operator::lease::{LeaderLease, Timing};
use operator::telemetry::{self, Health, Metrics};

#[derive(Debug, Parser)]
#[command(name = "infergate-operator", version, about)]
struct Args {
    /// Namespace of the proxy, where token records are written.
    #[arg(long, env = "INFERGATE_GATEWAY_NAMESPACE", default_value = crds::names::DEFAULT_GATEWAY_NAMESPACE)]
    gateway_namespace: String,
    /// Reconcile only this namespace (a namespaced install); all namespaces when unset.
    #[arg(long)]
    watch_namespace: Option<String>,
    /// Image of the builtin runtime, unless a ModelDeployment overrides it.
    #[arg(long, env = "INFERGATE_RUNTIME_IMAGE", default_value = concat!("infergate/runtime:", env!("CARGO_PKG_VERSION")))]
    runtime_image: String,
    /// CPU of a runtime pod whose ModelDeployment sets none (request and limit), e.g. `2`.
    #[arg(long, env = "INFERGATE_RUNTIME_CPU")]
    runtime_cpu: Option<String>,
    /// Memory of a runtime pod whose ModelDeployment sets none (request and limit), e.g. `4Gi`.
    #[arg(long, env = "INFERGATE_RUNTIME_MEMORY")]
    runtime_memory: Option<String>,
    /// Deadline in seconds of models that set no `timeouts.default`; give the proxy the same.
    #[arg(long, default_value_t = 120)]
    default_timeout: u64,
    /// Largest deadline in seconds of models that set no `timeouts.max`; it sizes the runtime
    /// pods' termination grace period. Give the proxy the same.
    #[arg(long, default_value_t = 600)]
    max_timeout: u64,
    /// Hours the proxy's signing key signs before a scheduled replacement.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..))]
    internal_key_rotation_hours: u64,
    /// Seconds a new signing key is published before it signs: at least how long the kubelet
    /// takes to refresh a mounted Secret and ConfigMap (about a minute by default).
    #[arg(long, default_value_t = 120)]
    internal_key_activation_seconds: u64,
    /// Labels of the proxy's pods (`k=v,k=v`): with the gateway namespace, what runtime pods'
    /// NetworkPolicies let in.
    #[arg(long, default_value = "app.kubernetes.io/name=infergate-proxy", value_parser = parse_labels)]
    proxy_pod_labels: BTreeMap<String, String>,
    /// Labels of the namespace of a metrics scraper that reads runtimes' /metrics (`k=v,k=v`);
    /// unset, runtime pods admit the proxy alone.
    #[arg(long, value_parser = parse_labels)]
    scraper_namespace_labels: Option<BTreeMap<String, String>>,
    /// Labels of the scraper's pods in that namespace (`k=v,k=v`); unset, any of its pods.
    #[arg(long, value_parser = parse_labels, default_value = "")]
    scraper_pod_labels: BTreeMap<String, String>,
    /// Node directory (hostPath) that keeps downloaded models for every pod on the node;
    /// empty downloads into each pod's own volume.
    #[arg(long, default_value = "/var/cache/infergate/models")]
    model_cache_host_path: String,
    /// Bytes the node cache may hold before least recently used models are evicted.
    #[arg(long, default_value_t = 100_000_000_000)]
    model_cache_max_bytes: u64,
    /// Milliseconds between two readings of the proxies' load by the autoscaler.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    autoscale_interval_ms: u64,
    /// Seconds between two additions of the tokens' usage (read from the proxies) to their
    /// AccessTokens' status.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    usage_interval_seconds: u64,
    /// Port of the proxy pods' metrics listener, where the autoscaler reads their load.
    #[arg(long, default_value_t = 9090)]
    proxy_metrics_port: u16,
    /// Where clients reach the proxy (its Ingress or load balancer), e.g.
    /// `https://inference.example.com`: the base URL of the client code published for each
    /// ModelDeployment. Default: the proxy's Service in the gateway namespace.
    #[arg(long, env = "INFERGATE_PROXY_URL")]
    proxy_url: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8081")]
    metrics_listen: SocketAddr,
    /// Elect a leader among replicas on a Lease; turn off only when one replica runs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(long, default_value = "infergate-operator")]
    lease_name: String,
    /// Namespace of the Lease: the operator's own (POD_NAMESPACE), else the gateway namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's name in the Lease and in Events (POD_NAME), else host name and pid.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log one JSON object per line.
    #[arg(long)]
    log_json: bool,
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected key=value"))?;
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

fn host_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }

    let client = Client::try_default().await?;
    let identity = args.identity.clone().unwrap_or_else(host_identity);
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let telemetry = tokio::spawn(telemetry::serve(
        args.metrics_listen,
        metrics.clone(),
        health.clone(),
    ));
    anyhow::ensure!(
        args.default_timeout > 0 && args.default_timeout <= args.max_timeout,
        "--default-timeout ({}) must be positive and at most --max-timeout ({})",
        args.default_timeout,
        args.max_timeout
    );
    let config = Config {
        gateway_namespace: args.gateway_namespace.clone(),
        watch_namespace: args.watch_namespace,
        runtime: RuntimeDefaults {
            image: args.runtime_image,
            cpu: args.runtime_cpu.map(Quantity),
            memory: args.runtime_memory.map(Quantity),
            timeouts: RequestTimeouts {
                default: Duration::from_secs(args.default_timeout),
                max: Duration::from_secs(args.max_timeout),
            },
            access: NetworkAccess {
                proxy: Peer {
                    namespace_labels: BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_owned(),
                        args.gateway_namespace.clone(),
                    )]),
                    pod_labels: args.proxy_pod_labels.clone(),
                },
                scraper: args.scraper_namespace_labels.map(|namespace_labels| Peer {
                    namespace_labels,
                    pod_labels: args.scraper_pod_labels,
                }),
            },
            model_cache: (!args.model_cache_host_path.is_empty()).then_some(ModelCache {
                host_path: args.model_cache_host_path,
                max_bytes: args.model_cache_max_bytes,
            }),
        },
        key_schedule: Schedule {
            period: Duration::from_secs(args.internal_key_rotation_hours * 3600),
            activation: Duration::from_secs(args.internal_key_activation_seconds),
        },
        instance: identity.clone(),
        autoscaler: operator::autoscaler::Settings {
            interval: Duration::from_millis(args.autoscale_interval_ms),
            usage_interval: Duration::from_secs(args.usage_interval_seconds),
            proxy_selector: args
                .proxy_pod_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            proxy_metrics_port: args.proxy_metrics_port,
        },
        proxy_url: args
            .proxy_url
            .unwrap_or_else(|| format!("http://infergate-proxy.{}.svc", args.gateway_namespace)),
    };
    let shutdown = terminated().shared();
    let controllers = controller::run(
        client.clone(),
        config,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    );
    tracing::info!(%identity, gateway_namespace = %args.gateway_namespace, "starting");

    if !args.leader_election {
        metrics.leader.set(1);
        controllers.await;
        return Ok(());
    }
    let lease_namespace = args.lease_namespace.unwrap_or(args.gateway_namespace);
    let mut lease = LeaderLease::new(
        Api::<Lease>::namespaced(client, &lease_namespace),
        &args.lease_name,
        &identity,
        Timing::default(),
    );
    tokio::select! {
        () = lease.acquire(|| health.set_ready(true)) => {}
        () = shutdown.clone() => return Ok(()),
        result = telemetry => return Err(anyhow::anyhow!("the metrics server stopped: {result:?}")),
    }
    tracing::info!(lease = %args.lease_name, "leading");
    metrics.leader.set(1);
    let led = lease.lead(controllers).await;
    metrics.leader.set(0);
    // A replica that lost the Lease exits: the controllers may hold state from its time as
    // leader, and a fresh start as a standby is the simplest correct thing.
    led.map_err(Into::into)
}
