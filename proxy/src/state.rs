//! State shared by every request and the sources that feed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::snapshot::{EndpointPool, ModelSpec, Snapshot};

/// The current snapshot, readiness and the count of requests in progress.
#[derive(Debug, Default)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pool: EndpointPool,
    ready: AtomicBool,
    /// Set at SIGTERM: not ready any more, and every answer closes its connection.
    draining: AtomicBool,
    requests_in_progress: AtomicUsize,
    requests_started: AtomicU64,
    /// Counts publications, for the requests held until their model has an endpoint.
    published: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// The snapshot a request keeps for its whole life.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot in one swap and marks the proxy ready: a source publishes only
    /// after it has synced.
    /// `peers`: the proxy replicas (this one included) that share per-token limits.
    pub fn publish(&self, models: Vec<ModelSpec>, tokens: Vec<crds::TokenRecord>, peers: usize) {
        self.snapshot
            .store(Arc::new(Snapshot::build(models, tokens, peers, &self.pool)));
        self.ready.store(true, Ordering::Release);
        self.published.send_modify(|count| *count += 1);
    }

    /// Changes with every snapshot published after this call.
    pub fn publications(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn requests_in_progress(&self) -> usize {
        self.requests_in_progress.load(Ordering::Acquire)
    }

    /// Requests begun since start; a change tells that the proxy was not idle meanwhile.
    pub fn requests_started(&self) -> u64 {
        self.requests_started.load(Ordering::Acquire)
    }

    /// Counts a request as in progress until the guard drops.
    pub fn track_request(self: &Arc<Self>) -> RequestGuard {
        self.requests_started.fetch_add(1, Ordering::AcqRel);
        self.requests_in_progress.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }
}

/// Keeps a request counted in [`Shared::requests_in_progress`].
#[derive(Debug)]
pub struct RequestGuard(Arc<Shared>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.requests_in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}
