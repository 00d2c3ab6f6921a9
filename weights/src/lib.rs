//! Model weights from where users keep them into a pod's model directory: an https URL, a
//! prefix of an S3-compatible store, Google Cloud Storage or Azure Blob, or a Hugging Face Hub
//! repository, through a node cache keyed by content. `infergate-runtime download` (the runtime image's init container) runs
//! [`fetch`] and writes its one-line outcome to the container's termination message, which the
//! operator turns into the ModelDeployment's `ModelFetched` condition.

pub mod cache;
mod client;
mod error;
pub mod https;
pub mod hub;
mod source;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use error::FetchError;
pub use source::{Source, SourceError, StoreKind};

use cache::{Contention, Entry, FileDigest, NodeCache};
use store::{Remote, StoreOptions, Transfer};

/// A model to fetch, and where to.
#[derive(Debug, Clone)]
pub struct Request {
    pub source: Source,
    /// The pod's model directory.
    pub dest: PathBuf,
    /// The SHA-256 an https body must have.
    pub sha256: Option<String>,
    pub store: StoreOptions,
    pub cache: Option<NodeCache>,
    pub transfer: Transfer,
}

/// Where the files came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Over the network.
    Downloaded,
    /// From the node cache, downloaded earlier.
    CacheHit,
    /// From the node cache, after waiting for another pod's download of the same model.
    Coalesced { waited: Duration },
    /// Already in the model directory (a restarted init container of the same pod).
    AlreadyPlaced,
}

impl Outcome {
    /// A condition reason: one CamelCase word.
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Downloaded => "Downloaded",
            Outcome::CacheHit => "CacheHit",
            Outcome::Coalesced { .. } => "CacheHitAfterWait",
            Outcome::AlreadyPlaced => "AlreadyPresent",
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub source: String,
    pub outcome: Outcome,
    /// The content key (manifest hash, listing hash or body digest); none for an https body
    /// without a sha256, which has no content identity to cache by.
    pub key: Option<String>,
    pub files: usize,
    pub bytes: u64,
    /// Bytes that came over the network in this attempt.
    pub received: u64,
    pub elapsed: Duration,
    /// What the files were checked against.
    pub verified_by: Option<&'static str>,
    /// Whether the node cache took part.
    pub cached: bool,
    /// The commit a Hub revision resolved to.
    pub commit: Option<String>,
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl Fetched {
    /// One line for the termination message and the condition: `REASON: what happened`.
    pub fn message(&self) -> String {
        let mut line = format!(
            "{}: {}: {} files, {}",
            self.outcome.reason(),
            self.source,
            self.files,
            megabytes(self.bytes)
        );
        let seconds = self.elapsed.as_secs_f64();
        match self.outcome {
            Outcome::Downloaded => {
                line.push_str(&format!(
                    " downloaded in {seconds:.1} s ({}/s)",
                    megabytes((self.received as f64 / seconds.max(1e-3)) as u64)
                ));
                if self.received < self.bytes {
                    line.push_str(&format!(
                        ", {} resumed from an earlier attempt",
                        megabytes(self.bytes - self.received)
                    ));
                }
                if self.cached {
                    line.push_str(", kept in the node cache");
                }
            }
            Outcome::CacheHit => line.push_str(" from the node cache"),
            Outcome::Coalesced { waited } => line.push_str(&format!(
                " from the node cache after waiting {:.1} s for another pod's download of it",
                waited.as_secs_f64()
            )),
            Outcome::AlreadyPlaced => line.push_str(" already in the model directory"),
        }
        if let Some(commit) = &self.commit {
            line.push_str(&format!("; commit {commit}"));
        }
        if let Some(by) = self.verified_by {
            line.push_str(&format!("; checked against {by}"));
        }
        if let Some(key) = &self.key {
            line.push_str(&format!("; key {}", &key[..key.len().min(12)]));
        }
        line
    }
}

/// Marks a model directory complete; holds the content key it was filled from.
const PLACED_MARKER: &str = ".infergate-fetched";

/// Fetches `request.source` into `request.dest`.
pub async fn fetch(request: &Request) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let received = AtomicU64::new(0);
    let mut fetched = match &request.source {
        Source::Https { url } => fetch_https(request, url, &received).await?,
        Source::Store {
            kind,
            bucket,
            prefix,
        } => {
            let remote = Remote::open(*kind, bucket, prefix, &request.store)?;
            let listing = remote.list().await?;
            fetch_listing(request, &remote, &listing, &received).await?
        }
        Source::Hub { repo, revision } => {
            hub::Hub::check_credentials(&request.store, &request.source.to_string())?;
            let hub = hub::Hub::new(repo, revision, &request.store);
            let (commit, listing) = hub.list().await?;
            let remote = hub.remote(&commit)?;
            let mut fetched = fetch_listing(request, &remote, &listing, &received).await?;
            fetched.commit = Some(commit);
            fetched
        }
    };
    fetched.received = received.load(Ordering::Relaxed);
    fetched.elapsed = started.elapsed();
    Ok(fetched)
}

