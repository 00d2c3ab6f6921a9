//! Why fetching a model failed, sorted by what a person does about it: each error has a reason
//! (the ModelDeployment condition's `reason`) and a message that names the object and the fix.

use std::path::PathBuf;

use crate::https::DownloadError;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{source_uri}: the store refused the credentials ({detail}); check the keys in {}", secret_hint(.secret))]
    CredentialsRefused {
        source_uri: String,
        secret: Option<String>,
        detail: String,
    },
    #[error("{source_uri}: {what} does not exist ({detail}); {fix}")]
    NotFound {
        source_uri: String,
        what: String,
        detail: String,
        fix: &'static str,
    },
    #[error(
        "{source_uri}: commit {commit} has no safetensors weights, the only kind a runtime loads; convert its weights to safetensors and push them"
    )]
    NoSafetensors { source_uri: String, commit: String },
    #[error(
        "{source_uri}: the revision {revision} does not exist ({detail}); name a branch, tag or commit of the repository"
    )]
    RevisionNotFound {
        source_uri: String,
        revision: String,
        detail: String,
    },
    #[error(
        "{source_uri}: no object under the prefix; spec.model.uri must name the directory that holds the model's files"
    )]
    EmptyPrefix { source_uri: String },
    #[error(
        "{source_uri}: {file} has sha256 {actual}, but {expected_from} says {expected}; the stored file is corrupt or its digest stale"
    )]
    DigestMismatch {
        source_uri: String,
        file: String,
        expected: String,
        expected_from: String,
        actual: String,
    },
    #[error(
        "{source_uri}: {file} is listed in SHA256SUMS but not in the store; upload it or drop its line"
    )]
    MissingFromStore { source_uri: String, file: String },
    #[error(
        "{source_uri}: {file} changed in the store during the download ({detail}); the next attempt starts over on the new version"
    )]
    ObjectChanged {
        source_uri: String,
        file: String,
        detail: String,
    },
    #[error(
        "{source_uri}: {bytes} bytes do not fit the node cache's bound of {max_bytes} bytes; raise modelCache.maxBytes in the chart's values"
    )]
    LargerThanCache {
        source_uri: String,
        bytes: u64,
        max_bytes: u64,
    },
    #[error("no space left in {}: {context}{}; free the node's disk or lower modelCache.maxBytes", dir.display(), needs(*.needed))]
    DiskFull {
        dir: PathBuf,
        context: String,
        needed: u64,
    },
    #[error(
        "{source_uri}: cannot reach the store ({detail}); check spec.model.endpoint and the pod's network policy"
    )]
    Unreachable { source_uri: String, detail: String },
    #[error("{source_uri}: {detail}")]
    Store { source_uri: String, detail: String },
    #[error("{0}")]
    Https(#[from] DownloadError),
    #[error("spec.model.uri {0}")]
    InvalidSource(#[from] crate::source::SourceError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn needs(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(" (the model needs {bytes} bytes there)")
    }
}

fn secret_hint(secret: &Option<String>) -> String {
    match secret {
        Some(name) => format!("Secret {name} (spec.model.credentialsSecret)"),
        None => {
            "spec.model.credentialsSecret: none is set, so the store saw the pod's ambient identity"
                .to_owned()
        }
    }
}

impl FetchError {
    /// A condition reason: one CamelCase word.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::CredentialsRefused { .. } => "CredentialsRefused",
            FetchError::NotFound { .. }
            | FetchError::NoSafetensors { .. }
            | FetchError::EmptyPrefix { .. }
            | FetchError::MissingFromStore { .. } => "ModelNotFound",
            FetchError::RevisionNotFound { .. } => "RevisionNotFound",
            FetchError::DigestMismatch { .. } => "DigestMismatch",
            FetchError::ObjectChanged { .. } => "ObjectChanged",
            FetchError::LargerThanCache { .. } | FetchError::DiskFull { .. } => "DiskFull",
            FetchError::Unreachable { .. } => "StoreUnreachable",
            FetchError::Store { .. } | FetchError::Io { .. } => "FetchFailed",
            FetchError::InvalidSource(_) => "InvalidSource",
            FetchError::Https(error) => match error {
                DownloadError::Sha256Mismatch { .. } => "DigestMismatch",
                DownloadError::Status {
                    status: 401 | 403, ..
                } => "CredentialsRefused",
                DownloadError::Status { status: 404, .. } => "ModelNotFound",
                DownloadError::Fetch { .. } => "StoreUnreachable",
                DownloadError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::StorageFull =>
                {
                    "DiskFull"
                }
                _ => "FetchFailed",
            },
        }
    }

    /// Whether a later attempt can succeed with nothing changed (the pod's restart back-off
    /// retries it); the others need a person.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::Unreachable { .. } | FetchError::ObjectChanged { .. }
        )
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
        let context = context.into();
        move |source| FetchError::Io { context, source }
    }

    /// An I/O error while writing `needed` bytes under `dir`, with a full disk told apart.
    pub(crate) fn write(
        dir: &std::path::Path,
        needed: u64,
        context: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> FetchError {
        let context = context.into();
        let dir = dir.to_owned();
        move |source| {
            if source.kind() == std::io::ErrorKind::StorageFull {
                FetchError::DiskFull {
                    dir,
                    context,
                    needed,
                }
            } else {
                FetchError::Io { context, source }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_names_the_directory_and_the_fix() {
        let error = FetchError::write(
            std::path::Path::new("/var/cache/infergate"),
            1 << 30,
            "writing model.safetensors",
        )(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(error.reason(), "DiskFull");
        let message = error.to_string();
        assert!(message.contains("/var/cache/infergate"), "{message}");
        assert!(message.contains("1073741824 bytes"), "{message}");
        let other = FetchError::write(std::path::Path::new("/x"), 1, "writing")(
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(other.reason(), "FetchFailed");
    }

    #[test]
    fn refused_credentials_name_the_secret_to_fix() {
        let error = FetchError::CredentialsRefused {
            source_uri: "s3://models/minilm".into(),
            secret: Some("minio-keys".into()),
            detail: "403 InvalidAccessKeyId".into(),
        };
        assert_eq!(error.reason(), "CredentialsRefused");
        assert!(error.to_string().contains("Secret minio-keys"));
        assert!(!error.is_transient());
    }
}
