//! Object stores (S3 and its compatibles, GCS, Azure Blob) through `object_store`: the listing of
//! a prefix, its content key, and a download in parallel ranges that resumes where it stopped.
//!
//! What is trusted as content: a `SHA256SUMS` object in the prefix (`sha256sum`'s format) when
//! there is one; every file is checked against it and its hash is the cache key. ETags are not
//! content hashes in general (S3's is an MD5 only for single-part uploads without SSE-KMS, a
//! multipart one hashes the parts' hashes, GCS's and Azure's are opaque), so they serve only as
//! versions: each range is asked for `If-Match` its object's ETag, so a file is never stitched
//! from two versions, and without a manifest the key is the listing's paths, sizes and ETags.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};
use sha2::{Digest, Sha256};

use crate::cache::FileDigest;
use crate::client::{Connector, Http};
use crate::error::FetchError;
use crate::source::StoreKind;

/// The manifest of per-file digests a prefix may carry.
pub const MANIFEST: &str = "SHA256SUMS";

/// How to reach a store, beyond its URI.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// An S3-compatible or Azure endpoint (`http://minio.storage:9000`); the provider's own
    /// when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `https://ENDPOINT/BUCKET/KEY` instead of `https://BUCKET.ENDPOINT/KEY`, as most
    /// self-hosted S3 servers want.
    pub path_style: bool,
    /// The Secret the credentials came from, named in messages (its values never are).
    pub credentials_secret: Option<String>,
    /// Credentials by the names the providers' SDKs give their variables
    /// (`AWS_ACCESS_KEY_ID`, ...); they win over the environment's.
    pub credentials: Vec<(String, String)>,
}

impl StoreOptions {
    /// Reads credentials from a mounted Secret: one file per key (dot files are the kubelet's
    /// own bookkeeping).
    pub fn read_credentials(&mut self, dir: &Path) -> Result<(), FetchError> {
        let listing =
            std::fs::read_dir(dir).map_err(FetchError::io(format!("reading {}", dir.display())))?;
        for item in listing {
            let item = item.map_err(FetchError::io(format!("reading {}", dir.display())))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !item.path().is_file() {
                continue;
            }
            let value = std::fs::read_to_string(item.path())
                .map_err(FetchError::io(format!("reading the credential {name}")))?;
            self.credentials
                .push((name, value.trim_end_matches(['\n', '\r']).to_owned()));
        }
        Ok(())
    }
}

/// How a download is split.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Range requests in flight at once, over all files.
    pub concurrency: usize,
    /// Bytes per range request.
    pub chunk_bytes: u64,
    /// Attempts per range after a broken transfer (each resumes at the last byte received).
    pub attempts: u32,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            concurrency: 16,
            chunk_bytes: 16 << 20,
            attempts: 8,
        }
    }
}

/// Retries of one request (connection refused, 5xx, throttling); a broken body is resumed by
/// the download itself.
pub(crate) fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
        ..RetryConfig::default()
    }
}

/// Sets each credential on a store's builder by the provider's variable name; a name the
/// provider does not know is `unknown`'s error.
fn with_credentials<B, K: std::str::FromStr>(
    mut builder: B,
    credentials: &[(String, String)],
    set: impl Fn(B, K, &str) -> B,
    unknown: impl Fn(&str) -> FetchError,
) -> Result<B, FetchError> {
    for (name, value) in credentials {
        let key = name
            .to_ascii_lowercase()
            .parse()
            .map_err(|_| unknown(name))?;
        builder = set(builder, key, value);
    }
    Ok(builder)
}

/// A store and the prefix of one model in it.
#[derive(Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    uri: String,
    secret: Option<String>,
}

/// One object to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    location: ObjectPath,
    /// Relative to the prefix.
    pub path: String,
    pub size: u64,
    pub etag: Option<String>,
}

impl RemoteFile {
    pub fn new(location: ObjectPath, path: String, size: u64, etag: Option<String>) -> RemoteFile {
        RemoteFile {
            location,
            path,
            size,
            etag,
        }
    }
}

/// A prefix's objects, and its manifest's digests where it has one.
#[derive(Debug)]
pub struct Listing {
    pub files: Vec<RemoteFile>,
    pub manifest: Option<Manifest>,
}