fn blank(request: &Request, outcome: Outcome, key: Option<String>) -> Fetched {
    Fetched {
        source: request.source.to_string(),
        outcome,
        key,
        files: 0,
        bytes: 0,
        received: 0,
        elapsed: Duration::ZERO,
        verified_by: None,
        cached: request.cache.is_some(),
        commit: None,
    }
}

fn placed_key(dest: &Path) -> Option<String> {
    std::fs::read_to_string(dest.join(PLACED_MARKER)).ok()
}

fn mark_placed(dest: &Path, key: &str) -> Result<(), FetchError> {
    std::fs::write(dest.join(PLACED_MARKER), key).map_err(FetchError::write(
        dest,
        0,
        "writing the completion marker",
    ))
}

/// Fetches the files `listing` names from `remote`, through the node cache where there is one.
async fn fetch_listing(
    request: &Request,
    remote: &Remote,
    listing: &store::Listing,
    received: &AtomicU64,
) -> Result<Fetched, FetchError> {
    let key = listing.key(&request.source.to_string());
    let verified_by = listing.manifest.as_ref().map(|m| m.named);
    let mut fetched = blank(request, Outcome::Downloaded, Some(key.clone()));
    fetched.files = listing.files.len();
    fetched.bytes = listing.bytes();
    fetched.verified_by = verified_by;
    if placed_key(&request.dest).as_deref() == Some(key.as_str()) {
        fetched.outcome = Outcome::AlreadyPlaced;
        return Ok(fetched);
    }
    let Some(cache) = &request.cache else {
        let partial = request.dest.join(".infergate-partial");
        let files = remote
            .download(listing, &partial, request.transfer, received)
            .await?;
        move_into(&partial, &files, &request.dest)?;
        mark_placed(&request.dest, &key)?;
        return Ok(fetched);
    };
    if fetched.bytes > cache.max_bytes() {
        return Err(FetchError::LargerThanCache {
            source_uri: fetched.source,
            bytes: fetched.bytes,
            max_bytes: cache.max_bytes(),
        });
    }
    through_cache(
        request,
        cache,
        &key,
        &mut fetched,
        Some(listing.bytes()),
        |partial| async move {
            remote
                .download(listing, &partial, request.transfer, received)
                .await
        },
    )
    .await?;
    Ok(fetched)
}

