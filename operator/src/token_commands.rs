//! `infergate token create | list | revoke | rotate` (also `kubectl infergate token ...`), against
//! the cluster of the current kube context.
//!
//! `create` makes the token on this machine and applies an AccessToken with only its digest
//! (`spec.tokenHash`): the plaintext is printed once and is never stored in the cluster.
//! `--keep-secret` instead lets the operator issue the token into a Secret beside the
//! AccessToken, for workloads that mount it, and prints it from there. `rotate` makes a
//! successor for the same models and shortens the old token's life to a grace period, so both
//! work while clients move over.

use std::time::Duration;

use anyhow::{Context as _, bail};
use crds::names::{
    ROTATED_FROM_ANNOTATION, ROTATED_TO_ANNOTATION, TOKEN_FAMILY_LABEL, TOKEN_SECRET_KEY,
};
use crds::{AccessToken, AccessTokenPhase, AccessTokenSpec, Token, TokenLimits};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// How long the operator may take to issue or update a token before a command gives up.
pub const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
/// Field manager of the command's writes.
const FIELD_MANAGER: &str = "infergate-cli";

/// A duration as people write it: Go's form (`90m`, `1h30m`) or whole days (`30d`).
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let parsed = match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .map(|days| Duration::from_secs(days * 86_400))
            .map_err(|e| e.to_string()),
        None => text
            .parse::<kube::core::Duration>()
            .map(Duration::from)
            .map_err(|e| e.to_string()),
    }
    .map_err(|e| format!("{text:?} is not a duration such as 30d, 24h or 90m: {e}"))?;
    if parsed.is_zero() {
        return Err(format!("{text:?} is not a positive duration"));
    }
    Ok(parsed)
}

/// When a new token stops working.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    Never,
    After(Duration),
    At(Timestamp),
}

/// How a command prints the token it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Words for a person, the token on a line of its own.
    Text,
    /// `INFERGATE_TOKEN=...` lines for a shell's `eval` or an env file.
    Env,
    /// One JSON object.
    Json,
}

/// A token a command made, to be shown once.
#[derive(Debug)]
pub struct Issued {
    pub name: String,
    pub namespace: String,
    pub models: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub token: Token,
    /// The Secret holding it, with `--keep-secret`.
    pub secret: Option<String>,
}

impl Issued {
    pub fn render(&self, output: Output) -> String {
        let expires = self
            .expires_at
            .map_or_else(|| "never".to_owned(), |at| at.to_string());
        match output {
            Output::Text => {
                let stored = match &self.secret {
                    Some(secret) => format!("also kept in Secret {secret}"),
                    None => "not stored anywhere: keep it now".to_owned(),
                };
                format!(
                    "accesstoken/{} in namespace {} for models {}; expires {expires}\n\
                     token (shown once, {stored}):\n{}\n",
                    self.name,
                    self.namespace,
                    self.models.join(", "),
                    self.token.expose_secret()
                )
            }
            Output::Env => format!(
                "INFERGATE_TOKEN={}\nINFERGATE_TOKEN_NAME={}\nINFERGATE_TOKEN_EXPIRES={expires}\n",
                self.token.expose_secret(),
                self.name
            ),
            Output::Json => format!(
                "{}\n",
                json!({
                    "name": self.name,
                    "namespace": self.namespace,
                    "models": self.models,
                    "expiresAt": self.expires_at.map(|at| at.to_string()),
                    "secret": self.secret,
                    "token": self.token.expose_secret(),
                })
            ),
        }
    }
}

/// The client of the current kube context, and the namespace to use: `namespace`, else the
/// context's.
pub async fn connect(namespace: Option<String>) -> anyhow::Result<(Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("no cluster: set KUBECONFIG or a current kube context")?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

/// What `create` and `rotate` apply.
struct NewToken<'a> {
    name: &'a str,
    models: Vec<String>,
    expiry: Expiry,
    keep_secret: bool,
    limits: Option<TokenLimits>,
    family: &'a str,
    rotated_from: Option<&'a str>,
}