/// The digests files are checked against, from a trusted source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Path → lower-case hex SHA-256.
    pub digests: BTreeMap<String, String>,
    /// The content key of the whole: the SHA-256 of a SHA256SUMS object, or a Hub commit's.
    pub key: String,
    /// Where the digests came from, for messages.
    pub named: &'static str,
}

pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// `sha256sum`'s output: `HEX  PATH` or `HEX *PATH` per line.
    pub fn parse(text: &[u8]) -> Result<Manifest, String> {
        let mut digests = BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                continue;
            }
            let (digest, path) = line
                .split_once(' ')
                .map(|(d, p)| (d, p.trim_start_matches([' ', '*'])))
                .filter(|(d, p)| {
                    d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) && !p.is_empty()
                })
                .ok_or_else(|| format!("line {}: expected `SHA256  PATH`", number + 1))?;
            digests.insert(
                path.trim_start_matches("./").to_owned(),
                digest.to_ascii_lowercase(),
            );
        }
        Ok(Manifest {
            digests,
            key: hex(&Sha256::digest(text)),
            named: MANIFEST,
        })
    }
}

impl Listing {
    /// The content key: the manifest's hash where there is one, else a hash of what names each
    /// object's version.
    pub fn key(&self, uri: &str) -> String {
        if let Some(manifest) = &self.manifest {
            return manifest.key.clone();
        }
        let mut hasher = Sha256::new();
        hasher.update(uri.as_bytes());
        for file in &self.files {
            hasher.update(format!(
                "\n{}\t{}\t{}",
                file.path,
                file.size,
                file.etag.as_deref().unwrap_or("-")
            ));
        }
        hex(&hasher.finalize())
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

impl Remote {
    /// The store of `kind` holding `bucket`, with credentials from the environment (the
    /// variables each provider's SDK reads: `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT_KEY`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, ... or the pod's workload identity).
    pub fn open(
        kind: StoreKind,
        bucket: &str,
        prefix: &str,
        options: &StoreOptions,
    ) -> Result<Remote, FetchError> {
        let uri = format!("{}://{bucket}/{prefix}", kind.scheme());
        let retry = retry_config();
        let connector = || {
            Http::new(None)
                .map(Connector)
                .map_err(|e| FetchError::Store {
                    source_uri: uri.clone(),
                    detail: format!("loading the system's root certificates: {e}"),
                })
        };
        let plain_http = options
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let unknown = |name: &str| FetchError::Store {
            source_uri: uri.clone(),
            detail: format!(
                "{} has the key {name}, which is no {} credential; expected {}",
                options
                    .credentials_secret
                    .as_deref()
                    .map_or("the credentials".to_owned(), |s| format!("Secret {s}")),
                kind.scheme(),
                match kind {
                    StoreKind::S3 => "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN",
                    StoreKind::Gcs => "GOOGLE_SERVICE_ACCOUNT_KEY",
                    StoreKind::Azure =>
                        "AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY",
                }
            ),
        };
        let store: Result<Arc<dyn ObjectStore>, object_store::Error> = match kind {
            StoreKind::S3 => {
                let builder = with_credentials(
                    object_store::aws::AmazonS3Builder::from_env(),
                    &options.credentials,
                    |b, key, value| b.with_config(key, value),
                    unknown,
                )?;
                let mut builder = builder
                    .with_bucket_name(bucket)
                    .with_http_connector(connector()?)
                    .with_retry(retry)
                    .with_allow_http(plain_http)
                    .with_virtual_hosted_style_request(!options.path_style);
                if let Some(endpoint) = &options.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &options.region {
                    builder = builder.with_region(region);
                }
                builder.build().map(|s| Arc::new(s) as _)
            }
            StoreKind::Gcs => {
                let builder = with_credentials(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env(),
                    &options.credentials,
                    |b, key, value| b.with_config(key, value),
                    unknown,
                )?;
                builder
                    .with_bucket_name(bucket)
                    .with_http_connector(connector()?)
                    .with_retry(retry)
                    .build()
                    .map(|s| Arc::new(s) as _)
            }
            StoreKind::Azure => {
                let builder = with_credentials(
                    object_store::azure::MicrosoftAzureBuilder::from_env(),
                    &options.credentials,
                    |b, key, value| b.with_config(key, value),
                    unknown,
                )?;
                let mut builder = builder
                    .with_container_name(bucket)
                    .with_http_connector(connector()?)
                    .with_retry(retry)
                    .with_allow_http(plain_http);
                if let Some(endpoint) = &options.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                builder.build().map(|s| Arc::new(s) as _)
            }
        };
        let store = store.map_err(|e| FetchError::Store {
            source_uri: uri.clone(),
            detail: format!("configuring the client: {e}"),
        })?;
        Ok(Remote {
            store,
            prefix: prefix.to_owned(),
            uri,
            secret: options.credentials_secret.clone(),
        })
    }

    /// A store whose files a listing from elsewhere names (the Hub's API).
    pub fn from_store(store: Arc<dyn ObjectStore>, uri: String, secret: Option<String>) -> Remote {
        Remote {
            store,
            prefix: String::new(),
            uri,
            secret,
        }
    }

    /// What `object_store` said, sorted by what to do about it. Some of its paths (listing)
    /// report a refusal as a generic error, so the HTTP status in the message counts too.
    fn classify(&self, what: &str, error: object_store::Error) -> FetchError {
        let full = chain(&error);
        let status = http_status(&full);
        let detail = short_detail(&full, status);
        let denied = matches!(
            error,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        );
        if denied || matches!(status, Some(401 | 403)) {
            return FetchError::CredentialsRefused {
                source_uri: self.uri.clone(),
                secret: self.secret.clone(),
                detail,
            };
        }
        if matches!(error, object_store::Error::NotFound { .. }) || status == Some(404) {
            return FetchError::NotFound {
                source_uri: self.uri.clone(),
                what: what.to_owned(),
                detail,
                fix: "check the bucket and prefix in spec.model.uri",
            };
        }
        if matches!(error, object_store::Error::Precondition { .. }) || status == Some(412) {
            return FetchError::ObjectChanged {
                source_uri: self.uri.clone(),
                file: what.to_owned(),
                detail,
            };
        }
        if status.is_none() && (full.contains("error sending request") || full.contains("onnect")) {
            return FetchError::Unreachable {
                source_uri: self.uri.clone(),
                detail,
            };
        }
        FetchError::Store {
            source_uri: self.uri.clone(),
            detail,
        }
    }

    /// Every object under the prefix, and its manifest.
    pub async fn list(&self) -> Result<Listing, FetchError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let objects: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.classify("the bucket", e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut files: Vec<RemoteFile> = objects
            .into_iter()
            .filter_map(|meta| {
                let path = meta
                    .location
                    .as_ref()
                    .strip_prefix(strip.as_str())?
                    .to_owned();
                // Folder markers that consoles create are not files.
                (!path.is_empty() && !path.ends_with('/')).then_some(RemoteFile {
                    location: meta.location,
                    path,
                    size: meta.size,
                    etag: meta.e_tag,
                })
            })
            .collect();
        if files.is_empty() {
            return Err(FetchError::EmptyPrefix {
                source_uri: self.uri.clone(),
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = match files.iter().find(|f| f.path == MANIFEST) {
            None => None,
            Some(file) => {
                let body = self
                    .store
                    .get(&file.location)
                    .await
                    .map_err(|e| self.classify(MANIFEST, e))?
                    .bytes()
                    .await
                    .map_err(|e| self.classify(MANIFEST, e))?;
                let manifest = Manifest::parse(&body).map_err(|why| FetchError::Store {
                    source_uri: self.uri.clone(),
                    detail: format!("{MANIFEST}: {why}"),
                })?;
                let listed: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
                if let Some(missing) = manifest
                    .digests
                    .keys()
                    .find(|p| !listed.contains(p.as_str()))
                {
                    return Err(FetchError::MissingFromStore {
                        source_uri: self.uri.clone(),
                        file: missing.clone(),
                    });
                }
                Some(manifest)
            }
        };
        Ok(Listing { files, manifest })
    }

    /// Downloads `listing` into `dir`, resuming what an earlier attempt left there, and checks
    /// each file against the manifest. Returns every file's digest; `received` counts the bytes
    /// that came over the network.
    pub async fn download(
        &self,
        listing: &Listing,
        dir: &Path,
        transfer: Transfer,
        received: &AtomicU64,
    ) -> Result<Vec<FileDigest>, FetchError> {
        let total = listing.bytes();
        std::fs::create_dir_all(dir).map_err(FetchError::write(
            dir,
            total,
            format!("creating {}", dir.display()),
        ))?;
        let journal = Journal::open(dir, listing)?;
        let mut outputs = Vec::new();
        for file in &listing.files {
            let path = dir.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(FetchError::write(
                    dir,
                    total,
                    format!("creating {}", parent.display()),
                ))?;
            }
            let out = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(FetchError::write(
                    dir,
                    total,
                    format!("creating {}", file.path),
                ))?;
            out.set_len(file.size).map_err(FetchError::write(
                dir,
                total,
                format!("sizing {}", file.path),
            ))?;
            outputs.push(Arc::new(out));
        }
        let chunk_bytes = transfer.chunk_bytes.max(1);
        let chunks: Vec<Chunk> = listing
            .files
            .iter()
            .enumerate()
            .flat_map(|(file, f)| {
                (0..f.size.div_ceil(chunk_bytes)).map(move |index| Chunk {
                    file,
                    index,
                    start: index * chunk_bytes,
                    end: ((index + 1) * chunk_bytes).min(f.size),
                })
            })
            .filter(|c| !journal.done(c))
            .collect();
        let resumed = listing
            .files
            .iter()
            .map(|f| f.size.div_ceil(chunk_bytes))
            .sum::<u64>() as usize
            - chunks.len();
        if resumed > 0 {
            tracing::info!(
                chunks_left = chunks.len(),
                resumed,
                "resuming an earlier download"
            );
        }
        // Each file is hashed as soon as its last range is in, while the others download.
        let mut left: Vec<usize> = vec![0; listing.files.len()];
        for chunk in &chunks {
            left[chunk.file] += 1;
        }
        let left: Vec<AtomicUsize> = left.into_iter().map(AtomicUsize::new).collect();
        let hashes: Vec<std::sync::Mutex<Option<Hashing>>> = listing
            .files
            .iter()
            .enumerate()
            .map(|(i, file)| {
                let ready = left[i].load(Ordering::Relaxed) == 0;
                std::sync::Mutex::new(ready.then(|| hash_in_background(dir.join(&file.path))))
            })
            .collect();
        let (journal, outputs, left, hashes) = (&journal, &outputs, &left, &hashes);
        futures::stream::iter(chunks)
            .map(|chunk| async move {
                let file = &listing.files[chunk.file];
                self.fetch_chunk(
                    file,
                    &chunk,
                    &outputs[chunk.file],
                    transfer,
                    received,
                    dir,
                    total,
                )
                .await?;
                if left[chunk.file].fetch_sub(1, Ordering::AcqRel) == 1 {
                    *hashes[chunk.file].lock().expect("hash slot") =
                        Some(hash_in_background(dir.join(&file.path)));
                }
                journal.record(&chunk)
            })
            .buffer_unordered(transfer.concurrency.max(1))
            .try_collect::<()>()
            .await?;
        let mut digests = Vec::with_capacity(listing.files.len());
        for (file, hashing) in listing.files.iter().zip(hashes) {
            let hashing = hashing
                .lock()
                .expect("hash slot")
                .take()
                .expect("every file hashed");
            let actual = hashing
                .await
                .map_err(|e| FetchError::io("hashing")(std::io::Error::other(e)))?
                .map_err(FetchError::io(format!("hashing {}", file.path)))?;
            digests.push(self.check(listing, dir, file, actual)?);
        }
        journal.finish();
        Ok(digests)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_chunk(
        &self,
        file: &RemoteFile,
        chunk: &Chunk,
        out: &File,
        transfer: Transfer,
        received: &AtomicU64,
        dir: &Path,
        total: u64,
    ) -> Result<(), FetchError> {
        let mut offset = chunk.start;
        let mut attempt = 0;
        loop {
            let options = GetOptions {
                range: Some(GetRange::Bounded(offset..chunk.end)),
                if_match: file.etag.clone(),
                ..GetOptions::default()
            };
            let outcome = async {
                let mut body = self
                    .store
                    .get_opts(&file.location, options)
                    .await?
                    .into_stream();
                while let Some(bytes) = body.next().await {
                    let bytes = bytes?;
                    let end = offset + bytes.len() as u64;
                    if end > chunk.end {
                        return Err(object_store::Error::Generic {
                            store: "range",
                            source: format!(
                                "the store sent more than the range {}..{}",
                                chunk.start, chunk.end
                            )
                            .into(),
                        });
                    }
                    out.write_all_at(&bytes, offset)
                        .map_err(|e| object_store::Error::Generic {
                            store: "disk",
                            source: Box::new(e),
                        })?;
                    received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    offset = end;
                }
                Ok(())
            }
            .await;
            let error = match outcome {
                Ok(()) if offset == chunk.end => return Ok(()),
                Ok(()) => object_store::Error::Generic {
                    store: "range",
                    source: format!(
                        "the body ended at byte {offset} of {}..{}",
                        chunk.start, chunk.end
                    )
                    .into(),
                },
                Err(object_store::Error::Generic {
                    store: "disk",
                    source,
                }) => {
                    let io = match source.downcast::<std::io::Error>() {
                        Ok(io) => *io,
                        Err(other) => std::io::Error::other(other.to_string()),
                    };
                    return Err(FetchError::write(
                        dir,
                        total,
                        format!("writing {}", file.path),
                    )(io));
                }
                Err(error) => error,
            };
            let fatal = matches!(
                error,
                object_store::Error::NotFound { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::Precondition { .. }
            );
            attempt += 1;
            if fatal || attempt >= transfer.attempts {
                return Err(self.classify(&file.path, error));
            }
            tracing::warn!(file = file.path, offset, attempt, error = %chain(&error), "transfer broken; resuming");
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
        }
    }

    /// Compares a downloaded file's digest with the manifest's.
    fn check(
        &self,
        listing: &Listing,
        dir: &Path,
        file: &RemoteFile,
        actual: String,
    ) -> Result<FileDigest, FetchError> {
        let expected = listing
            .manifest
            .as_ref()
            .and_then(|m| Some((m.digests.get(&file.path)?, m.named)));
        if let Some((expected, named)) = expected
            && *expected != actual
        {
            // A corrupt part is not resumed: the next attempt fetches the file again.
            let _ = std::fs::remove_file(dir.join(&file.path));
            let _ = std::fs::remove_file(dir.join(JOURNAL));
            return Err(FetchError::DigestMismatch {
                source_uri: self.uri.clone(),
                file: file.path.clone(),
                expected: expected.clone(),
                expected_from: named.to_owned(),
                actual,
            });
        }
        Ok(FileDigest {
            path: file.path.clone(),
            size: file.size,
            sha256: Some(actual),
        })
    }
}

type Hashing = tokio::task::JoinHandle<std::io::Result<String>>;

fn hash_in_background(path: PathBuf) -> Hashing {
    tokio::task::spawn_blocking(move || sha256_file(&path))
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// The status code in `object_store`'s "Server returned non-2xx status code: 403 Forbidden".
fn http_status(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// What a person needs of a store's refusal: the status and the S3 error's code and message,
/// not its XML (string to sign, bytes, request ids).
fn short_detail(message: &str, status: Option<u16>) -> String {
    let element = |name: &str| {
        let (_, rest) = message.split_once(&format!("<{name}>"))?;
        rest.split_once(&format!("</{name}>"))
            .map(|(value, _)| value.to_owned())
    };
    match (status, element("Code"), element("Message")) {
        (Some(status), Some(code), message) => {
            let mut detail = format!("HTTP {status} {code}");
            if let Some(message) = message {
                detail.push_str(": ");
                detail.push_str(&message);
            }
            detail
        }
        (Some(status), None, _) => format!("HTTP {status}"),
        _ => message.chars().take(300).collect(),
    }
}

/// The error and its causes: `object_store`'s top-level messages leave out the server's words.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// When this node booted (`btime` of /proc/stat); none where there is no such file.
fn boot_time() -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let seconds: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(seconds))
}

struct Chunk {
    file: usize,
    index: u64,
    start: u64,
    end: u64,
}

/// The ranges already written, one line `FILE-INDEX CHUNK-INDEX` each, appended as each range
/// ends. Unsynced, so it holds across a killed process (the kernel keeps both the writes and
/// the journal) but not across a crashed node: a journal last written before the node booted
/// is ignored and the download starts over. A listing that changed (another version, another
/// split) invalidates it too.
const JOURNAL: &str = ".infergate-ranges";

struct Journal {
    path: PathBuf,
    done: HashSet<(usize, u64)>,
    out: std::sync::Mutex<File>,
}

impl Journal {
    fn open(dir: &Path, listing: &Listing) -> Result<Journal, FetchError> {
        let path = dir.join(JOURNAL);
        let header = format!(
            "{}\n",
            hex(&Sha256::digest(
                listing
                    .files
                    .iter()
                    .map(|f| format!("{}\t{}\t{:?}\n", f.path, f.size, f.etag))
                    .collect::<String>()
            ))
        );
        let written_this_boot = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|at| boot_time().is_some_and(|boot| at >= boot));
        let existing = if written_this_boot {
            std::fs::read_to_string(&path).unwrap_or_default()
        } else {
            String::new()
        };
        let mut done = HashSet::new();
        if let Some(rest) = existing.strip_prefix(header.as_str()) {
            for line in rest.lines() {
                if let Some((file, chunk)) = line.split_once(' ')
                    && let (Ok(file), Ok(chunk)) = (file.parse(), chunk.parse())
                {
                    done.insert((file, chunk));
                }
            }
        } else {
            std::fs::write(&path, &header).map_err(FetchError::write(
                dir,
                0,
                "writing the download journal",
            ))?;
        }
        let out = File::options()
            .append(true)
            .open(&path)
            .map_err(FetchError::io("opening the download journal"))?;
        Ok(Journal {
            path,
            done,
            out: std::sync::Mutex::new(out),
        })
    }

    fn done(&self, chunk: &Chunk) -> bool {
        self.done.contains(&(chunk.file, chunk.index))
    }

    /// Notes `chunk` as written. Not synced: a killed process leaves its writes in the page
    /// cache, and a journal from before the node's last boot is not trusted (see `open`).
    fn record(&self, chunk: &Chunk) -> Result<(), FetchError> {
        let mut out = self.out.lock().expect("journal lock");
        out.write_all(format!("{} {}\n", chunk.file, chunk.index).as_bytes())
            .map_err(FetchError::io("writing the download journal"))
    }

    fn finish(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_refusal_is_shortened_to_its_status_code_and_message() {
        let message = "Generic S3 error: Error performing list request: Error performing GET http://h/models?list-type=2 \
            in 5ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error>\
            <Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match.</Message>\
            <StringToSign>AWS4-HMAC-SHA256</StringToSign></Error>";
        assert_eq!(http_status(message), Some(403));
        assert_eq!(
            short_detail(message, Some(403)),
            "HTTP 403 SignatureDoesNotMatch: The request signature we calculated does not match."
        );
        assert_eq!(http_status("error sending request"), None);
    }

    #[test]
    fn manifests_in_sha256sum_format_are_read() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let text = format!("{a}  config.json\n{b} *./weights/model.safetensors\n\n");
        let manifest = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(manifest.digests["config.json"], a);
        assert_eq!(
            manifest.digests["weights/model.safetensors"],
            "b".repeat(64)
        );
        assert_eq!(manifest.key, hex(&Sha256::digest(text.as_bytes())));
        assert_eq!(
            Manifest::parse(b"abc  x\n").unwrap_err(),
            "line 1: expected `SHA256  PATH`"
        );
    }

    fn file(path: &str, size: u64, etag: &str) -> RemoteFile {
        RemoteFile {
            location: ObjectPath::from(path),
            path: path.to_owned(),
            size,
            etag: Some(etag.to_owned()),
        }
    }

    #[test]
    fn without_a_manifest_the_key_changes_with_any_object_version() {
        let listing = |etag| Listing {
            files: vec![
                file("config.json", 10, "\"1\""),
                file("model.bin", 99, etag),
            ],
            manifest: None,
        };
        let uri = "s3://b/m";
        assert_eq!(listing("\"2\"").key(uri), listing("\"2\"").key(uri));
        assert_ne!(listing("\"2\"").key(uri), listing("\"3\"").key(uri));
        assert_ne!(
            listing("\"2\"").key(uri),
            listing("\"2\"").key("s3://b/other")
        );
    }
}
