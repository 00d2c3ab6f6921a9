//! State shared by every request and the sources that feed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::snapshot::{EndpointPool, ModelSpec, Snapshot};

/// The current snapshot, readiness and the count of requests in progress.
#[derive(Debug, Default)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pool: EndpointPool,
    ready: AtomicBool,
    requests_in_progress: AtomicUsize,
}

impl Shared {
    /// The snapshot a request keeps for its whole life.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot in one swap and marks the proxy ready: a source publishes only
    /// after it has synced.
    pub fn publish(&self, models: Vec<ModelSpec>, tokens: Vec<crds::TokenRecord>) {
        self.snapshot
            .store(Arc::new(Snapshot::build(models, tokens, &self.pool)));
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn requests_in_progress(&self) -> usize {
        self.requests_in_progress.load(Ordering::Acquire)
    }

    /// Counts a request as in progress until the guard drops.
    pub fn track_request(self: &Arc<Self>) -> RequestGuard {
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