/// Creates the AccessToken `name` for `models` and waits until the proxy accepts its token.
pub async fn create(
    client: &Client,
    namespace: &str,
    name: &str,
    models: Vec<String>,
    expiry: Expiry,
    keep_secret: bool,
    limits: Option<TokenLimits>,
) -> anyhow::Result<Issued> {
    let spec = NewToken {
        name,
        models,
        expiry,
        keep_secret,
        limits,
        family: name,
        rotated_from: None,
    };
    issue(client, namespace, spec).await
}

async fn issue(client: &Client, namespace: &str, new: NewToken<'_>) -> anyhow::Result<Issued> {
    let api: Api<AccessToken> = Api::namespaced(client.clone(), namespace);
    let minted = (!new.keep_secret).then(Token::generate).transpose()?;
    let (ttl, expires_at) = match new.expiry {
        Expiry::Never => (None, None),
        Expiry::After(span) => (Some(kube::core::Duration::from(span)), None),
        Expiry::At(at) => (None, Some(Time(at))),
    };
    let mut token = AccessToken::new(
        new.name,
        AccessTokenSpec {
            models: new.models.clone(),
            expires_at,
            ttl,
            revoked: false,
            secret_name: new.keep_secret.then(|| new.name.to_owned()),
            token_hash: minted
                .as_ref()
                .map(|t| format!("sha256:{}", t.sha256_hex())),
            limits: new.limits,
        },
    );
    token
        .labels_mut()
        .insert(TOKEN_FAMILY_LABEL.to_owned(), new.family.to_owned());
    if let Some(predecessor) = new.rotated_from {
        token
            .annotations_mut()
            .insert(ROTATED_FROM_ANNOTATION.to_owned(), predecessor.to_owned());
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match api.create(&params, &token).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => bail!(
            "accesstoken/{} already exists in namespace {namespace}: rotate it (`infergate token rotate {}`) or pick another name",
            new.name,
            new.name
        ),
        Err(error) => return Err(error).context("creating the AccessToken"),
    }
    let waited = wait_for(&api, new.name, "issue the token", |t| {
        t.status.as_ref().and_then(|s| s.phase) == Some(AccessTokenPhase::Active)
    })
    .await;
    let active = match waited {
        Ok(active) => active,
        Err(error) => {
            // All or nothing: a token never shown must not stay behind, valid, in the cluster.
            let removed = api.delete(new.name, &Default::default()).await.is_ok();
            let outcome = if removed {
                "removed it again"
            } else {
                "could not remove it: delete it by hand"
            };
            return Err(error.context(format!("accesstoken/{} was created; {outcome}", new.name)));
        }
    };
    let token = match minted {
        Some(token) => token,
        None => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let secret = secrets.get(new.name).await?;
            let text = secret
                .data
                .as_ref()
                .and_then(|d| d.get(TOKEN_SECRET_KEY))
                .and_then(|v| std::str::from_utf8(&v.0).ok())
                .context("the token Secret has no token")?;
            Token::parse(text)?
        }
    };
    Ok(Issued {
        name: new.name.to_owned(),
        namespace: namespace.to_owned(),
        models: new.models,
        expires_at: active
            .status
            .as_ref()
            .and_then(|s| s.expires_at.as_ref())
            .map(|t| t.0),
        token,
        secret: new.keep_secret.then(|| new.name.to_owned()),
    })
}

