//! Assembles the pingora server: the proxy listener, the metrics listener, the source and the
//! shutdown drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownWatch};
use pingora_core::services::ServiceWithDependents;
use pingora_core::services::background::{BackgroundService, background_service};
use pingora_core::services::listening::Service;

use crate::config::ListenConfig;
use crate::file_source::FileSource;
use crate::gateway::{Gateway, HeaderLimits};
use crate::header_guard::{GuardedProxy, HeadLimits};
use crate::kube_source::KubeSource;
use crate::metrics::{Metrics, MetricsApp};
use crate::state::Shared;

/// Where the proxy learns its tokens, models and endpoints.
#[derive(Debug, Clone)]
pub enum SourceOptions {
    /// The YAML file of DESIGN.md, which also says where to listen.
    File(PathBuf),
    /// The cluster's API: record Secrets of `namespace`, ModelDeployments, EndpointSlices.
    Kubernetes {
        namespace: String,
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
    /// Longest time a request head may take to arrive (slowloris).
    pub header_read_timeout: Duration,
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
            listen,
            default_timeouts,
        } => {
            let source = KubeSource {
                shared: shared.clone(),
                namespace,
                default_timeouts,
            };
            (
                Box::new(background_service("kubernetes source", source)),
                listen,
            )
        }
    };
    let metrics = Metrics::new();

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
    };
    let guarded = GuardedProxy {
        inner: Arc::new(pingora_proxy::http_proxy(&server.configuration, gateway)),
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
    server.add_service(background_service("drain", Drain { shared }));
    tracing::info!(listen = %listen.listen, metrics = %listen.metrics, threads = listen.threads, "infergate-proxy started");
    server.run(RunArgs::default());
    Ok(())
}

/// After SIGTERM, ends the process as soon as no request has been in progress for a moment,
/// instead of always sleeping through pingora's whole grace period.
#[derive(Debug)]
struct Drain {
    shared: Arc<Shared>,
}

/// How long the proxy must be idle after SIGTERM before it exits; covers a request whose
/// connection was accepted but whose headers are still arriving.
const QUIET_BEFORE_EXIT: Duration = Duration::from_millis(500);

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let mut quiet_since = None;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.shared.requests_in_progress() > 0 {
                quiet_since = None;
                continue;
            }
            let since = *quiet_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= QUIET_BEFORE_EXIT {
                tracing::info!("no request in progress; exiting");
                std::process::exit(0);
            }
        }
    }
}
