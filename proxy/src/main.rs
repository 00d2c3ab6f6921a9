//! `infergate-proxy`: the data plane every application client talks to.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

// glibc malloc was a sixth of the proxy's profile under load (many small per-request buffers);
// mimalloc's thread-local free lists remove most of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Authenticates clients with infergate tokens and streams their requests to model runtimes.
#[derive(Debug, Parser)]
#[command(name = "infergate-proxy", version)]
struct Args {
    /// YAML file with listen addresses, models and token records; re-read when it changes.
    #[arg(
        long,
        env = "INFERGATE_PROXY_CONFIG",
        required_unless_present = "source",
        conflicts_with = "source"
    )]
    config: Option<PathBuf>,

    /// `kubernetes`: watch token record Secrets in --namespace, ModelDeployments and
    /// EndpointSlices through the cluster's API (in-cluster credentials or KUBECONFIG).
    #[arg(long, env = "INFERGATE_PROXY_SOURCE", value_parser = ["kubernetes"])]
    source: Option<String>,

    /// Namespace of the token record Secrets (the gateway namespace), with --source kubernetes.
    #[arg(long, env = "POD_NAMESPACE", default_value = crds::names::DEFAULT_GATEWAY_NAMESPACE)]
    namespace: String,

    /// Address of the proxy, with --source kubernetes (the config file says it otherwise).
    #[arg(long, env = "INFERGATE_PROXY_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,

    /// Address of the Prometheus metrics, with --source kubernetes.
    #[arg(
        long,
        env = "INFERGATE_PROXY_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: std::net::SocketAddr,

    /// Worker threads, with --source kubernetes; the machine's cores when unset.
    #[arg(long, env = "INFERGATE_PROXY_THREADS")]
    threads: Option<usize>,

    /// Seconds in-flight requests get to finish once the listener closes. After SIGTERM the
    /// proxy is first a lame duck: /readyz answers 503 and answers close their connections,
    /// but new connections are served until none has come for 0.5 s (at most 5 s).
    #[arg(long, env = "INFERGATE_PROXY_GRACE_PERIOD", default_value_t = 30)]
    grace_period: u64,

    /// Largest request line plus headers, in bytes; larger requests get 431.
    #[arg(long, env = "INFERGATE_PROXY_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,

    /// Most header fields in a request; more get 431.
    #[arg(long, env = "INFERGATE_PROXY_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,

    /// Requests held per model while it scales up from zero (autoscaled models only); more
    /// get 503 `model_starting` at once.
    #[arg(
        long,
        env = "INFERGATE_PROXY_MAX_HELD_PER_MODEL",
        default_value_t = 1000
    )]
    max_held_per_model: usize,

    /// Seconds an idle client connection stays open between requests.
    #[arg(long, env = "INFERGATE_PROXY_KEEPALIVE_IDLE", default_value_t = 60)]
    keepalive_idle: u64,

    /// Deadline, in seconds, of requests to models whose ModelDeployment sets no
    /// `timeouts.default` (Kubernetes source; the file source reads each model's own).
    #[arg(long, env = "INFERGATE_PROXY_DEFAULT_TIMEOUT", default_value_t = 120)]
    default_timeout: u64,

    /// Largest `OICM-Request-Timeout`, in seconds, for models whose ModelDeployment sets no
    /// `timeouts.max` (Kubernetes source).
    #[arg(long, env = "INFERGATE_PROXY_MAX_TIMEOUT", default_value_t = 600)]
    max_timeout: u64,

    /// Seconds a request's line and headers may take to arrive; slower clients are disconnected.
    #[arg(
        long,
        env = "INFERGATE_PROXY_HEADER_READ_TIMEOUT",
        default_value_t = 10
    )]
    header_read_timeout: u64,

    /// The keys that sign the JWT each forwarded request carries (a JSON file of Ed25519 keys,
    /// re-read when it changes; in a cluster, the operator's Secret mounted): runtimes started
    /// with the public halves answer only requests that carry one. Unset, requests go unsigned.
    #[arg(long, env = "INFERGATE_PROXY_INTERNAL_SIGNING_KEYS")]
    internal_signing_keys: Option<PathBuf>,

    /// The proxy's own Service in --namespace, with --source kubernetes: its ready endpoints
    /// are the replicas that share each token's limits when no --limits-store is set.
    #[arg(
        long,
        env = "INFERGATE_PROXY_PEERS_SERVICE",
        default_value = "infergate-proxy"
    )]
    peers_service: String,
    /// A Redis or Valkey (`redis://[:password@]host:port[/db]`, `rediss://` for TLS) where
    /// every replica counts per-token limits, making them global and exact; without one each
    /// of the N replicas enforces 1/N of each limit.
    #[arg(long, env = "INFERGATE_PROXY_LIMITS_STORE")]
    limits_store: Option<String>,
    /// What to do while the limits store cannot be reached: `local` enforces this replica's
    /// share, `open` admits without limits, `closed` refuses with 503.
    #[arg(
        long,
        env = "INFERGATE_PROXY_LIMITS_STORE_FAILURE",
        value_enum,
        default_value = "local"
    )]
    limits_store_failure: proxy::limits::StoreFailure,
    /// Log lines as JSON objects (for log collectors) instead of text.
    #[arg(long, env = "INFERGATE_LOG_JSON")]
    log_json: bool,
}

fn default_timeouts(default: u64, max: u64) -> anyhow::Result<crds::RequestTimeouts> {
    anyhow::ensure!(
        default > 0 && default <= max,
        "--default-timeout ({default}) must be positive and at most --max-timeout ({max})"
    );
    Ok(crds::RequestTimeouts {
        default: Duration::from_secs(default),
        max: Duration::from_secs(max),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // pingora's debug and trace lines print whole request headers and URIs, credentials
    // included: whatever RUST_LOG asks, the framework logs at info at most.
    for framework in ["pingora_core", "pingora_http", "pingora_pool"] {
        filter = filter.add_directive(
            format!("{framework}=info")
                .parse()
                .expect("a valid directive"),
        );
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let source = match args.config {
        Some(path) => proxy::server::SourceOptions::File(path),
        None => proxy::server::SourceOptions::Kubernetes {
            namespace: args.namespace,
            peers_service: args.peers_service,
            default_timeouts: default_timeouts(args.default_timeout, args.max_timeout)?,
            listen: proxy::config::ListenConfig {
                listen: args.listen,
                metrics: args.metrics_listen,
                threads: args
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
            },
        },
    };
    proxy::server::serve(proxy::server::ServeOptions {
        source,
        grace_period: Duration::from_secs(args.grace_period),
        header_limits: proxy::gateway::HeaderLimits {
            max_bytes: args.max_header_bytes,
            max_count: args.max_headers,
        },
        keepalive_idle_secs: args.keepalive_idle,
        max_held_per_model: args.max_held_per_model,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        internal_signing_keys: args.internal_signing_keys,
        limits_store: args.limits_store,
        limits_store_failure: args.limits_store_failure,
    })
}