/// Polls `name` until `done` holds for a status that describes its current generation; an
/// `Invalid` phase fails with the operator's reason.
async fn wait_for(
    api: &Api<AccessToken>,
    name: &str,
    what: &str,
    done: impl Fn(&AccessToken) -> bool,
) -> anyhow::Result<AccessToken> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let token = api.get(name).await?;
        let status = token.status.clone().unwrap_or_default();
        let current = status.observed_generation == token.metadata.generation;
        if current && done(&token) {
            return Ok(token);
        }
        if current && status.phase == Some(AccessTokenPhase::Invalid) {
            let why = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            bail!("accesstoken/{name} is Invalid: {why}");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the operator did not {what} for accesstoken/{name} within {} s: is infergate-operator running and watching this namespace?",
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The AccessTokens of `namespace` as a table.
pub async fn list(client: &Client, namespace: &str) -> anyhow::Result<String> {
    let api: Api<AccessToken> = Api::namespaced(client.clone(), namespace);
    let tokens = api.list(&Default::default()).await?.items;
    let mut rows = vec![[
        "NAME".to_owned(),
        "PHASE".to_owned(),
        "MODELS".to_owned(),
        "PREFIX".to_owned(),
        "EXPIRES".to_owned(),
        "ROTATION".to_owned(),
    ]];
    for token in &tokens {
        let status = token.status.clone().unwrap_or_default();
        let annotations = token.annotations();
        let rotation = match (
            annotations.get(ROTATED_TO_ANNOTATION),
            annotations.get(ROTATED_FROM_ANNOTATION),
        ) {
            (Some(to), _) => format!("replaced by {to}"),
            (None, Some(from)) => format!("replaces {from}"),
            (None, None) => "-".to_owned(),
        };
        rows.push([
            token.name_any(),
            status
                .phase
                .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}")),
            token.spec.models.join(","),
            status.token_prefix.unwrap_or_else(|| "-".to_owned()),
            status
                .expires_at
                .map_or_else(|| "never".to_owned(), |t| t.0.to_string()),
            rotation,
        ]);
    }
    Ok(table(&rows))
}

/// `rows` (a heading first) as columns three spaces apart, as kubectl prints them.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        table.push_str(cells.join("   ").trim_end());
        table.push('\n');
    }
    table
}

/// Revokes `name`: the proxy refuses its token within a second of the operator's update.
pub async fn revoke(client: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let api: Api<AccessToken> = Api::namespaced(client.clone(), namespace);
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({"spec": {"revoked": true}})),
    )
    .await
    .with_context(|| format!("revoking accesstoken/{name}"))?;
    wait_for(&api, name, "revoke the token", |t| {
        t.status.as_ref().and_then(|s| s.phase) == Some(AccessTokenPhase::Revoked)
    })
    .await?;
    Ok(())
}

/// A rotation: the successor, and when the old token stops working (or why it could not be
/// shortened: the successor exists and must be shown all the same).
#[derive(Debug)]
pub struct Rotation {
    pub issued: Issued,
    pub predecessor: String,
    pub old_expires_at: anyhow::Result<Timestamp>,
}

/// Makes a successor of `name` for the same models, with the same lifetime and the same kind of
/// storage, then sets `name` to expire after `grace` (sooner if it already expires sooner).
pub async fn rotate(
    client: &Client,
    namespace: &str,
    name: &str,
    grace: Duration,
) -> anyhow::Result<Rotation> {
    let api: Api<AccessToken> = Api::namespaced(client.clone(), namespace);
    let old = api
        .get(name)
        .await
        .with_context(|| format!("reading accesstoken/{name}"))?;
    let status = old.status.clone().unwrap_or_default();
    if old.spec.revoked || status.phase != Some(AccessTokenPhase::Active) {
        bail!(
            "accesstoken/{name} is {}: only an active token is rotated; create a new one",
            status
                .phase
                .map_or_else(|| "not issued yet".to_owned(), |p| format!("{p:?}"))
        );
    }
    if let Some(successor) = old.annotations().get(ROTATED_TO_ANNOTATION) {
        bail!("accesstoken/{name} was already rotated to {successor}; rotate that one");
    }
    let now = Timestamp::now();
    let lifetime = match (&old.spec.ttl, &old.spec.expires_at, &status.issued_at) {
        (Some(ttl), _, _) => Expiry::After(Duration::from(*ttl)),
        (None, Some(at), Some(issued)) => Expiry::After(
            Duration::try_from(at.0.duration_since(issued.0)).unwrap_or(Duration::from_secs(1)),
        ),
        _ => Expiry::Never,
    };
    let family = old
        .labels()
        .get(TOKEN_FAMILY_LABEL)
        .cloned()
        .unwrap_or_else(|| name.to_owned());
    let successor = format!("{family}-{}", now.strftime("%Y%m%d%H%M%S"));
    let issued = issue(
        client,
        namespace,
        NewToken {
            name: &successor,
            models: old.spec.models.clone(),
            expiry: lifetime,
            // A token the operator issued sits in a Secret that workloads may mount.
            keep_secret: old.spec.token_hash.is_none(),
            limits: old.spec.limits,
            family: &family,
            rotated_from: Some(name),
        },
    )
    .await?;

    let old_expires_at = shorten(
        &api,
        name,
        status.expires_at.map(|t| t.0),
        &successor,
        now,
        grace,
    )
    .await;
    Ok(Rotation {
        issued,
        predecessor: name.to_owned(),
        old_expires_at,
    })
}

