//! The file source: the YAML config's models and token records, re-read when the file changes.
//! A file that fails to parse keeps the last good snapshot and logs why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::{Config, ConfigError, ListenConfig};
use crate::state::Shared;

/// How often the file's metadata is checked. Revocation must reach the proxy within 1 s.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What identifies a version of the file without reading it: an editor's atomic rename changes
/// the inode, an in-place write the length or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Watches one config file and publishes a snapshot for each good version of it.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    shared: Arc<Shared>,
    listen: ListenConfig,
    last_seen: Mutex<Option<Stamp>>,
}

impl FileSource {
    /// Loads the file once; a bad file at start is an error, not an empty proxy.
    pub fn start(
        path: PathBuf,
        shared: Arc<Shared>,
    ) -> Result<(FileSource, ListenConfig), ConfigError> {
        let before = stamp(&path);
        let config = Config::load(&path)?;
        let listen = config.listen.clone();
        shared.publish(config.models, config.tokens, config.proxy_replicas);
        let source = FileSource {
            path,
            shared,
            listen: listen.clone(),
            last_seen: Mutex::new(before),
        };
        Ok((source, listen))
    }

    /// Re-reads the file if it changed since the last look. Returns whether a new snapshot was
    /// published.
    pub fn poll(&self) -> bool {
        let current = stamp(&self.path);
        {
            let mut last = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if *last == current {
                return false;
            }
            *last = current;
        }
        match Config::load(&self.path) {
            Ok(config) => {
                if config.listen != self.listen {
                    tracing::warn!(path = %self.path.display(), "listen, metrics and threads take effect on restart only");
                }
                let (models, tokens) = (config.models.len(), config.tokens.len());
                self.shared
                    .publish(config.models, config.tokens, config.proxy_replicas);
                tracing::info!(path = %self.path.display(), models, tokens, "configuration reloaded");
                true
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "configuration not reloaded; keeping the last good one");
                false
            }
        }
    }
}

#[async_trait]
impl BackgroundService for FileSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.poll(); }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &std::path::Path, text: &str) {
        // A rename, as editors and `kubectl`-style tools do, so every write is a new inode.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_changed_file_is_published_and_a_broken_one_keeps_the_last_good_snapshot() {
        let dir =
            std::env::temp_dir().join(format!("infergate-file-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.yaml");
        write(&path, "models: [{id: a, endpoints: ['127.0.0.1:1']}]");
        let shared = Arc::new(Shared::default());
        let (source, _) = FileSource::start(path.clone(), shared.clone()).unwrap();
        assert!(shared.is_ready());
        assert!(shared.snapshot().model("a").is_some());
        assert!(!source.poll(), "an unchanged file is not re-read");

        write(&path, "models: [{id: b, endpoints: ['127.0.0.1:1']}]");
        assert!(source.poll());
        assert!(shared.snapshot().model("b").is_some());

        write(&path, "models: [{id: c, endpoints: [nowhere]}]");
        assert!(!source.poll());
        assert!(
            shared.snapshot().model("b").is_some(),
            "the last good snapshot stays"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_broken_file_at_start_is_an_error() {
        let path = std::env::temp_dir().join(format!("infergate-bad-{}.yaml", std::process::id()));
        std::fs::write(&path, "models: {").unwrap();
        assert!(FileSource::start(path.clone(), Arc::new(Shared::default())).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
