//! An `https://` model: one body, fetched into a directory.
//!
//! The body is streamed to disk while its SHA-256 is computed; a digest that differs from the
//! expected one fails the pod and leaves nothing behind. A `.tar`, `.tar.gz` or `.tgz` is
//! unpacked (regular files and directories only: a link or a path leaving the directory fails
//! the download); anything else is stored under the last segment of the URL's path.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Component, Path, PathBuf};

use http_body_util::BodyExt;
use object_store::client::HttpRequestBody;
use sha2::{Digest, Sha256};

use crate::client::Http;
use crate::store::chain;

/// What to fetch and where.
#[derive(Debug, Clone)]
pub struct Download {
    pub url: String,
    /// Lower-case hex SHA-256 the body must have.
    pub sha256: Option<String>,
    pub dest: PathBuf,
}

/// A finished download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Lower-case hex SHA-256 of the body.
    pub sha256: String,
    /// Bytes received (0 when an earlier attempt had finished).
    pub bytes: u64,
}

/// Why a download failed; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("GET {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("GET {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: too many redirects")]
    TooManyRedirects { url: String },
    #[error("sha256 mismatch for {url}: spec.model.sha256 is {expected}, the body has {actual}")]
    Sha256Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("the archive entry {0:?} is not a plain file or directory inside the model directory")]
    UnsafeEntry(String),
    #[error("the URL's path names no file: {0}")]
    NoFileName(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DownloadError {
    let context = context.into();
    move |source| DownloadError::Io { context, source }
}

/// Marker left in `dest` after a complete download; its content is the URL and digest, so a
/// restarted init container of the same pod (same emptyDir) does not fetch again.
const COMPLETE_MARKER: &str = ".infergate-download-complete";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Tar,
    TarGz,
    File,
}

fn layout(url_path: &str) -> Layout {
    if url_path.ends_with(".tar.gz") || url_path.ends_with(".tgz") {
        Layout::TarGz
    } else if url_path.ends_with(".tar") {
        Layout::Tar
    } else {
        Layout::File
    }
}

impl Download {
    fn marker(&self) -> String {
        format!("{}\n{}\n", self.url, self.sha256.as_deref().unwrap_or("-"))
    }

    /// Fetches, checks and places the model.
    pub async fn run(&self) -> Result<Downloaded, DownloadError> {
        let marker = self.dest.join(COMPLETE_MARKER);
        if std::fs::read_to_string(&marker).is_ok_and(|m| m == self.marker()) {
            tracing::info!(dest = %self.dest.display(), "already downloaded");
            return Ok(Downloaded {
                sha256: self.sha256.clone().unwrap_or_default(),
                bytes: 0,
            });
        }
        std::fs::create_dir_all(&self.dest)
            .map_err(io(format!("creating {}", self.dest.display())))?;
        let partial = self.dest.join(".infergate-download.partial");
        let result = self.fetch_and_place(&partial).await;
        // Whatever happened, the partial body is of no further use.
        let _ = std::fs::remove_file(&partial);
        let digest = result?;
        std::fs::write(&marker, self.marker()).map_err(io("writing the completion marker"))?;
        Ok(digest)
    }

