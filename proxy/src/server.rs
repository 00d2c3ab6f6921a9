//! Assembles the pingora server: the proxy listener, the metrics listener, the source, and the
//! shutdown: lame duck, then drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use internal_token::watch::Watched;
use internal_token::{Signer, SigningKeys};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::ServiceWithDependents;
use pingora_core::services::background::{BackgroundService, background_service};
use pingora_core::services::listening::Service;

use crate::config::ListenConfig;
use crate::file_source::FileSource;
use crate::gateway::{Gateway, HeaderLimits};
use crate::header_guard::{GuardedProxy, HeadLimits};
use crate::kube_source::KubeSource;
use crate::limits::{Limits, StoreFailure};
use crate::metrics::{Metrics, MetricsApp};
use crate::state::Shared;

/// Where the proxy learns its tokens, models and endpoints.
#[derive(Debug, Clone)]
pub enum SourceOptions {
    /// The YAML file of docs/architecture.md (proxy file source), which also says where to listen.
    File(PathBuf),
    /// The cluster's API: record Secrets of `namespace`, ModelDeployments, EndpointSlices.
    Kubernetes {
        namespace: String,
        /// The proxy's own Service in `namespace`: its ready endpoints are the replicas that
        /// share per-token limits.
        peers_service: String,
        listen: ListenConfig,
        /// Deadlines of models whose ModelDeployment sets none.
        default_timeouts: crds::RequestTimeouts,
    },
}

/// How the proxy is started.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub source: SourceOptions,
    /// Longest time in-flight requests get to finish after SIGTERM.
    pub grace_period: Duration,
    pub header_limits: HeaderLimits,
    pub keepalive_idle_secs: u64,
    /// Requests held for one model with no endpoint, while it scales up from zero.
    pub max_held_per_model: usize,
    /// Longest time a request head may take to arrive (slowloris).
    pub header_read_timeout: Duration,
    /// The keys that sign forwarded requests; `None` forwards them unsigned.
    pub internal_signing_keys: Option<PathBuf>,
    /// The shared store of per-token limits (`redis://...`); each replica enforces its share
    /// without one.
    pub limits_store: Option<String>,
    pub limits_store_failure: StoreFailure,
}

/// Runs the proxy until SIGTERM (graceful) or SIGINT (immediate).
pub fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::default());
    let (source, listen): (Box<dyn ServiceWithDependents>, ListenConfig) = match options.source {
        SourceOptions::File(path) => {
            let (source, listen) = FileSource::start(path, shared.clone())?;
            (Box::new(background_service("file source", source)), listen)
        }
        SourceOptions::Kubernetes {
            namespace,
            peers_service,
            listen,
            default_timeouts,
        } => {
            let source = KubeSource {
                shared: shared.clone(),
                namespace,
                peers_service,
                default_timeouts,
            };
            (
                Box::new(background_service("kubernetes source", source)),
                listen,
            )
        }
    };
    let limits = Arc::new(Limits::new(
        options.limits_store.as_deref(),
        options.limits_store_failure,
    )?);
    let metrics = Metrics::new();
    metrics.watch_limits(shared.clone(), limits.clone());
    let signer = match &options.internal_signing_keys {
        Some(path) => Some(Arc::new(Watched::start(path, |bytes| {
            SigningKeys::parse(bytes).and_then(|keys| Signer::new(&keys))
        })?)),
        None => {
            tracing::warn!(
                "no --internal-signing-keys: forwarded requests carry no signed credential, so \
                 runtimes that require one refuse them"
            );
            None
        }
    };

    let conf = ServerConf {
        threads: listen.threads,
        work_stealing: false,
        grace_period_seconds: Some(options.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let gateway = Gateway {
        shared: shared.clone(),
        metrics: metrics.clone(),
        header_limits: options.header_limits,
        keepalive_idle_secs: options.keepalive_idle_secs,
        max_held_per_model: options.max_held_per_model,
        signer,
        limits,
    };
    let guarded = GuardedProxy {
        inner: Arc::new(gateway),
        limits: HeadLimits {
            read_timeout: options.header_read_timeout,
            max_bytes: options.header_limits.max_bytes,
        },
    };
    let mut proxy = Service::new("infergate-proxy".to_owned(), guarded);
    proxy.add_tcp(&listen.listen.to_string());
    let mut metrics_service = Service::new("metrics".to_owned(), MetricsApp(metrics));
    metrics_service.add_tcp(&listen.metrics.to_string());

    server.add_service(proxy);
    server.add_service(metrics_service);
    server.add_boxed_service(source);
    server.add_service(background_service(
        "drain",
        Drain {
            shared: shared.clone(),
        },
    ));
    tracing::info!(listen = %listen.listen, metrics = %listen.metrics, threads = listen.threads, "infergate-proxy started");
    server.run(RunArgs {
        shutdown_signal: Box::new(LameDuck { shared }),
    });
    Ok(())
}

/// How long the proxy must be idle (no request in progress, none begun) before it moves on to
/// the next phase of a shutdown; covers a request whose connection was accepted but whose
/// head is still arriving.
const QUIET: Duration = Duration::from_millis(500);

/// The longest lame-duck phase: the chart's terminationGracePeriodSeconds leaves 10 s beyond
/// the grace period and the preStop sleep, and this spends at most that.
const LAME_DUCK_MAX: Duration = Duration::from_secs(5);

/// Returns once the proxy has been idle for [`QUIET`].
async fn until_quiet(shared: &Shared) {
    let mut quiet_since: Option<(std::time::Instant, u64)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = shared.requests_started();
        if shared.requests_in_progress() > 0 || quiet_since.is_some_and(|(_, seen)| seen != started)
        {
            quiet_since = None;
            continue;
        }
        let (since, _) = *quiet_since.get_or_insert((std::time::Instant::now(), started));
        if since.elapsed() >= QUIET {
            return;
        }
    }
}

/// SIGTERM starts a lame-duck phase before pingora hears of the shutdown: readiness turns
/// false and every answer closes its connection, but the listener keeps accepting until the
/// proxy has been idle for a moment (at most [`LAME_DUCK_MAX`]). pingora closes its listener as
/// soon as it hears, and the kernel resets every connection still queued for `accept`, whose
/// clients may already have sent their requests; by then nobody is sending any more. SIGINT
/// stops at once, SIGQUIT is pingora's graceful upgrade, as without this watch.
#[derive(Debug)]
struct LameDuck {
    shared: Arc<Shared>,
}

#[async_trait]
impl ShutdownSignalWatch for LameDuck {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).expect("installing a signal handler");
        let (mut terminate, mut interrupt, mut quit) = (
            listen(SignalKind::terminate()),
            listen(SignalKind::interrupt()),
            listen(SignalKind::quit()),
        );
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => return ShutdownSignal::FastShutdown,
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
        }
        self.shared.start_draining();
        tracing::info!("SIGTERM: not ready any more; serving until idle");
        tokio::select! {
            _ = tokio::time::timeout(LAME_DUCK_MAX, until_quiet(&self.shared)) => {
                tracing::info!("closing the listener");
                ShutdownSignal::GracefulTerminate
            }
            _ = interrupt.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// Once the listener is closed, ends the process as soon as the requests in progress are done,
/// instead of always sleeping through pingora's whole grace period.
#[derive(Debug)]
struct Drain {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        until_quiet(&self.shared).await;
        tracing::info!("no request in progress; exiting");
        std::process::exit(0);
    }
}
