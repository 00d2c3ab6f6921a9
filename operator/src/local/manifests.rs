//! Reads the ModelDeployment and AccessToken YAMLs one would `kubectl apply`, and judges them as
//! a cluster would (structural schema, then CEL rules), plus what local mode itself needs: models
//! on `file://` paths that exist or downloaded, run by the builtin runtime, tokens naming known
//! models.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crds::{AccessToken, ModelDeployment, ModelUri};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use kube::{CustomResourceExt, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::schema;

const API_VERSION: &str = "infergate.dev/v1alpha1";
const DEFAULT_NAMESPACE: &str = "default";

/// One thing wrong with the files, located well enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based position of the YAML document in its file.
    pub document: usize,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)?;
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The resources of a valid set of files, with the metadata a cluster would have filled in.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub models: Vec<ModelDeployment>,
    pub tokens: Vec<AccessToken>,
}

/// The YAML files `path` names: itself, or the `.yaml`/`.yml` files of a directory, sorted.
pub fn files_of(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// [`load`] for a command: the problems, one a line, as its error.
pub fn load_checked(path: &Path) -> anyhow::Result<Manifests> {
    load(path).map_err(|problems| {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", problems.join("\n"))
    })
}

/// Reads and judges every file under `path`; all problems are reported at once.
pub fn load(path: &Path) -> Result<Manifests, Vec<Problem>> {
    let files = files_of(path).map_err(|e| {
        vec![Problem {
            file: path.to_owned(),
            document: 0,
            field: None,
            message: format!("cannot read: {e}"),
        }]
    })?;
    let mut problems = Vec::new();
    let mut manifests = Manifests::default();
    let mut token_origins = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => read_file(
                &file,
                &text,
                &mut manifests,
                &mut token_origins,
                &mut problems,
            ),
            Err(e) => problems.push(Problem {
                file,
                document: 0,
                field: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    for (token, (file, document)) in manifests.tokens.iter().zip(&token_origins) {
        let known: HashSet<(Option<String>, String)> = manifests
            .models
            .iter()
            .map(|m| (m.namespace(), m.name_any()))
            .collect();
        for (i, name) in token.spec.models.iter().enumerate() {
            if !known.contains(&(token.namespace(), name.clone())) {
                problems.push(Problem {
                    file: file.clone(),
                    document: *document,
                    field: Some(format!("spec.models[{i}]")),
                    message: format!("no ModelDeployment named {name} in these files"),
                });
            }
        }
    }
    if manifests.models.is_empty() && manifests.tokens.is_empty() && problems.is_empty() {
        problems.push(Problem {
            file: path.to_owned(),
            document: 0,
            field: None,
            message: "no ModelDeployment or AccessToken found".to_owned(),
        });
    }
    if problems.is_empty() {
        Ok(manifests)
    } else {
        Err(problems)
    }
}

/// Where each accepted resource came from, for cross-resource problems.
struct Origin<'a> {
    file: &'a Path,
    document: usize,
}

impl Origin<'_> {
    fn problem(&self, field: Option<&str>, message: impl Into<String>) -> Problem {
        Problem {
            file: self.file.to_owned(),
            document: self.document,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

fn read_file(
    file: &Path,
    text: &str,
    manifests: &mut Manifests,
    token_origins: &mut Vec<(PathBuf, usize)>,
    problems: &mut Vec<Problem>,
) {
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file,
            document: i + 1,
        };
        let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                // The parser cannot find the next document after a syntax error.
                problems.push(origin.problem(None, format!("invalid YAML: {e}")));
                break;
            }
        };
        let value = match serde_json::to_value(&value) {
            Ok(value) => value,
            Err(e) => {
                problems.push(origin.problem(None, format!("not representable as JSON: {e}")));
                continue;
            }
        };
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let kind = value["kind"].as_str().unwrap_or_default();
        if api_version != API_VERSION {
            problems.push(origin.problem(
                Some("apiVersion"),
                format!("must be {API_VERSION}, not {api_version:?}"),
            ));
            continue;
        }
        match kind {
            "ModelDeployment" => {
                if let Some(md) = judge::<ModelDeployment>(&origin, value, problems) {
                    accept_model(&origin, md, manifests, problems);
                }
            }
            "AccessToken" => {
                if let Some(token) = judge::<AccessToken>(&origin, value, problems)
                    && accept_token(&origin, token, manifests, problems)
                {
                    token_origins.push((file.to_owned(), origin.document));
                }
            }
            other => problems.push(origin.problem(
                Some("kind"),
                format!(
                    "{other:?} is not served by infergate; expected ModelDeployment or AccessToken"
                ),
            )),
        }
    }
}

trait Validated: DeserializeOwned + CustomResourceExt + Resource {
    fn cel(&self) -> Result<(), String>;
}

impl Validated for ModelDeployment {
    fn cel(&self) -> Result<(), String> {
        self.validate_cel().map_err(|e| e.to_string())
    }
}