/// Serves `key` through the node cache, holding its lock: its entry when there is one (after
/// waiting for a pod that is filling it, if one is), else what `fill` downloads into the
/// cache's staging directory, committed as the entry. Then places the entry's files in the
/// model directory and marks it complete. `expected_bytes`, when known before the download,
/// makes room first; otherwise room is made once the files are there.
async fn through_cache<Fill, Filled>(
    request: &Request,
    cache: &NodeCache,
    key: &str,
    fetched: &mut Fetched,
    expected_bytes: Option<u64>,
    fill: Fill,
) -> Result<(), FetchError>
where
    Fill: FnOnce(PathBuf) -> Filled,
    Filled: std::future::Future<Output = Result<Vec<FileDigest>, FetchError>>,
{
    let (_lock, contention) = cache.lock(key).await?;
    let (dir, entry) = match cache.entry(key) {
        Some((dir, entry)) => {
            cache.touch(key);
            fetched.outcome = match contention {
                Contention::Free => Outcome::CacheHit,
                Contention::Waited(waited) => Outcome::Coalesced { waited },
            };
            (dir, entry)
        }
        None => {
            if let Some(bytes) = expected_bytes {
                cache.make_room(bytes, key)?;
            }
            let files = fill(cache.partial(key)).await?;
            let entry = Entry {
                source: fetched.source.clone(),
                files,
            };
            if expected_bytes.is_none() {
                cache.make_room(entry.bytes(), key)?;
            }
            (cache.commit(key, &entry)?, entry)
        }
    };
    fetched.files = entry.files.len();
    fetched.bytes = entry.bytes();
    cache::place(&dir, &entry.files, &request.dest)?;
    mark_placed(&request.dest, key)
}

async fn fetch_https(
    request: &Request,
    url: &str,
    received: &AtomicU64,
) -> Result<Fetched, FetchError> {
    let download = |dest: PathBuf| https::Download {
        url: url.to_owned(),
        sha256: request.sha256.clone(),
        dest,
    };
    let verified_by = request.sha256.as_ref().map(|_| "spec.model.sha256");
    // Without a digest the body has no identity to share between pods.
    let (Some(cache), Some(sha256)) = (&request.cache, &request.sha256) else {
        let bytes = download(request.dest.clone()).run().await?.bytes;
        received.store(bytes, Ordering::Relaxed);
        let mut fetched = blank(request, Outcome::Downloaded, request.sha256.clone());
        let files = walk(&request.dest)?;
        fetched.files = files.len();
        fetched.bytes = files.iter().map(|f| f.size).sum();
        fetched.verified_by = verified_by;
        fetched.cached = false;
        return Ok(fetched);
    };
    let key = sha256.to_ascii_lowercase();
    let mut fetched = blank(request, Outcome::Downloaded, Some(key.clone()));
    fetched.verified_by = verified_by;
    if placed_key(&request.dest).as_deref() == Some(key.as_str()) {
        fetched.outcome = Outcome::AlreadyPlaced;
        return Ok(fetched);
    }
    through_cache(
        request,
        cache,
        &key,
        &mut fetched,
        None,
        |partial| async move {
            let done = download(partial.clone()).run().await?;
            received.store(done.bytes, Ordering::Relaxed);
            walk(&partial)
        },
    )
    .await?;
    Ok(fetched)
}

/// Moves a finished download out of its staging directory into the model directory.
fn move_into(staging: &Path, files: &[FileDigest], dest: &Path) -> Result<(), FetchError> {
    for file in files {
        let target = cache::target_in(dest, file)?;
        std::fs::rename(staging.join(&file.path), &target)
            .map_err(FetchError::io(format!("moving {} into place", file.path)))?;
    }
    std::fs::remove_dir_all(staging).map_err(FetchError::io("removing the staging directory"))
}

/// The regular files under `dir` (dot files excluded: this crate's own markers), relative.
fn walk(dir: &Path) -> Result<Vec<FileDigest>, FetchError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let listing = std::fs::read_dir(&current)
            .map_err(FetchError::io(format!("listing {}", current.display())))?;
        for item in listing {
            let item = item.map_err(FetchError::io(format!("listing {}", current.display())))?;
            let path = item.path();
            if item.file_name().to_string_lossy().starts_with(".infergate") {
                continue;
            }
            let kind = item
                .file_type()
                .map_err(FetchError::io(format!("reading {}", path.display())))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let size = item
                    .metadata()
                    .map_err(FetchError::io(format!("reading {}", path.display())))?
                    .len();
                let relative = path.strip_prefix(dir).expect("under dir");
                files.push(FileDigest {
                    path: relative.to_string_lossy().into_owned(),
                    size,
                    sha256: None,
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}
