//! The Hugging Face Hub (`hf://ORG/NAME[@REVISION]`), through its HTTP API as `huggingface_hub`
//! calls it:
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` resolves the revision to
//!   a commit and lists the files there, with each LFS file's size and SHA-256;
//! - `GET {endpoint}/{repo}/resolve/{commit}/{file}`, ranged, downloads one (LFS files answer
//!   with a redirect to a CDN, which gets no token: reqwest drops `Authorization` when a
//!   redirect leaves the host).
//!
//! Only what a runtime loads is fetched: safetensors weights, JSON configs and tokenizer files;
//! not PyTorch pickles, ONNX, TensorFlow, Flax or GGUF copies of the same weights. Everything
//! is fetched at the resolved commit, which is also the cache key, so a branch that moves
//! cannot mix two commits in one model directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use serde::Deserialize;

use crate::client::{Connector, Http};
use crate::error::FetchError;
use crate::store::{Listing, Manifest, Remote, RemoteFile, StoreOptions};

/// The public Hub; `--endpoint` or `HF_ENDPOINT` names a mirror.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What the revision endpoint answers, the fields used.
#[derive(Debug, Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Whether a runtime needs `path` of a model repository.
pub fn wanted(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let skipped_dirs = ["onnx/", "openvino/", "coreml/", "tf/", "flax/"];
    if skipped_dirs
        .iter()
        .any(|dir| path.starts_with(dir) || path.contains(&format!("/{dir}")))
    {
        return false;
    }
    name.ends_with(".safetensors")
        || name.ends_with(".json")
        || matches!(
            name,
            "vocab.txt" | "merges.txt" | "spiece.model" | "tokenizer.model"
        )
        || name.ends_with(".spm")
}

fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A repository at a revision, and how to reach it.
#[derive(Debug)]
pub struct Hub {
    endpoint: String,
    repo: String,
    revision: String,
    token: Option<String>,
    secret: Option<String>,
}

impl Hub {
    pub fn new(repo: &str, revision: &str, options: &StoreOptions) -> Hub {
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let token = options
            .credentials
            .iter()
            .find(|(name, _)| name == "HF_TOKEN")
            .map(|(_, value)| value.clone())
            .or_else(|| std::env::var("HF_TOKEN").ok())
            .filter(|t| !t.is_empty());
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            token,
            secret: options.credentials_secret.clone(),
        }
    }

    fn uri(&self) -> String {
        format!("hf://{}@{}", self.repo, self.revision)
    }

    /// Checks that no credential but the token was given (a Secret with AWS keys for an hf://
    /// model is a mistake worth naming).
    pub fn check_credentials(options: &StoreOptions, uri: &str) -> Result<(), FetchError> {
        match options
            .credentials
            .iter()
            .find(|(name, _)| name != "HF_TOKEN")
        {
            None => Ok(()),
            Some((name, _)) => Err(FetchError::Store {
                source_uri: uri.to_owned(),
                detail: format!(
                    "{} has the key {name}, which is no Hub credential; expected HF_TOKEN",
                    options
                        .credentials_secret
                        .as_deref()
                        .map_or("the credentials".to_owned(), |s| format!("Secret {s}"))
                ),
            }),
        }
    }

    /// Resolves the revision to its commit and lists the files a runtime needs there, with
    /// their LFS digests as the manifest. Returns the commit too.
    pub async fn list(&self) -> Result<(String, Listing), FetchError> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            self.repo,
            percent_encode(&self.revision)
        );
        let client = self.http()?;
        let (status, headers, body) = client
            .get(&url)
            .await
            .map_err(|e| self.unreachable(crate::store::chain(&e)))?;
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if status != 200 {
            return Err(self.refusal(status, &code, &body));
        }
        let info: RevisionInfo = serde_json::from_slice(&body).map_err(|e| FetchError::Store {
            source_uri: self.uri(),
            detail: format!("the Hub's revision answer is not what its API documents: {e}"),
        })?;
        let mut files = Vec::new();
        let mut digests = BTreeMap::new();
        for sibling in info.siblings.into_iter().filter(|s| wanted(&s.rfilename)) {
            let size = sibling
                .lfs
                .as_ref()
                .map(|lfs| lfs.size)
                .or(sibling.size)
                .ok_or_else(|| FetchError::Store {
                    source_uri: self.uri(),
                    detail: format!("the Hub gave no size for {}", sibling.rfilename),
                })?;
            if let Some(lfs) = &sibling.lfs {
                digests.insert(sibling.rfilename.clone(), lfs.sha256.to_ascii_lowercase());
            }
            files.push(RemoteFile::new(
                ObjectPath::from(sibling.rfilename.as_str()),
                sibling.rfilename,
                size,
                None,
            ));
        }
        if !files.iter().any(|f| f.path.ends_with(".safetensors")) {
            return Err(FetchError::NoSafetensors {
                source_uri: self.uri(),
                commit: info.sha,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let key = crate::store::hex(&sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            format!(
                "hf\n{}\n{}\n{}\n{}",
                self.endpoint,
                self.repo,
                info.sha,
                files
                    .iter()
                    .map(|f| f.path.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        )));
        let listing = Listing {
            files,
            manifest: Some(Manifest {
                digests,
                key,
                named: "the Hub's LFS sha256 of each large file",
            }),
        };
        Ok((info.sha, listing))
    }

    fn http(&self) -> Result<Http, FetchError> {
        Http::new(self.token.as_deref()).map_err(|e| FetchError::Store {
            source_uri: self.uri(),
            detail: format!("configuring the client: {e}"),
        })
    }

    /// The files at `commit`, as an object store.
    pub fn remote(&self, commit: &str) -> Result<Remote, FetchError> {
        let store = object_store::http::HttpBuilder::new()
            .with_url(format!("{}/{}/resolve/{commit}", self.endpoint, self.repo))
            .with_http_connector(Connector(self.http()?))
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .with_retry(crate::store::retry_config())
            .build()
            .map_err(|e| FetchError::Store {
                source_uri: self.uri(),
                detail: format!("configuring the client: {e}"),
            })?;
        Ok(Remote::from_store(
            Arc::new(store) as Arc<dyn ObjectStore>,
            format!("hf://{}@{commit}", self.repo),
            self.secret.clone(),
        ))
    }

    fn unreachable(&self, detail: String) -> FetchError {
        FetchError::Unreachable {
            source_uri: self.uri(),
            detail,
        }
    }

    /// The Hub's refusal, by its `X-Error-Code`: it answers 401 for a repository that does
    /// not exist as for a private one, so as not to tell them apart.
    fn refusal(&self, status: u16, code: &str, body: &[u8]) -> FetchError {
        let said = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        let detail = format!("HTTP {status} {code}: {said}").replace(" : ", ": ");
        match (status, code) {
            (_, "RevisionNotFound") => FetchError::RevisionNotFound {
                source_uri: self.uri(),
                revision: self.revision.clone(),
                detail,
            },
            (_, "RepoNotFound") => FetchError::NotFound {
                source_uri: self.uri(),
                what: format!(
                    "the repository {} ({})",
                    self.repo,
                    if self.token.is_some() {
                        "or the token cannot see it"
                    } else {
                        "or it is private and needs HF_TOKEN in spec.model.credentialsSecret"
                    }
                ),
                detail,
                fix: "check the repository in spec.model.uri",
            },
            (401 | 403, _) => FetchError::CredentialsRefused {
                source_uri: self.uri(),
                secret: self.secret.clone(),
                detail,
            },
            (404, _) => FetchError::NotFound {
                source_uri: self.uri(),
                what: format!("the repository {}", self.repo),
                detail,
                fix: "check the repository in spec.model.uri",
            },
            _ => FetchError::Store {
                source_uri: self.uri(),
                detail,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_runtime_loads_is_wanted() {
        for path in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "tokenizer.json",
            "vocab.txt",
            "merges.txt",
            "source.spm",
            "1_Pooling/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        ] {
            assert!(wanted(path), "{path}");
        }
        for path in [
            "pytorch_model.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "onnx/model.onnx",
            "onnx/config.json",
            "openvino/openvino_model.xml",
            "README.md",
            ".gitattributes",
            "model.gguf",
        ] {
            assert!(!wanted(path), "{path}");
        }
    }

    #[test]
    fn revisions_with_slashes_are_one_path_segment() {
        assert_eq!(percent_encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(percent_encode("v1.0"), "v1.0");
    }
}
