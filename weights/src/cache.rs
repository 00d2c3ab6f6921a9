//! The node cache: models kept on a node's disk by content key, so that replicas on the same node
//! and restarted pods do not download them again.
//!
//! ```text
//! ROOT/entries/KEY/       a complete model directory
//! ROOT/entries/KEY.json   what it holds (its presence marks the entry complete); its mtime is
//!                         the entry's last use, for least-recently-used eviction
//! ROOT/partial/KEY/       a download in progress, kept across restarts so that it resumes
//! ROOT/locks/KEY          flock(2): one download of a key at a time on the node
//! ```
//!
//! Pods get the files as hard links (copies across filesystems), so evicting an entry never
//! takes files from a pod that already has them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::FetchError;

/// A node's model cache and its size bound.
#[derive(Debug, Clone)]
pub struct NodeCache {
    root: PathBuf,
    max_bytes: u64,
}

/// What a complete entry holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// The URI it was downloaded from.
    pub source: String,
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    /// Relative to the model directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Lower-case hex; absent where nothing was hashed (an https body checked whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Entry {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Held while a key is downloaded or placed into a pod; released on drop (the lock belongs to
/// the open file, so a killed process releases it too).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

/// How a key's lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contention {
    /// Nobody held it.
    Free,
    /// Another process (another pod on this node) held it for this long: its download of the
    /// same model, which this one then reuses.
    Waited(Duration),
}