/// Sets `name` to expire after `grace` from `now` (or keeps an earlier expiry) and names its
/// successor; waits until the operator has applied it.
async fn shorten(
    api: &Api<AccessToken>,
    name: &str,
    expires_at: Option<Timestamp>,
    successor: &str,
    now: Timestamp,
    grace: Duration,
) -> anyhow::Result<Timestamp> {
    let grace_ends = now
        .checked_add(grace)
        .context("the grace period is too long")?;
    // Whole seconds: the API server keeps no more of a time.
    let grace_ends = Timestamp::from_second(grace_ends.as_second())?;
    let old_expires_at = match expires_at {
        Some(at) if at < grace_ends => at,
        _ => grace_ends,
    };
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({
            "metadata": {"annotations": {ROTATED_TO_ANNOTATION: successor}},
            "spec": {"ttl": null, "expiresAt": Time(old_expires_at)},
        })),
    )
    .await
    .with_context(|| format!("shortening accesstoken/{name} to its grace period"))?;
    wait_for(api, name, "shorten the old token", |t| {
        t.status
            .as_ref()
            .and_then(|s| s.expires_at.as_ref())
            .is_some_and(|at| at.0 == old_expires_at)
    })
    .await?;
    Ok(old_expires_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_go_durations_or_whole_days() {
        assert_eq!(parse_span("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_span("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_span("1h30m"), Ok(Duration::from_secs(5_400)));
        assert!(
            parse_span("0s")
                .unwrap_err()
                .contains("not a positive duration")
        );
        assert!(parse_span("soon").unwrap_err().contains("such as 30d"));
    }

    fn issued(secret: Option<&str>) -> Issued {
        Issued {
            name: "app".into(),
            namespace: "demo".into(),
            models: vec!["minilm".into(), "chat".into()],
            expires_at: Some("2030-01-01T00:00:00Z".parse().unwrap()),
            token: Token::generate().unwrap(),
            secret: secret.map(str::to_owned),
        }
    }

    #[test]
    fn the_token_is_printed_once_in_the_chosen_form() {
        let made = issued(None);
        let secret = made.token.expose_secret().to_owned();
        let text = made.render(Output::Text);
        assert_eq!(text.matches(&secret).count(), 1);
        assert!(text.contains("for models minilm, chat; expires 2030-01-01T00:00:00Z"));
        assert!(text.contains("not stored anywhere"));
        assert!(
            issued(Some("app"))
                .render(Output::Text)
                .contains("also kept in Secret app")
        );
        let env = made.render(Output::Env);
        assert!(env.starts_with(&format!("INFERGATE_TOKEN={secret}\n")));
        let json: serde_json::Value = serde_json::from_str(&made.render(Output::Json)).unwrap();
        assert_eq!(json["token"], secret);
        assert_eq!(json["models"], json!(["minilm", "chat"]));
        assert_eq!(json["secret"], serde_json::Value::Null);
    }
}
