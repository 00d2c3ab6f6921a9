//! Local mode: `infergate up -f DIR|FILE` runs the resources one would `kubectl apply` on this
//! machine, with the binaries a cluster runs: one `infergate-runtime` per ModelDeployment, and
//! `infergate-proxy` on a file source kept in sync with the files, the runtimes' readiness and
//! the tokens issued (docs/architecture.md, local mode).
//!
//! The supervisor polls: the files for edits, each runtime for readiness and exit. A runtime
//! that dies is restarted with back-off; the proxy only routes to runtimes that answer
//! `/health`. State that must outlive a restart of `infergate up` (when each token was issued
//! and its digest, never its plaintext; the keys the proxy signs forwarded requests with, which
//! the runtimes verify) lives in the state directory.

pub mod commands;
pub mod keys;
pub mod manifests;
pub mod schema;
mod supervisor;
mod tokens;

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use supervisor::up;

/// How `infergate up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// A YAML file or a directory of them.
    pub path: PathBuf,
    /// Where clients reach the proxy.
    pub listen: SocketAddr,
    /// The proxy's metrics listener.
    pub metrics_listen: SocketAddr,
    /// Issued tokens' digests, the proxy's config and the runtimes' logs.
    pub state_dir: PathBuf,
    pub runtime_bin: PathBuf,
    pub proxy_bin: PathBuf,
    /// `--torch-threads` of every runtime; libtorch's default when unset.
    pub torch_threads: Option<usize>,
    /// How often files, runtimes and the proxy are checked.
    pub poll: Duration,
}

/// Replaces `path` whole (a rename), so no reader (the proxy, a runtime, the next start) ever
/// sees half of it; a new file gets `mode`.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}