impl Validated for AccessToken {
    fn cel(&self) -> Result<(), String> {
        self.validate_cel().map_err(|e| e.to_string())
    }
}

fn schema_of<K: CustomResourceExt>() -> Option<JSONSchemaProps> {
    K::crd()
        .spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .clone()
}

/// The schema, then the CEL rules, as the API server applies them on create.
fn judge<K: Validated>(
    origin: &Origin<'_>,
    value: serde_json::Value,
    problems: &mut Vec<Problem>,
) -> Option<K> {
    let before = problems.len();
    if value["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        problems.push(origin.problem(Some("metadata.name"), "is required"));
    }
    if let Some(schema) = schema_of::<K>() {
        problems.extend(
            schema::violations(&schema, &value)
                .into_iter()
                .map(|v| origin.problem(Some(&v.field), v.message)),
        );
    }
    if problems.len() > before {
        return None;
    }
    let mut resource: K = match serde_json::from_value(value) {
        Ok(resource) => resource,
        Err(e) => {
            problems.push(origin.problem(None, e.to_string()));
            return None;
        }
    };
    if let Err(message) = resource.cel() {
        problems.push(origin.problem(Some("spec"), message));
        return None;
    }
    if resource.namespace().is_none() {
        resource.meta_mut().namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
    Some(resource)
}

fn accept_model(
    origin: &Origin<'_>,
    mut md: ModelDeployment,
    manifests: &mut Manifests,
    problems: &mut Vec<Problem>,
) {
    // Without an API server there is no UID: a model without `modelVersionId` is served under
    // its name.
    md.meta_mut().uid = Some(md.name_any());
    let before = problems.len();
    if md
        .spec
        .runtime
        .as_ref()
        .is_some_and(|r| r.container.is_some() || r.image.is_some())
    {
        problems.push(origin.problem(
            Some("spec.runtime"),
            "local mode runs the builtin infergate-runtime binary; images apply in a cluster only",
        ));
    }
    match source(&md) {
        Ok(Source::Dir(dir)) if dir.is_dir() => {}
        Ok(Source::Dir(dir)) => problems.push(origin.problem(
            Some("spec.model.uri"),
            format!("{} is not a directory on this machine", dir.display()),
        )),
        Ok(Source::Download(_)) => {}
        Err(message) => problems.push(origin.problem(Some("spec.model.uri"), message)),
    }
    let same_name = manifests
        .models
        .iter()
        .any(|m| m.name_any() == md.name_any() && m.namespace() == md.namespace());
    if same_name {
        problems.push(origin.problem(
            Some("metadata.name"),
            format!("a second ModelDeployment named {}", md.name_any()),
        ));
    }
    let id = md.model_version_id();
    if manifests.models.iter().any(|m| m.model_version_id() == id) {
        problems.push(origin.problem(
            Some("spec.modelVersionId"),
            format!(
                "{} is already another model's id; ids are unique",
                id.unwrap_or_default()
            ),
        ));
    }
    if problems.len() == before {
        manifests.models.push(md);
    }
}

fn accept_token(
    origin: &Origin<'_>,
    mut token: AccessToken,
    manifests: &mut Manifests,
    problems: &mut Vec<Problem>,
) -> bool {
    token.meta_mut().uid = Some(format!(
        "{}.{}",
        token.namespace().unwrap_or_default(),
        token.name_any()
    ));
    if manifests
        .tokens
        .iter()
        .any(|t| t.name_any() == token.name_any() && t.namespace() == token.namespace())
    {
        problems.push(origin.problem(
            Some("metadata.name"),
            format!("a second AccessToken named {}", token.name_any()),
        ));
        return false;
    }
    manifests.tokens.push(token);
    true
}

/// Where a model's files come from in local mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory of this machine (`file://`).
    Dir(PathBuf),
    /// A download (`https://`, `s3://`, `gs://`, `az://`, `hf://`), as a cluster's init
    /// container does it.
    Download(String),
}

/// The source of `md`'s files.
pub fn source(md: &ModelDeployment) -> Result<Source, String> {
    match md.spec.model.parsed_uri().map_err(|e| e.to_string())? {
        ModelUri::File { path } => Ok(Source::Dir(PathBuf::from(path))),
        ModelUri::Https { url } => Ok(Source::Download(url)),
        ModelUri::Remote { uri } => Ok(Source::Download(uri)),
        ModelUri::Pvc { .. } => Err(format!(
            "{}: a PersistentVolumeClaim exists in a cluster only; local mode serves file://, \
             https://, s3://, gs://, az:// and hf:// models",
            md.spec.model.uri
        )),
    }
}

/// The directory the runtime of `md` reads: its own for a `file://` model, one under the state
/// directory for a download.
pub fn model_dir(md: &ModelDeployment, state_dir: &Path) -> PathBuf {
    match source(md) {
        Ok(Source::Dir(dir)) => dir,
        _ => state_dir
            .join("models")
            .join(md.model_version_id().unwrap_or_default()),
    }
}
