//! Where a model's files are: the URI forms `model.uri` takes for a download.

use std::fmt;

/// A store of objects addressed by bucket (or container) and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Amazon S3 and the stores that speak its API (MinIO, Ceph, GCS's XML API, ...).
    S3,
    /// Google Cloud Storage's JSON API.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

impl StoreKind {
    pub fn scheme(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gs",
            StoreKind::Azure => "az",
        }
    }
}

/// What to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One file (or a tar archive of the model directory) at an URL.
    Https { url: String },
    /// Every object under `prefix` (a directory of the model's files).
    Store {
        kind: StoreKind,
        bucket: String,
        prefix: String,
    },
    /// A model repository of the Hugging Face Hub at a branch, tag or commit.
    Hub { repo: String, revision: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error(
        "{0:?}: expected https://HOST/PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
    )]
    Scheme(String),
    #[error("{0:?}: names no bucket")]
    NoBucket(String),
    #[error("{0:?}: the prefix has an empty, '.' or '..' segment")]
    UnsafePrefix(String),
    #[error(
        "{0:?}: a Hub repository is NAME or ORG/NAME of letters, digits, '-', '_' and '.', then @REVISION if not main"
    )]
    BadRepository(String),
}

impl std::str::FromStr for Source {
    type Err = SourceError;

    fn from_str(uri: &str) -> Result<Self, SourceError> {
        if uri.starts_with("https://") || uri.starts_with("http://") {
            return Ok(Source::Https {
                url: uri.to_owned(),
            });
        }
        if let Some(rest) = uri.strip_prefix("hf://") {
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let segment_ok = |s: &str| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            let segments: Vec<&str> = repo.split('/').collect();
            if segments.len() > 2 || !segments.iter().all(|s| segment_ok(s)) || revision.is_empty()
            {
                return Err(SourceError::BadRepository(uri.to_owned()));
            }
            return Ok(Source::Hub {
                repo: repo.to_owned(),
                revision: revision.to_owned(),
            });
        }
        let (kind, rest) = [StoreKind::S3, StoreKind::Gcs, StoreKind::Azure]
            .into_iter()
            .find_map(|kind| {
                uri.strip_prefix(kind.scheme())
                    .and_then(|r| r.strip_prefix("://"))
                    .map(|rest| (kind, rest))
            })
            .ok_or_else(|| SourceError::Scheme(uri.to_owned()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(SourceError::NoBucket(uri.to_owned()));
        }
        let prefix = prefix.trim_end_matches('/');
        // Keys are not paths, but a model directory with such segments could not be placed
        // on disk as its keys say.
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(SourceError::UnsafePrefix(uri.to_owned()));
        }
        Ok(Source::Store {
            kind,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Https { url } => f.write_str(url),
            Source::Store {
                kind,
                bucket,
                prefix,
            } => write!(f, "{}://{bucket}/{prefix}", kind.scheme()),
            Source::Hub { repo, revision } => write!(f, "hf://{repo}@{revision}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_uris_split_into_bucket_and_prefix() {
        assert_eq!(
            "s3://models/team/minilm/".parse(),
            Ok(Source::Store {
                kind: StoreKind::S3,
                bucket: "models".into(),
                prefix: "team/minilm".into()
            })
        );
        assert_eq!(
            "az://weights".parse(),
            Ok(Source::Store {
                kind: StoreKind::Azure,
                bucket: "weights".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "hf://sentence-transformers/all-MiniLM-L6-v2@refs/pr/1".parse(),
            Ok(Source::Hub {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: "refs/pr/1".into()
            })
        );
        let gpt2: Source = "hf://gpt2".parse().unwrap();
        assert_eq!(gpt2.to_string(), "hf://gpt2@main");
        let gcs: Source = "gs://b/p".parse().unwrap();
        assert_eq!(gcs.to_string(), "gs://b/p");
    }

    #[test]
    fn uris_that_cannot_name_a_model_directory_are_refused() {
        for (uri, expected) in [
            ("ftp://h/m", SourceError::Scheme("ftp://h/m".into())),
            ("s3:///m", SourceError::NoBucket("s3:///m".into())),
            (
                "s3://b/a/../m",
                SourceError::UnsafePrefix("s3://b/a/../m".into()),
            ),
            (
                "gs://b/a//m",
                SourceError::UnsafePrefix("gs://b/a//m".into()),
            ),
        ] {
            assert_eq!(uri.parse::<Source>(), Err(expected), "{uri}");
        }
    }
}