    async fn fetch_and_place(&self, partial: &Path) -> Result<Downloaded, DownloadError> {
        let fetch = |url: &str, message: String| DownloadError::Fetch {
            url: url.to_owned(),
            message,
        };
        let client = Http::new(None).map_err(io("loading the system's root certificates"))?;
        let url = self.url.clone();
        let request = http::Request::get(url.as_str())
            .body(HttpRequestBody::empty())
            .map_err(|e| fetch(&url, e.to_string()))?;
        let mut response = client
            .send(request)
            .await
            .map_err(|e| fetch(&url, chain(&e)))?;
        if response.status().is_redirection() {
            return Err(DownloadError::TooManyRedirects { url });
        }
        if !response.status().is_success() {
            return Err(DownloadError::Status {
                url,
                status: response.status().as_u16(),
            });
        }
        // The name the user gave, not a CDN's signed one.
        let url_path = url
            .parse::<http::Uri>()
            .map(|u| u.path().to_owned())
            .unwrap_or_default();
        let mut file = File::create(partial).map_err(io("creating the download file"))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let body = response.body_mut();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| fetch(&url, chain(&e)))?;
            if let Ok(chunk) = frame.into_data() {
                hasher.update(&chunk);
                file.write_all(&chunk).map_err(io("writing the download"))?;
                bytes += chunk.len() as u64;
            }
        }
        file.sync_all().map_err(io("flushing the download"))?;
        let actual: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if let Some(expected) = &self.sha256
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(DownloadError::Sha256Mismatch {
                url: self.url.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        tracing::info!(url = %self.url, bytes, sha256 = %actual, "downloaded");
        let dest = self.dest.clone();
        let partial = partial.to_owned();
        let placed = tokio::task::spawn_blocking(move || match layout(&url_path) {
            Layout::Tar => unpack(File::open(&partial).map(BufReader::new), &dest),
            Layout::TarGz => unpack(
                File::open(&partial).map(|f| flate2::read::GzDecoder::new(BufReader::new(f))),
                &dest,
            ),
            Layout::File => {
                let name = url_path
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                    .ok_or_else(|| DownloadError::NoFileName(url_path.clone()))?;
                std::fs::rename(&partial, dest.join(name)).map_err(io(format!("placing {name}")))
            }
        })
        .await
        .map_err(|join| DownloadError::Io {
            context: "unpacking".into(),
            source: std::io::Error::other(join.to_string()),
        })?;
        placed?;
        Ok(Downloaded {
            sha256: actual,
            bytes,
        })
    }
}

/// Unpacks a tar stream into `dest`, refusing links, devices and paths that leave `dest`. Every
/// entry is checked before anything is written, so a refused archive leaves nothing.
fn unpack<R: std::io::Read>(reader: std::io::Result<R>, dest: &Path) -> Result<(), DownloadError> {
    let reader = reader.map_err(io("opening the download"))?;
    let mut archive = tar::Archive::new(reader);
    let staging = dest.join(".infergate-unpack");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("creating the unpack directory"))?;
    let result = (|| {
        for entry in archive.entries().map_err(io("reading the archive"))? {
            let mut entry = entry.map_err(io("reading the archive"))?;
            let path = entry
                .path()
                .map_err(io("reading an entry's path"))?
                .into_owned();
            let shown = path.display().to_string();
            let kind = entry.header().entry_type();
            let inside = path
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside || !(kind.is_file() || kind.is_dir()) {
                return Err(DownloadError::UnsafeEntry(shown));
            }
            let target = staging.join(&path);
            if kind.is_dir() {
                std::fs::create_dir_all(&target).map_err(io(format!("creating {shown}")))?;
            } else {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io(format!("creating {shown}")))?;
                }
                let mut out = File::create(&target).map_err(io(format!("creating {shown}")))?;
                std::io::copy(&mut entry, &mut out).map_err(io(format!("writing {shown}")))?;
            }
        }
        Ok(())
    })();
    if let Err(error) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    for entry in std::fs::read_dir(&staging).map_err(io("listing the unpacked files"))? {
        let entry = entry.map_err(io("listing the unpacked files"))?;
        std::fs::rename(entry.path(), dest.join(entry.file_name()))
            .map_err(io("moving the unpacked files into place"))?;
    }
    std::fs::remove_dir(&staging).map_err(io("removing the unpack directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_recognised_by_their_extension() {
        assert_eq!(layout("/models/minilm.tar.gz"), Layout::TarGz);
        assert_eq!(layout("/m.tgz"), Layout::TarGz);
        assert_eq!(layout("/m.tar"), Layout::Tar);
        assert_eq!(layout("/m/model.safetensors"), Layout::File);
    }
}
