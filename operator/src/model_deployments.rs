//! Reconcile of a ModelDeployment: its runtime Deployment, Service and NetworkPolicy, the
//! proxy's public keys in its namespace, the ConfigMap of client code, and its status.

use std::sync::Arc;
use std::time::Duration;

use crds::ModelDeployment;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::apply::{apply_if_changed, apply_status};
use crate::controller::{Context, Error};
use crate::desired::{
    MODEL_DEPLOYMENT_LABEL, runtime_deployment, runtime_network_policy, runtime_service,
    snippets_config_map,
};
use crate::internal_keys;
use crate::snippets::Target;
use crate::status::{Blocked, id_holder, model_deployment_status, stamp_transitions, transitions};

pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);

    let mut blocked = confirmed_id_holder(&md, &ctx)
        .await?
        .map(|holder| Blocked::IdConflict {
            id: md.model_version_id().unwrap_or_default(),
            holder,
        });
    // The Deployment as the API server has it: from the apply, else read for the status.
    let mut applied = None;
    if blocked.is_none() {
        let desired = runtime_deployment(&md, &ctx.config.runtime).and_then(|deployment| {
            Ok((
                deployment,
                runtime_service(&md)?,
                runtime_network_policy(&md, &ctx.config.runtime.access)?,
            ))
        });
        match desired {
            Ok((deployment, service, policy)) => {
                // The policy and the keys before the pods: a runtime pod never runs unguarded,
                // and its keys volume is there when it starts.
                let (_, policy_written) = apply_if_changed(&policies, policy).await?;
                internal_keys::publish(&ctx, &namespace, internal_keys::Check::Live).await?;
                let (_, service_written) = apply_if_changed(&services, service).await?;
                let (live, deployment_written) = apply_if_changed(&deployments, deployment).await?;
                applied = Some(live);
                if service_written || deployment_written || policy_written {
                    ctx.event(
                        md.as_ref(),
                        false,
                        "Applied",
                        "ApplyRuntime",
                        format!(
                            "applied the runtime Deployment, Service and NetworkPolicy for generation {}",
                            md.metadata.generation.unwrap_or_default()
                        ),
                    )
                    .await;
                }
            }
            // A spec that cannot be built leaves the runtime as it was (like a Deployment whose
            // new template fails admission): serving goes on while the person fixes the spec.
            Err(error) => blocked = Some(Blocked::InvalidSpec(error.to_string())),
        }
    }

    let deployment = match applied {
        Some(live) => Some(live),
        None => deployments.get_opt(&name).await?,
    };
    // The pods' download outcomes (ModelFetched); the controller watches them.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pods
        .list(&ListParams::default().labels(&format!("{MODEL_DEPLOYMENT_LABEL}={name}")))
        .await?
        .items;
    let previous = md.status.clone().unwrap_or_default();
    let mut status = model_deployment_status(&md, blocked.as_ref(), deployment.as_ref(), &pods);
    status.snippets_config_map = if blocked.is_none() {
        publish_snippets(&md, &ctx, status.model_version_id.clone()).await?
    } else {
        // A blocked spec leaves the runtime, and so its client code, as they were.
        previous.snippets_config_map.clone()
    };
    stamp_transitions(
        &mut status.conditions,
        &previous.conditions,
        Timestamp::now(),
    );
    // The autoscaler's field is compared away: the status written here leaves it out.
    let written = crds::ModelDeploymentStatus {
        autoscaling: None,
        ..previous.clone()
    };
    if written != status {
        apply_status(md.as_ref(), &status, &ctx.client).await?;
        for (warning, reason, message) in transitions(&previous.conditions, &status.conditions) {
            ctx.event(md.as_ref(), warning, &reason, "Reconcile", message)
                .await;
        }
    }
    // Changes of the Deployment and Service trigger a reconcile (the controller owns them), so
    // do changes of its pods and of any ModelDeployment claiming the same id; the periodic pass only
    // repairs what a lost watch event might have hidden.
    let period = if blocked.is_some() { 60 } else { 3600 };
    Ok(Action::requeue(Duration::from_secs(period)))
}

/// Writes the ConfigMap of client code for `md` (unless it is current); its name, once `md`
/// has a model version id.
async fn publish_snippets(
    md: &ModelDeployment,
    ctx: &Context,
    model_version_id: Option<String>,
) -> Result<Option<String>, Error> {
    let Some(target) = model_version_id
        .and_then(|id| Target::of(md, id, &ctx.config.proxy_url, ctx.config.runtime.timeouts))
    else {
        return Ok(None);
    };
    let Ok(config_map) = snippets_config_map(md, &target) else {
        return Ok(None);
    };
    let name = config_map.name_any();
    let config_maps: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    apply_if_changed(&config_maps, config_map).await?;
    Ok(Some(name))
}

/// `namespace/name` of the ModelDeployment that holds `md`'s id, if another one does. The cache
/// may still hold a holder that was just deleted (its delete event and the one that triggered
/// this reconcile race), so a holder found there is confirmed with a read.
async fn confirmed_id_holder(md: &ModelDeployment, ctx: &Context) -> Result<Option<String>, Error> {
    let mut candidates: Vec<Arc<ModelDeployment>> = ctx.models.state();
    while let Some(holder) = id_holder(md, candidates.iter().map(Arc::as_ref)).cloned() {
        let namespace = holder.namespace().unwrap_or_default();
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
        let live = api.get_opt(&holder.name_any()).await?;
        if live.is_some_and(|live| live.uid() == holder.uid()) {
            return Ok(Some(format!("{namespace}/{}", holder.name_any())));
        }
        candidates.retain(|c| c.uid() != holder.uid());
    }
    Ok(None)
}
