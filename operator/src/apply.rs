//! Writing desired objects with server-side apply, and only when they changed.
//!
//! Every write goes through one field manager, so `kubectl get -o yaml --show-managed-fields`
//! names the operator as the owner of exactly the fields it sets. A digest of what was last
//! applied rides along as an annotation: a reconcile that would apply the same object again
//! skips the request, so a second pass with nothing changed writes nothing.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "infergate-operator";

/// Annotation carrying the digest of the object as the operator last applied it.
pub const APPLIED_DIGEST_ANNOTATION: &str = "infergate.dev/applied-digest";

/// Hex SHA-256 of the object's JSON (without the digest annotation itself). k8s-openapi types
/// keep maps ordered, so the same object always gives the same digest.
pub fn digest<K: Serialize>(object: &K) -> String {
    let json = serde_json::to_vec(object).expect("Kubernetes objects serialize to JSON");
    Sha256::digest(&json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stamps `desired` with its digest; returns the digest.
pub fn stamp<K: Resource + Serialize>(desired: &mut K) -> String {
    desired.annotations_mut().remove(APPLIED_DIGEST_ANNOTATION);
    let digest = digest(desired);
    desired
        .annotations_mut()
        .insert(APPLIED_DIGEST_ANNOTATION.to_owned(), digest.clone());
    digest
}

/// Whether `live` is what `desired` (stamped) was applied as.
pub fn is_current<K: Resource>(live: &K, digest: &str) -> bool {
    live.annotations()
        .get(APPLIED_DIGEST_ANNOTATION)
        .is_some_and(|d| d == digest)
}

/// Applies `desired` unless the live object already is it. Returns the live object and whether
/// a write was made.
pub async fn apply_if_changed<K>(api: &Api<K>, desired: K) -> Result<(K, bool), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let live = api.get_opt(&desired.name_any()).await?;
    apply_over(api, desired, live).await
}

/// [`apply_if_changed`] for a caller that has just read the live object itself.
pub async fn apply_over<K>(
    api: &Api<K>,
    mut desired: K,
    live: Option<K>,
) -> Result<(K, bool), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let digest = stamp(&mut desired);
    let name = desired.name_any();
    if let Some(live) = live
        && is_current(&live, &digest)
    {
        return Ok((live, false));
    }
    // Force: the operator is the authority on these fields; a person's `kubectl edit` of a
    // managed field is drift to undo, not a conflict to report.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let live = api.patch(&name, &params, &Patch::Apply(&desired)).await?;
    tracing::info!(
        kind = %K::kind(&Default::default()),
        namespace = %live.namespace().unwrap_or_default(),
        name = %name,
        "applied"
    );
    Ok((live, true))
}

/// Writes `status` to the status subresource of `object` with server-side apply (the same field
/// manager as every other write).
pub async fn apply_status<K, S>(
    object: &K,
    status: &S,
    client: &kube::Client,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    K: Clone + Debug + DeserializeOwned,
    S: Serialize,
{
    apply_status_as(FIELD_MANAGER, object, status, client).await
}

/// [`apply_status`] as another field manager, which owns only the fields it sends.
pub async fn apply_status_as<K, S>(
    field_manager: &str,
    object: &K,
    status: &S,
    client: &kube::Client,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    K: Clone + Debug + DeserializeOwned,
    S: Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    #[test]
    fn the_digest_ignores_its_own_annotation_and_follows_content() {
        let mut a = Service::default();
        a.metadata.name = Some("m".into());
        let mut b = a.clone();
        let digest_a = stamp(&mut a);
        assert_eq!(
            stamp(&mut a),
            digest_a,
            "stamping twice gives the same digest"
        );
        assert!(is_current(&a, &digest_a));
        b.metadata.labels = Some([("x".to_owned(), "y".to_owned())].into());
        assert_ne!(stamp(&mut b), digest_a);
    }
}