impl NodeCache {
    pub fn new(root: impl Into<PathBuf>, max_bytes: u64) -> Self {
        NodeCache {
            root: root.into(),
            max_bytes,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    fn entry_record(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(format!("{key}.json"))
    }

    /// Where a download of `key` is assembled.
    pub fn partial(&self, key: &str) -> PathBuf {
        self.root.join("partial").join(key)
    }

    /// Takes `key`'s lock, waiting for whoever holds it.
    pub async fn lock(&self, key: &str) -> Result<(KeyLock, Contention), FetchError> {
        let locks = self.root.join("locks");
        std::fs::create_dir_all(&locks).map_err(FetchError::write(
            &self.root,
            0,
            "creating the cache's lock directory",
        ))?;
        let path = locks.join(key);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(FetchError::io(format!("opening {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => return Ok((KeyLock { _file: file }, Contention::Free)),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(FetchError::io(format!("locking {}", path.display()))(e));
            }
        }
        tracing::info!(
            key,
            "another pod on this node is fetching the same model; waiting for it"
        );
        let started = Instant::now();
        let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(|e| FetchError::io("waiting for the cache lock")(std::io::Error::other(e)))?
            .map_err(FetchError::io(format!("locking {}", path.display())))?;
        Ok((
            KeyLock { _file: file },
            Contention::Waited(started.elapsed()),
        ))
    }

    /// The complete entry of `key`, if there is one.
    pub fn entry(&self, key: &str) -> Option<(PathBuf, Entry)> {
        let record = std::fs::read(self.entry_record(key)).ok()?;
        let entry = serde_json::from_slice(&record).ok()?;
        let dir = self.entry_dir(key);
        dir.is_dir().then_some((dir, entry))
    }

    /// Marks `key` as used now, for eviction's ordering.
    pub fn touch(&self, key: &str) {
        let _ = File::options()
            .write(true)
            .open(self.entry_record(key))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    /// Turns the finished download in [`Self::partial`] into the entry of `key`. The caller
    /// holds `key`'s lock.
    pub fn commit(&self, key: &str, entry: &Entry) -> Result<PathBuf, FetchError> {
        let dir = self.entry_dir(key);
        let record = self.entry_record(key);
        // A crash between the rename and the record leaves a directory without a record: not
        // an entry, so it is replaced.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(FetchError::io(format!("removing {}", dir.display())))?;
        }
        std::fs::create_dir_all(self.root.join("entries")).map_err(FetchError::write(
            &self.root,
            0,
            "creating the cache's entries",
        ))?;
        std::fs::rename(self.partial(key), &dir).map_err(FetchError::io(format!(
            "moving the download into {}",
            dir.display()
        )))?;
        let staged = record.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(entry).expect("an entry serializes");
        std::fs::write(&staged, json)
            .and_then(|()| std::fs::rename(&staged, &record))
            .map_err(FetchError::write(&self.root, 0, "writing the cache record"))?;
        Ok(dir)
    }

    /// Evicts least recently used entries until `needed` more bytes fit the bound. Entries
    /// whose lock is held (being placed into a pod) and `keep` stay. Returns the evicted keys.
    pub fn make_room(&self, needed: u64, keep: &str) -> Result<Vec<String>, FetchError> {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by_key(|e| e.last_used);
        let mut evicted = Vec::new();
        let locks = self.root.join("locks");
        let _ = std::fs::create_dir_all(&locks);
        for candidate in entries {
            if total.saturating_add(needed) <= self.max_bytes {
                break;
            }
            if candidate.key == keep {
                continue;
            }
            let Ok(lock) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(locks.join(&candidate.key))
            else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue;
            }
            // The record goes first: without it the directory is no longer an entry.
            let _ = std::fs::remove_file(self.entry_record(&candidate.key));
            std::fs::remove_dir_all(self.entry_dir(&candidate.key)).map_err(FetchError::io(
                format!("evicting {} from the node cache", candidate.key),
            ))?;
            tracing::info!(
                key = candidate.key,
                bytes = candidate.bytes,
                "evicted from the node cache"
            );
            total -= candidate.bytes;
            evicted.push(candidate.key);
        }
        if total.saturating_add(needed) > self.max_bytes {
            tracing::warn!(
                total,
                needed,
                max_bytes = self.max_bytes,
                "the node cache stays over its bound: the entries left are in use"
            );
        }
        Ok(evicted)
    }

    fn entries(&self) -> Vec<Listed> {
        let Ok(dir) = std::fs::read_dir(self.root.join("entries")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|item| {
                let name = item.file_name().into_string().ok()?;
                let key = name.strip_suffix(".json")?.to_owned();
                let last_used = item.metadata().ok()?.modified().ok()?;
                let entry: Entry =
                    serde_json::from_slice(&std::fs::read(item.path()).ok()?).ok()?;
                Some(Listed {
                    key,
                    bytes: entry.bytes(),
                    last_used,
                })
            })
            .collect()
    }
}

struct Listed {
    key: String,
    bytes: u64,
    last_used: SystemTime,
}

/// How the files reached the pod's model directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placed {
    pub linked: usize,
    pub copied: usize,
}

/// Where `file` goes under `dest`, its directories made.
pub(crate) fn target_in(dest: &Path, file: &FileDigest) -> Result<PathBuf, FetchError> {
    let target = dest.join(&file.path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(FetchError::write(
            dest,
            file.size,
            format!("creating {}", parent.display()),
        ))?;
    }
    Ok(target)
}

/// Puts `files` of the directory `from` into `dest`: hard links where both are on one
/// filesystem, copies where not.
pub fn place(from: &Path, files: &[FileDigest], dest: &Path) -> Result<Placed, FetchError> {
    let mut placed = Placed::default();
    for file in files {
        let source = from.join(&file.path);
        let target = target_in(dest, file)?;
        let _ = std::fs::remove_file(&target);
        match std::fs::hard_link(&source, &target) {
            Ok(()) => placed.linked += 1,
            Err(_) => {
                std::fs::copy(&source, &target).map_err(FetchError::write(
                    dest,
                    file.size,
                    format!("copying {} from the node cache", file.path),
                ))?;
                placed.copied += 1;
            }
        }
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weights-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn add(cache: &NodeCache, key: &str, bytes: usize, used: SystemTime) {
        let partial = cache.partial(key);
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("model.bin"), vec![7u8; bytes]).unwrap();
        let entry = Entry {
            source: format!("s3://b/{key}"),
            files: vec![FileDigest {
                path: "model.bin".into(),
                size: bytes as u64,
                sha256: None,
            }],
        };
        cache.commit(key, &entry).unwrap();
        File::options()
            .write(true)
            .open(cache.entry_record(key))
            .unwrap()
            .set_modified(used)
            .unwrap();
    }

    #[test]
    fn eviction_removes_the_least_recently_used_entries_until_the_new_one_fits() {
        let root = scratch("lru");
        let cache = NodeCache::new(&root, 300);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        add(&cache, "old", 100, t0);
        add(&cache, "used-lately", 100, t0 + Duration::from_secs(20));
        add(&cache, "middle", 100, t0 + Duration::from_secs(10));
        cache.touch("old");

        let evicted = cache.make_room(150, "new").unwrap();

        assert_eq!(
            evicted,
            ["middle", "used-lately"],
            "touch made `old` the newest"
        );
        assert!(cache.entry("old").is_some());
        assert!(cache.entry("middle").is_none());
        assert!(!root.join("entries/middle").exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn an_entry_whose_lock_is_held_is_not_evicted() {
        let root = scratch("held");
        let cache = NodeCache::new(&root, 100);
        add(&cache, "in-use", 100, SystemTime::UNIX_EPOCH);
        let (_held, contention) = cache.lock("in-use").await.unwrap();
        assert_eq!(contention, Contention::Free);

        assert!(cache.make_room(50, "new").unwrap().is_empty());
        assert!(cache.entry("in-use").is_some());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_without_its_record_is_not_an_entry() {
        let root = scratch("record");
        let cache = NodeCache::new(&root, 1000);
        add(&cache, "k", 10, SystemTime::now());
        std::fs::remove_file(cache.entry_record("k")).unwrap();
        assert!(cache.entry("k").is_none());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn placing_links_the_cached_files_into_the_pod_directory() {
        let root = scratch("place");
        let from = root.join("from/sub");
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("w.bin"), b"weights").unwrap();
        let files = [FileDigest {
            path: "sub/w.bin".into(),
            size: 7,
            sha256: None,
        }];
        let placed = place(&root.join("from"), &files, &root.join("dest")).unwrap();
        assert_eq!(
            placed,
            Placed {
                linked: 1,
                copied: 0
            }
        );
        assert_eq!(
            std::fs::read(root.join("dest/sub/w.bin")).unwrap(),
            b"weights"
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
