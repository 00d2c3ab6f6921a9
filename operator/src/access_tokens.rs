//! Reconcile of an AccessToken: issue the token once, keep its record in the gateway namespace
//! in step with the spec, and delete the record when the AccessToken goes.

use std::sync::Arc;
use std::time::Duration;

use crds::names::TOKEN_SECRET_KEY;
use crds::{AccessToken, AccessTokenPhase, AccessTokenStatus, Token};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Api, ResourceExt};

use crate::apply::{FIELD_MANAGER, apply_over, apply_status};
use crate::controller::{Context, Error};
use crate::status::{access_token_ready, stamp_transitions, token_rotation, transitions};
use crate::tokens::{
    Issuance, IssueError, own_token_digest, phase, record, record_secret, record_secret_name,
    resolve_models, user_secret, user_secret_name,
};

/// Holds an AccessToken until its record, in another namespace, is deleted.
pub const FINALIZER: &str = "infergate.dev/token-record";

pub async fn reconcile(token: Arc<AccessToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<AccessToken> =
        Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, token, |event| async {
        match event {
            Event::Apply(token) => issue(token, &ctx).await,
            Event::Cleanup(token) => retire(token, &ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

fn records(ctx: &Context) -> Api<Secret> {
    Api::namespaced(ctx.client.clone(), &ctx.config.gateway_namespace)
}

async fn issue(token: Arc<AccessToken>, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let records = records(ctx);
    let uid = token.uid().unwrap_or_default();
    let existing = records.get_opt(&record_secret_name(&uid)).await?;
    let issued = match existing.as_ref().and_then(Issuance::from_record_secret) {
        Some(issuance) => Ok(issuance),
        None => first_issue(&token, ctx, now).await?,
    };
    let resolved = resolve_models(&token, &ctx.models.state());

    let (current_phase, issuance, problem) = match &issued {
        Ok(issuance) => {
            let record = record(&token, issuance, resolved.ids.clone());
            match record {
                Ok(record) => {
                    let secret =
                        record_secret(&token, &record, issuance, &ctx.config.gateway_namespace);
                    apply_over(&records, secret, existing).await?;
                    (
                        phase(&token, Ok(&record), now),
                        Some((issuance, record)),
                        None,
                    )
                }
                Err(error) => (AccessTokenPhase::Invalid, None, Some(error)),
            }
        }
        Err(error) => (AccessTokenPhase::Invalid, None, Some(error.clone())),
    };

    let previous = token.status.clone().unwrap_or_default();
    let issuance = issuance.as_ref();
    let mut conditions = vec![access_token_ready(
        current_phase,
        problem.as_ref().map(|e| (e.reason(), e.to_string())),
        &resolved.unknown,
        token.metadata.generation,
    )];
    conditions.extend(token_rotation(
        &token,
        issuance.and_then(|(_, r)| r.expires_at),
        token.metadata.generation,
    ));
    stamp_transitions(&mut conditions, &previous.conditions, now);
    let status = AccessTokenStatus {
        phase: Some(current_phase),
        token_prefix: issuance.and_then(|(i, _)| i.prefix.clone()),
        issued_at: issuance.map(|(i, _)| Time(i.issued_at)),
        expires_at: issuance.and_then(|(_, r)| r.expires_at.map(Time)),
        secret_name: (token.spec.token_hash.is_none() && issuance.is_some())
            .then(|| user_secret_name(&token)),
        observed_generation: token.metadata.generation,
        conditions,
        // The usage and limits writers' own fields, which this field manager never writes.
        usage: None,
        limits: None,
    };
    let written = AccessTokenStatus {
        usage: None,
        limits: None,
        ..previous.clone()
    };
    if token.status.is_none() || written != status {
        apply_status(token.as_ref(), &status, &ctx.client).await?;
        for (warning, reason, message) in transitions(&previous.conditions, &status.conditions) {
            ctx.event(token.as_ref(), warning, &reason, "Reconcile", message)
                .await;
        }
    }

    // The phase must turn Expired on time, not at the next unrelated change.
    let expires_in = issuance
        .filter(|_| current_phase == AccessTokenPhase::Active)
        .and_then(|(_, r)| r.expires_at)
        .map(|at| Duration::try_from(at.duration_since(now)).unwrap_or_default());
    Ok(match expires_in {
        Some(remaining) => Action::requeue(remaining + Duration::from_millis(100)),
        None => Action::await_change(),
    })
}

/// Issues a token that has no record yet: from `spec.tokenHash`, from the user's Secret when a
/// previous reconcile wrote it but failed before the record, or as a fresh token written once.
async fn first_issue(
    token: &AccessToken,
    ctx: &Context,
    now: Timestamp,
) -> Result<Result<Issuance, IssueError>, Error> {
    match own_token_digest(token) {
        Err(error) => return Ok(Err(error)),
        Ok(Some(sha256)) => return Ok(Ok(Issuance::of_digest(sha256, now))),
        Ok(None) => {}
    }
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    let name = user_secret_name(token);
    if let Some(secret) = secrets.get_opt(&name).await? {
        let ours = secret
            .owner_references()
            .iter()
            .any(|owner| Some(&owner.uid) == token.uid().as_ref());
        let plaintext = secret
            .data
            .as_ref()
            .and_then(|data| data.get(TOKEN_SECRET_KEY))
            .and_then(|value| std::str::from_utf8(&value.0).ok())
            .and_then(|text| Token::parse(text).ok());
        return Ok(match (ours, plaintext) {
            (true, Some(plaintext)) => Ok(Issuance::of_token(
                &plaintext,
                secret.creation_timestamp().map_or(now, |t| t.0),
            )),
            _ => Err(IssueError::SecretTaken(name)),
        });
    }
    let plaintext = Token::generate()?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    // Create, never apply: if the Secret appeared meanwhile, the create fails and the retry reads
    // it, so a token that may already be in someone's hands is never replaced.
    secrets
        .create(&params, &user_secret(token, &plaintext))
        .await?;
    let issuance = Issuance::of_token(&plaintext, now);
    // Tokens are named by their record id (the AccessToken's UID), never by any part of them.
    tracing::info!(token = %token.uid().unwrap_or_default(), secret = %name, "issued a token");
    ctx.event(
        token,
        false,
        "Issued",
        "IssueToken",
        format!(
            "issued token {}… into Secret {name}, key {TOKEN_SECRET_KEY}",
            issuance.prefix.as_deref().unwrap_or_default()
        ),
    )
    .await;
    Ok(Ok(issuance))
}

/// The AccessToken is being deleted: its record goes first, so the proxy stops accepting the
/// token before the object disappears. The user's Secret is owned and goes with it.
async fn retire(token: Arc<AccessToken>, ctx: &Context) -> Result<Action, Error> {
    let name = record_secret_name(&token.uid().unwrap_or_default());
    match records(ctx).delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(error) => return Err(error.into()),
    }
    Ok(Action::await_change())
}
