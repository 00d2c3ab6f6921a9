//! `infergate token create | list | revoke | rotate -f FILES`: the token commands against local
//! mode's files, which are its desired state as a cluster's objects are. A command writes the
//! AccessToken YAML (only the digest of a token made here, `spec.tokenHash`) and a running
//! `infergate up` applies it within its poll; `list` reads the files and the state directory.
//!
//! Edits of a person's files are line edits of the one document concerned (`revoked: true`,
//! `expiresAt:`), so their comments and layout stay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use crds::{AccessToken, Token, TokenLimits};
use jiff::Timestamp;
use kube::ResourceExt;

use super::manifests;
use super::tokens::Issued as IssuedState;
use crate::token_commands::{Expiry, Issued, table};

/// Where the AccessToken named `name` is written: its own file in a directory of files, or the
/// end of the one file `infergate up -f` reads.
fn new_file_for(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(format!("accesstoken-{name}.yaml"))
    } else {
        path.to_owned()
    }
}

/// A new AccessToken for the files at `path`: made here, only its digest written.
#[allow(clippy::too_many_arguments)]
pub fn create(
    path: &Path,
    state_dir: &Path,
    name: &str,
    models: Vec<String>,
    expiry: Expiry,
    limits: Option<TokenLimits>,
    wait: Duration,
) -> anyhow::Result<Issued> {
    let files = load(path)?;
    if files.tokens.iter().any(|t| t.name_any() == name) {
        bail!("AccessToken {name} already exists in {}", path.display());
    }
    let token = Token::generate()?;
    let mut spec = serde_json::json!({
        "models": models,
        "tokenHash": format!("sha256:{}", token.sha256_hex()),
    });
    let expires_at = match expiry {
        Expiry::Never => None,
        Expiry::After(span) => {
            spec["ttl"] = format!("{}s", span.as_secs()).into();
            Some(Timestamp::now() + span)
        }
        Expiry::At(at) => {
            spec["expiresAt"] = at.to_string().into();
            Some(at)
        }
    };
    if let Some(limits) = limits {
        spec["limits"] = serde_json::to_value(limits)?;
    }
    let document = serde_json::json!({
        "apiVersion": "infergate.dev/v1alpha1",
        "kind": "AccessToken",
        "metadata": {"name": name},
        "spec": spec,
    });
    let yaml = serde_yaml::to_string(&document)?;
    let file = new_file_for(path, name);
    let text = match std::fs::read_to_string(&file) {
        Ok(_) if path.is_dir() => bail!("{} exists already", file.display()),
        Ok(existing) => format!("{}\n---\n{yaml}", existing.trim_end()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => yaml,
        Err(e) => return Err(e).context(format!("reading {}", file.display())),
    };
    write_checked(path, &file, &text)?;
    wait_until_served(state_dir, &token, wait);
    Ok(Issued {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        models,
        expires_at,
        token,
        secret: None,
    })
}

/// Waits (at most `wait`) until the proxy of a running `infergate up` has the token's digest;
/// says so when none seems to run.
fn wait_until_served(state_dir: &Path, token: &Token, wait: Duration) {
    let config = state_dir.join("proxy.yaml");
    let digest = token.sha256_hex();
    let started = std::time::Instant::now();
    while started.elapsed() < wait {
        if std::fs::read_to_string(&config).is_ok_and(|text| text.contains(&digest)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "infergate up has not applied it yet (no proxy config in {} names it): it takes effect when `infergate up` runs on these files",
        state_dir.display()
    );
}

/// The file in the state directory naming the proxy's metrics listener of `infergate up`.
pub const METRICS_FILE: &str = "metrics-listen";

/// What the proxy of a running `infergate up` counted per token, if one answers.
fn usage_now(state_dir: &Path) -> Option<crate::usage::TokenCounters> {
    let addr = std::fs::read_to_string(state_dir.join(METRICS_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let page = runtime
        .block_on(crate::autoscaler::read_metrics(
            addr,
            Duration::from_secs(2),
        ))
        .ok()?;
    Some(crate::usage::parse_token_counters(&page))
}

/// A token's requests and work since its proxy started: `12 (1 4xx)` and `inputs 6`.
fn usage_cells(counters: &crate::usage::TokenCounters, id: &str) -> [String; 2] {
    use crate::usage::Figure;
    let mut requests = 0.0;
    let mut refused = Vec::new();
    let mut units = Vec::new();
    let mut figures: Vec<(&Figure, f64)> = counters
        .counts
        .iter()
        .filter(|((token, _), _)| token == id)
        .map(|((_, figure), value)| (figure, *value))
        .collect();
    figures.sort_by(|a, b| a.0.cmp(b.0));
    for (figure, value) in figures {
        match figure {
            Figure::Requests(class) => {
                requests += value;
                if class != "2xx" {
                    refused.push(format!("{value} {class}"));
                }
            }
            Figure::Units(unit) => units.push(format!("{unit} {value}")),
        }
    }
    let requests = if refused.is_empty() {
        format!("{requests}")
    } else {
        format!("{requests} ({})", refused.join(", "))
    };
    let units = if units.is_empty() {
        "-".to_owned()
    } else {
        units.join(", ")
    };
    [requests, units]
}

/// The AccessTokens of the files: phase, models, prefix, expiry, limits, and, while
/// `infergate up` runs, what each was used for since its proxy started.
pub fn list(path: &Path, state_dir: &Path) -> anyhow::Result<String> {
    let files = load(path)?;
    let issued = IssuedState::open(&state_dir.join("tokens.json"))?;
    let usage = usage_now(state_dir);
    let now = Timestamp::now();
    let mut rows = vec![[
        "NAME".to_owned(),
        "PHASE".to_owned(),
        "MODELS".to_owned(),
        "PREFIX".to_owned(),
        "EXPIRES".to_owned(),
        "LIMITS".to_owned(),
        "REQUESTS".to_owned(),
        "USAGE".to_owned(),
    ]];
    for token in &files.tokens {
        let issuance = issued.issuance(token);
        let expires = issuance
            .as_ref()
            .and_then(|i| token.spec.expiry(i.issued_at));
        let phase = match (&issuance, expires) {
            _ if token.spec.revoked => "Revoked",
            (None, _) => "Pending",
            (Some(_), Some(at)) if now >= at => "Expired",
            (Some(_), _) => "Active",
        };
        let limits = token.spec.limits.map_or_else(
            || "-".to_owned(),
            |l| {
                let mut parts = Vec::new();
                if let Some(n) = l.requests_per_minute {
                    parts.push(format!("{n} rpm"));
                }
                if let Some(n) = l.concurrent_requests {
                    parts.push(format!("{n} concurrent"));
                }
                if let Some(n) = l.tokens_per_minute {
                    parts.push(format!("{n} tpm"));
                }
                parts.join(", ")
            },
        );
        let [requests, used] = match &usage {
            Some(counters) => usage_cells(counters, &token.uid().unwrap_or_default()),
            None => ["-".to_owned(), "-".to_owned()],
        };
        rows.push([
            token.name_any(),
            phase.to_owned(),
            token.spec.models.join(","),
            issuance
                .and_then(|i| i.prefix)
                .unwrap_or_else(|| "-".to_owned()),
            expires.map_or_else(|| "never".to_owned(), |at| at.to_string()),
            limits,
            requests,
            used,
        ]);
    }
    Ok(table(&rows))
}

/// Sets `revoked: true` on AccessToken `name`.
pub fn revoke(path: &Path, name: &str) -> anyhow::Result<PathBuf> {
    edit_spec(path, name, |spec| set_field(spec, "revoked", "true"))
}

/// A successor of AccessToken `name` for the same models and limits and lifetime, printed
/// once; `name` then expires `grace` from now (or keeps an earlier expiry).
pub fn rotate(
    path: &Path,
    state_dir: &Path,
    name: &str,
    grace: Duration,
    wait: Duration,
) -> anyhow::Result<(Issued, Timestamp)> {
    let files = load(path)?;
    let old = files
        .tokens
        .iter()
        .find(|t| t.name_any() == name)
        .with_context(|| format!("no AccessToken {name} in {}", path.display()))?;
    if old.spec.revoked {
        bail!("AccessToken {name} is revoked: create a new one instead");
    }
    let issued = IssuedState::open(&state_dir.join("tokens.json"))?;
    let issued_at = issued.issuance(old).map(|i| i.issued_at);
    let current_expiry = issued_at.and_then(|at| old.spec.expiry(at));
    // The same lifetime, counted from the successor's issue.
    let lifetime = match (&old.spec.ttl, &old.spec.expires_at, issued_at) {
        (Some(ttl), _, _) => Expiry::After(Duration::from(*ttl)),
        (None, Some(at), Some(issued)) => Expiry::After(
            Duration::try_from(at.0.duration_since(issued)).unwrap_or(Duration::from_secs(1)),
        ),
        (None, Some(at), None) => Expiry::At(at.0),
        (None, None, _) => Expiry::Never,
    };
    let family = name
        .rsplit_once('-')
        .filter(|(_, stamp)| stamp.len() == 14 && stamp.bytes().all(|b| b.is_ascii_digit()))
        .map_or(name, |(family, _)| family);
    let successor = format!("{family}-{}", Timestamp::now().strftime("%Y%m%d%H%M%S"));
    let created = create(
        path,
        state_dir,
        &successor,
        old.spec.models.clone(),
        lifetime,
        old.spec.limits,
        wait,
    )?;
    let until = Timestamp::now() + grace;
    let until = current_expiry.map_or(until, |at| at.min(until));
    edit_spec(path, name, |spec| {
        let without_ttl = remove_field(spec, "ttl");
        set_field(&without_ttl, "expiresAt", &format!("\"{until}\""))
    })?;
    Ok((created, until))
}

fn load(path: &Path) -> anyhow::Result<manifests::Manifests> {
    manifests::load_checked(path)
}

/// Rewrites the spec of the document of AccessToken `name` with `change` (the spec's lines),
/// then checks that the files still load.
fn edit_spec(
    path: &Path,
    name: &str,
    change: impl Fn(&[String]) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<PathBuf> {
    for file in manifests::files_of(path)? {
        let text = std::fs::read_to_string(&file)?;
        let mut documents = split_documents(&text);
        let Some(document) = documents.iter_mut().find(|d| is_token(d, name)) else {
            continue;
        };
        let lines: Vec<String> = document.lines().map(str::to_owned).collect();
        let start = lines
            .iter()
            .position(|l| l.trim_end() == "spec:")
            .with_context(|| {
                format!(
                    "{}: the spec of AccessToken {name} is not a block of `spec:` lines; edit it by hand",
                    file.display()
                )
            })?;
        let end = lines[start + 1..]
            .iter()
            .position(|l| !l.trim().is_empty() && !l.starts_with([' ', '\t']))
            .map_or(lines.len(), |i| start + 1 + i);
        let spec = change(&lines[start + 1..end])?;
        let mut edited = lines[..=start].to_vec();
        edited.extend(spec);
        edited.extend_from_slice(&lines[end..]);
        *document = edited.join("\n") + "\n";
        write_checked(path, &file, &documents.concat())?;
        return Ok(file);
    }
    bail!("no AccessToken {name} in {}", path.display())
}

/// The documents of a YAML stream, each with its `---` separator line, so that joining them
/// gives the text back.
fn split_documents(text: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" && !documents.last().is_some_and(String::is_empty) {
            documents.push(String::new());
        }
        documents
            .last_mut()
            .expect("at least one document")
            .push_str(line);
    }
    documents
}

fn is_token(document: &str, name: &str) -> bool {
    let body = document.strip_prefix("---").unwrap_or(document);
    serde_yaml::from_str::<AccessToken>(body).is_ok_and(|t| t.name_any() == name)
}

/// The indentation of a spec's fields.
fn indent_of(spec: &[String]) -> String {
    spec.iter().find(|l| !l.trim().is_empty()).map_or_else(
        || "  ".to_owned(),
        |l| l.chars().take_while(|c| c.is_whitespace()).collect(),
    )
}

/// `field: value` in the spec: replaced where the field is, else added first.
fn set_field(spec: &[String], field: &str, value: &str) -> anyhow::Result<Vec<String>> {
    let indent = indent_of(spec);
    let line = format!("{indent}{field}: {value}");
    let mut lines = spec.to_vec();
    let key = format!("{indent}{field}:");
    match lines.iter().position(|l| l.starts_with(&key)) {
        Some(at) => lines[at] = line,
        None => lines.insert(0, line),
    }
    Ok(lines)
}

/// The spec without `field` (a one-line field).
fn remove_field(spec: &[String], field: &str) -> Vec<String> {
    let key = format!("{}{field}:", indent_of(spec));
    spec.iter()
        .filter(|l| !l.starts_with(&key))
        .cloned()
        .collect()
}

/// Writes `text` to `file` whole, unless the files at `path` would then not load (the old text
/// stays).
fn write_checked(path: &Path, file: &Path, text: &str) -> anyhow::Result<()> {
    let before = std::fs::read(file).ok();
    super::write_atomically(file, text.as_bytes(), 0o644)?;
    if let Err(error) = load(path) {
        match before {
            Some(bytes) => super::write_atomically(file, &bytes, 0o644)?,
            None => std::fs::remove_file(file)?,
        }
        return Err(error.context(format!("{} left as it was", file.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the app's tokens\napiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: app}\nspec:\n  # the chat app\n  models: [chat]\n  ttl: 720h\n---\napiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: other}\nspec:\n  models: [chat]\n";

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn documents_split_and_join_back_to_the_same_text() {
        let documents = split_documents(FILE);
        assert_eq!(documents.len(), 2);
        assert_eq!(documents.concat(), FILE);
        assert!(is_token(&documents[1], "other"));
        assert!(!is_token(&documents[1], "app"));
    }

    #[test]
    fn a_field_is_set_in_place_or_added_and_comments_stay() {
        let spec = lines("  # the chat app\n  models: [chat]\n  ttl: 720h");
        assert_eq!(
            set_field(&spec, "revoked", "true").unwrap(),
            lines("  revoked: true\n  # the chat app\n  models: [chat]\n  ttl: 720h")
        );
        let revoked = set_field(&spec, "revoked", "true").unwrap();
        assert_eq!(
            set_field(&revoked, "revoked", "false").unwrap()[0],
            "  revoked: false"
        );
        assert_eq!(
            remove_field(&spec, "ttl"),
            lines("  # the chat app\n  models: [chat]")
        );
    }
}
