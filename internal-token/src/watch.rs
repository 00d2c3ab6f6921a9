//! A file that a long-running process re-reads when it changes: the proxy's signing keys, a
//! runtime's verifying keys. Kubernetes updates a mounted Secret or ConfigMap by swapping a
//! symlink, so a change shows in the metadata of the path followed (inode, size, mtime).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

/// How often the file's metadata is checked: a rotation's activation delay is many times this.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The latest good reading of a file. A change that does not parse keeps the last good one (and
/// logs why): a half-written or mistyped file never takes down what works.
#[derive(Debug)]
pub struct Watched<T> {
    current: Arc<RwLock<Arc<T>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot start the thread that watches the file: {0}")]
    Thread(std::io::Error),
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Reads `path` now (an error if it cannot be read or parsed), then again whenever it
    /// changes, on a thread that ends when the `Watched` is dropped.
    pub fn start<E: std::fmt::Display>(
        path: &Path,
        parse: impl Fn(&[u8]) -> Result<T, E> + Send + 'static,
    ) -> Result<Watched<T>, WatchError> {
        let mut seen = stamp(path);
        let first = load(path, &parse)?;
        let current = Arc::new(RwLock::new(Arc::new(first)));
        let weak: Weak<RwLock<Arc<T>>> = Arc::downgrade(&current);
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("watch-keys".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(POLL_INTERVAL);
                    let Some(current) = weak.upgrade() else {
                        return;
                    };
                    let now = stamp(&path);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match load(&path, &parse) {
                        Ok(value) => {
                            *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                            tracing::info!(path = %path.display(), "reloaded");
                        }
                        Err(error) => {
                            tracing::warn!(%error, "keeping the last good reading");
                        }
                    }
                }
            })
            .map_err(WatchError::Thread)?;
        Ok(Watched { current })
    }

    /// The latest good reading.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn load<T, E: std::fmt::Display>(
    path: &Path,
    parse: &impl Fn(&[u8]) -> Result<T, E>,
) -> Result<T, WatchError> {
    let bytes = std::fs::read(path).map_err(|source| WatchError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes).map_err(|error| WatchError::Parse {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("internal-token-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("value")
    }

    fn parse_number(bytes: &[u8]) -> Result<u32, String> {
        std::str::from_utf8(bytes)
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())
    }

    fn eventually(watched: &Watched<u32>, expected: u32) {
        for _ in 0..100 {
            if *watched.current() == expected {
                return;
            }
            std::thread::sleep(POLL_INTERVAL / 5);
        }
        assert_eq!(*watched.current(), expected);
    }

    #[test]
    fn a_change_is_picked_up_and_a_bad_one_keeps_the_last_good_value() {
        let path = scratch("change");
        std::fs::write(&path, "1").unwrap();
        let watched = Watched::start(&path, parse_number).unwrap();
        assert_eq!(*watched.current(), 1);
        std::fs::write(&path, "22").unwrap();
        eventually(&watched, 22);
        std::fs::write(&path, "not a number").unwrap();
        std::thread::sleep(POLL_INTERVAL * 3);
        assert_eq!(*watched.current(), 22);
        std::fs::write(&path, "333").unwrap();
        eventually(&watched, 333);
    }

    #[test]
    fn a_symlink_swapped_as_kubernetes_updates_a_volume_is_followed() {
        let path = scratch("symlink");
        let dir = path.parent().unwrap().to_owned();
        for (name, value) in [("a", "1"), ("b", "2")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("value"), value).unwrap();
        }
        let link = dir.join("current");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("a"), &link).unwrap();
        let watched = Watched::start(&link.join("value"), parse_number).unwrap();
        assert_eq!(*watched.current(), 1);
        let next = dir.join("next");
        let _ = std::fs::remove_file(&next);
        std::os::unix::fs::symlink(dir.join("b"), &next).unwrap();
        std::fs::rename(&next, &link).unwrap();
        eventually(&watched, 2);
    }

    #[test]
    fn an_unreadable_file_at_start_is_an_error() {
        let path = scratch("missing").with_file_name("absent");
        assert!(matches!(
            Watched::start(&path, parse_number),
            Err(WatchError::Read { .. })
        ));
    }
}
