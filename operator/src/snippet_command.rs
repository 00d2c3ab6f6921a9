//! `infergate snippet MODEL` (also `kubectl infergate snippet ...`): the client code of one
//! deployment, from the cluster of the current kube context or from local mode's files.
//!
//! In a cluster the proxy URL and the deadline are the ones the operator published in the
//! deployment's snippets ConfigMap, so the command prints what that ConfigMap holds; `--url`
//! names another address (a port-forward, another ingress).

use std::path::Path;

use anyhow::{Context as _, bail};
use crds::{ModelDeployment, RequestTimeouts};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::local::manifests;
use crate::snippets::{TIMEOUT_KEY, Target, URL_KEY};

/// The file `infergate up` writes its proxy's URL to, in its state directory.
pub const LOCAL_URL_FILE: &str = "proxy-url";

/// The target of ModelDeployment `name` in `namespace`.
pub async fn cluster_target(
    client: &Client,
    namespace: &str,
    name: &str,
    url: Option<String>,
) -> anyhow::Result<Target> {
    let models: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let md = models
        .get_opt(name)
        .await?
        .with_context(|| format!("no modeldeployment/{name} in namespace {namespace}"))?;
    let status = md.status.clone().unwrap_or_default();
    let id = status.model_version_id.with_context(|| {
        format!("modeldeployment/{name} has no model version id yet: is the operator running?")
    })?;
    let published = match &status.snippets_config_map {
        Some(config_map) => Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(config_map)
            .await?
            .and_then(|c| c.data),
        None => None,
    };
    let published = |key: &str| published.as_ref().and_then(|data| data.get(key).cloned());
    let base_url = url.or_else(|| published(URL_KEY)).with_context(|| {
        format!(
            "the operator has published no snippets for modeldeployment/{name} (status.snippetsConfigMap); pass --url with the proxy's address"
        )
    })?;
    let mut target = Target::of(&md, id, &base_url, RequestTimeouts::default())
        .with_context(|| format!("modeldeployment/{name}: invalid spec.timeouts"))?;
    // The operator resolved the deadline with the installation's defaults, which only it knows.
    if let Some(seconds) = published(TIMEOUT_KEY).and_then(|s| s.parse().ok()) {
        target.timeout_seconds = seconds;
    }
    Ok(target)
}

/// The target of ModelDeployment `name` of the files `infergate up -f path` serves.
pub fn local_target(
    path: &Path,
    state_dir: &Path,
    name: &str,
    url: Option<String>,
) -> anyhow::Result<Target> {
    let files = manifests::load_checked(path)?;
    let md = files
        .models
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(name))
        .with_context(|| format!("no ModelDeployment {name} in {}", path.display()))?;
    let base_url = match url {
        Some(url) => url,
        None => std::fs::read_to_string(state_dir.join(LOCAL_URL_FILE))
            .map(|url| url.trim().to_owned())
            .with_context(|| {
                format!(
                    "no proxy URL in {}: start `infergate up` first, or pass --url",
                    state_dir.display()
                )
            })?,
    };
    let id = md.model_version_id().unwrap_or_else(|| name.to_owned());
    match Target::of(md, id, &base_url, RequestTimeouts::default()) {
        Some(target) => Ok(target),
        None => bail!("ModelDeployment {name}: invalid spec.timeouts"),
    }
}
