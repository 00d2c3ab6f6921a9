//! Client code for one deployment: what `infergate snippet` prints and what the operator
//! publishes in each ModelDeployment's snippets ConfigMap.
//!
//! A snippet is a whole program that runs unmodified: the endpoint, the model version id, the
//! deployment's default deadline (`OICM-Request-Timeout`) and a payload of its task are filled
//! in; the token comes from the `INFERGATE_TOKEN` environment variable, never from the text.
//! Generation streams (server-sent events); speech recognition uploads the file named on the
//! command line (`recording.wav` when none is); speech and images are written to `speech.wav`
//! and `image.png`; a tabular model's input width is read from its signature first.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crds::{ModelDeployment, RequestTimeouts, Task};
use kube::ResourceExt as _;
use serde_json::{Value, json};

/// The environment variable every snippet reads the token from.
pub const TOKEN_VARIABLE: &str = "INFERGATE_TOKEN";

/// Key of the snippets ConfigMap holding the proxy URL the snippets were made for.
pub const URL_KEY: &str = "url";

/// Key of the snippets ConfigMap holding the deadline in seconds the snippets send.
pub const TIMEOUT_KEY: &str = "requestTimeoutSeconds";

/// A client library or tool a snippet is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// Python with `requests`.
    Python,
    /// A bash script of curl calls (and jq where an answer is base64).
    Curl,
    /// Node 18 or later, its own `fetch`.
    Javascript,
    /// The `openai` Python package.
    OpenaiPython,
    /// The `openai` npm package.
    OpenaiNode,
    /// `huggingface_hub`'s `InferenceClient` (Python).
    Huggingface,
}

impl Language {
    pub const ALL: [Language; 6] = [
        Language::Python,
        Language::Curl,
        Language::Javascript,
        Language::OpenaiPython,
        Language::OpenaiNode,
        Language::Huggingface,
    ];

    /// The `--lang` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Curl => "curl",
            Language::Javascript => "javascript",
            Language::OpenaiPython => "openai-python",
            Language::OpenaiNode => "openai-node",
            Language::Huggingface => "huggingface",
        }
    }

    /// The file a snippet of this language is saved as (a ConfigMap key).
    pub fn file_name(self) -> String {
        let extension = match self {
            Language::Python | Language::OpenaiPython | Language::Huggingface => "py",
            Language::Curl => "sh",
            Language::Javascript | Language::OpenaiNode => "mjs",
        };
        format!("{}.{extension}", self.as_str())
    }

    /// Whether a snippet of `task` exists in this language: OpenAI's API has no classification,
    /// reranking, translation or tabular route, and `InferenceClient` no reranking or tabular
    /// call that infergate's routes answer.
    pub fn covers(self, task: Task) -> bool {
        match self {
            Language::Python | Language::Curl | Language::Javascript => true,
            Language::OpenaiPython | Language::OpenaiNode => matches!(
                task,
                Task::TextGeneration
                    | Task::Embedding
                    | Task::SpeechRecognition
                    | Task::TextToSpeech
                    | Task::TextToImage
            ),
            Language::Huggingface => !matches!(task, Task::Rerank | Task::Tabular),
        }
    }
}

/// The deployment a snippet calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The ModelDeployment's name, for the heading.
    pub name: String,
    pub task: Task,
    /// Where clients reach the proxy, e.g. `https://inference.example.com`.
    pub base_url: String,
    pub model_version_id: String,
    /// The deployment's default deadline, sent as `OICM-Request-Timeout`.
    pub timeout_seconds: u64,
    /// Sampling values of a generation snippet: the deployment's defaults when it sets them.
    pub temperature: f64,
    pub top_p: f64,
}

/// Sampling values of generation snippets when the deployment sets none (the seed document's).
const DEFAULT_TEMPERATURE: f64 = 0.7;
const DEFAULT_TOP_P: f64 = 0.9;

impl Target {
    /// The snippets' target for `md`, served as `model_version_id` behind the proxy at
    /// `base_url`; `None` when its deadlines are invalid. `defaults` are the installation's.
    pub fn of(
        md: &ModelDeployment,
        model_version_id: String,
        base_url: &str,
        defaults: RequestTimeouts,
    ) -> Option<Target> {
        let generation = md.spec.generation.as_ref();
        let timeouts = md.spec.timeouts.clone().unwrap_or_default();
        let timeout = timeouts.resolve_with(defaults).ok()?.default;
        Some(Target {
            name: md.name_any(),
            task: md.spec.task,
            base_url: base_url.to_owned(),
            model_version_id,
            timeout_seconds: timeout.as_secs(),
            temperature: generation
                .and_then(|g| g.temperature)
                .unwrap_or(DEFAULT_TEMPERATURE),
            top_p: generation.and_then(|g| g.top_p).unwrap_or(DEFAULT_TOP_P),
        })
    }

    /// The model's API root: `<base>/models/<id>/proxy/v1`.
    fn api_root(&self) -> String {
        format!(
            "{}{}",
            self.base_url.trim_end_matches('/'),
            crds::names::model_endpoint(&self.model_version_id)
        )
    }

    /// The root Hugging Face clients post to (without `/v1`).
    fn hugging_face_root(&self) -> String {
        self.api_root().trim_end_matches("/v1").to_owned()
    }

    /// What the client waits at most: the deadline and a margin for the proxy's answer.
    fn client_timeout(&self) -> u64 {
        self.timeout_seconds + 10
    }
}

/// No snippet of this task in this language.
#[derive(Debug, thiserror::Error)]
#[error("no {language} snippet for task {task}: {why}; use --lang {alternatives}")]
pub struct Unsupported {
    language: &'static str,
    task: Task,
    why: &'static str,
    alternatives: String,
}

/// The snippet of `target`'s task in `language`.
pub fn render(target: &Target, language: Language) -> Result<String, Unsupported> {
    if !language.covers(target.task) {
        let alternatives: Vec<&str> = Language::ALL
            .into_iter()
            .filter(|l| l.covers(target.task))
            .map(Language::as_str)
            .collect();
        return Err(Unsupported {
            language: language.as_str(),
            task: target.task,
            why: match language {
                Language::Huggingface => "InferenceClient has no call for it",
                _ => "OpenAI's API has no route for it",
            },
            alternatives: alternatives.join(", "),
        });
    }
    let template = match language {
        Language::Python => python(target),
        Language::Curl => curl(target),
        Language::Javascript => javascript(target),
        Language::OpenaiPython => openai_python(target),
        Language::OpenaiNode => openai_node(target),
        Language::Huggingface => hugging_face(target),
    };
    Ok(fill(template, target))
}

/// Every snippet of `target`, keyed by file name.
pub fn all(target: &Target) -> BTreeMap<String, String> {
    Language::ALL
        .into_iter()
        .filter_map(|language| {
            render(target, language)
                .ok()
                .map(|code| (language.file_name(), code))
        })
        .collect()
}

/// The example each task's snippet sends, on the route it is sent to (below the API root).
fn request(target: &Target) -> (&'static str, Value) {
    match target.task {
        Task::TextGeneration => (
            "/chat/completions",
            json!({
                "model": target.model_version_id,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is Deep Learning?"},
                ],
                "temperature": target.temperature,
                "top_p": target.top_p,
                "max_tokens": 200,
                "stream": true,
            }),
        ),
        Task::TextClassification => ("/classify", json!({"inputs": "this is good!"})),
        Task::Embedding => ("/embed", json!({"inputs": "What is Deep Learning?"})),
        Task::Rerank => (
            "/rerank",
            json!({
                "query": "What is Deep Learning?",
                "texts": [
                    "Deep Learning is a kind of machine learning.",
                    "The weather is nice today.",
                ],
            }),
        ),
        Task::Translation => ("/translate", json!({"text": "A man walking on the moon"})),
        Task::SpeechRecognition => ("/transcript", Value::Null),
        Task::TextToSpeech => ("/generate-speech", json!({"text": "Hi, can you help me?"})),
        Task::TextToImage => (
            "/generate-image",
            json!({"prompt": "A lighthouse at dusk", "num_inference_steps": 20}),
        ),
        Task::Tabular => ("/predict", Value::Null),
    }
}

/// A base64 answer saved to a file: the response field and the file name.
fn media(task: Task) -> Option<(&'static str, &'static str)> {
    match task {
        Task::TextToSpeech => Some(("audio", "speech.wav")),
        Task::TextToImage => Some(("image", "image.png")),
        _ => None,
    }
}

/// Replaces the `@NAME@` markers of a template.
fn fill(template: String, target: &Target) -> String {
    let (path, payload) = request(target);
    let mut code = template;
    for (marker, value) in [
        ("@TITLE@", format!("{} ({})", target.name, target.task)),
        ("@API_ROOT@", target.api_root()),
        ("@HF_ROOT@", target.hugging_face_root()),
        ("@MODEL@", target.model_version_id.clone()),
        ("@TIMEOUT@", target.timeout_seconds.to_string()),
        ("@CLIENT_TIMEOUT@", target.client_timeout().to_string()),
        ("@PATH@", path.to_owned()),
        ("@PY_PAYLOAD@", literal(&payload, Syntax::Python, 0)),
        ("@JS_PAYLOAD@", literal(&payload, Syntax::JavaScript, 0)),
        (
            "@SH_PAYLOAD@",
            shell_quote(&inline_literal(&payload, Syntax::JavaScript)),
        ),
        ("@TEMPERATURE@", target.temperature.to_string()),
        ("@TOP_P@", target.top_p.to_string()),
    ] {
        code = code.replace(marker, &value);
    }
    code
}

#[derive(Clone, Copy)]
enum Syntax {
    Python,
    JavaScript,
}

/// `value` as a Python or JavaScript literal, one line when short, else one item a line.
fn literal(value: &Value, syntax: Syntax, indent: usize) -> String {
    let inline = inline_literal(value, syntax);
    if indent + inline.len() <= 72 {
        return inline;
    }
    let step = match syntax {
        Syntax::Python => 4,
        Syntax::JavaScript => 2,
    };
    let pad = " ".repeat(indent + step);
    let close = " ".repeat(indent);
    let mut out = String::new();
    match value {
        Value::Array(items) => {
            out.push_str("[\n");
            for item in items {
                let _ = writeln!(out, "{pad}{},", literal(item, syntax, indent + step));
            }
            let _ = write!(out, "{close}]");
        }
        Value::Object(fields) => {
            out.push_str("{\n");
            for (key, item) in in_reading_order(fields) {
                let _ = writeln!(
                    out,
                    "{pad}{}: {},",
                    Value::from(key.as_str()),
                    literal(item, syntax, indent + step)
                );
            }
            let _ = write!(out, "{close}}}");
        }
        _ => out = inline,
    }
    out
}

fn inline_literal(value: &Value, syntax: Syntax) -> String {
    match (value, syntax) {
        (Value::Null, Syntax::Python) => "None".to_owned(),
        (Value::Bool(true), Syntax::Python) => "True".to_owned(),
        (Value::Bool(false), Syntax::Python) => "False".to_owned(),
        (Value::Array(items), _) => {
            let items: Vec<String> = items.iter().map(|i| inline_literal(i, syntax)).collect();
            format!("[{}]", items.join(", "))
        }
        (Value::Object(fields), _) => {
            let fields: Vec<String> = in_reading_order(fields)
                .into_iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), inline_literal(v, syntax)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        // JSON's strings, numbers and literals are JavaScript's, and its strings Python's.
        (scalar, _) => scalar.to_string(),
    }
}

/// The order a person writes a request's fields in (the model first, the prompt before the
/// knobs); JSON maps here are sorted by name.
const FIELD_ORDER: [&str; 14] = [
    "model",
    "messages",
    "role",
    "content",
    "inputs",
    "query",
    "texts",
    "text",
    "prompt",
    "num_inference_steps",
    "temperature",
    "top_p",
    "max_tokens",
    "stream",
];

fn in_reading_order(fields: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut ordered: Vec<(&String, &Value)> = fields.iter().collect();
    ordered.sort_by_key(|(key, _)| {
        FIELD_ORDER
            .iter()
            .position(|known| known == key)
            .unwrap_or(FIELD_ORDER.len())
    });
    ordered
}

/// `text` as one single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

const PYTHON_HEAD: &str = r#""""@TITLE@ through infergate, with Python requests.

Set INFERGATE_TOKEN to an access token of this model version first.
"""
import os

import requests

inference_url = "@API_ROOT@"
headers = {
    "Authorization": f"Bearer {os.environ['INFERGATE_TOKEN']}",
    # The deployment's default deadline in seconds; send more for longer requests.
    "OICM-Request-Timeout": "@TIMEOUT@",
}
"#;

fn python(target: &Target) -> String {
    let body = match target.task {
        Task::TextGeneration => {
            r#"
payload = @PY_PAYLOAD@
with requests.post(
    f"{inference_url}@PATH@",
    headers={**headers, "Accept": "text/event-stream"},
    json=payload,
    stream=True,
    timeout=@CLIENT_TIMEOUT@,
) as response:
    response.raise_for_status()
    # Server-sent events: a `data: {json}` line per chunk, then `data: [DONE]`.
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            break
        for choice in json.loads(data)["choices"]:
            print(choice["delta"].get("content") or "", end="", flush=True)
print()
"#
        }
        Task::SpeechRecognition => {
            r#"
# A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.
audio_path = sys.argv[1] if len(sys.argv) > 1 else "recording.wav"
with open(audio_path, "rb") as audio:
    response = requests.post(
        f"{inference_url}@PATH@",
        headers=headers,
        files={"file": (os.path.basename(audio_path), audio)},
        timeout=@CLIENT_TIMEOUT@,
    )
response.raise_for_status()
print(response.json()["text"])
"#
        }
        Task::TextToSpeech => {
            r#"
# The fields this model takes, with a description of each.
schema = requests.get(f"{inference_url}@PATH@/schema", headers=headers, timeout=30)
schema.raise_for_status()
print("fields:", ", ".join(field["name"] for field in schema.json()))

payload = @PY_PAYLOAD@
response = requests.post(
    f"{inference_url}@PATH@", headers=headers, json=payload, timeout=@CLIENT_TIMEOUT@
)
response.raise_for_status()
answer = response.json()
with open("speech.wav", "wb") as out:
    out.write(base64.b64decode(answer["audio"]))
print(f"wrote speech.wav ({answer['sampling_rate']} Hz)")
"#
        }
        Task::TextToImage => {
            r#"
payload = @PY_PAYLOAD@
response = requests.post(
    f"{inference_url}@PATH@", headers=headers, json=payload, timeout=@CLIENT_TIMEOUT@
)
response.raise_for_status()
with open("image.png", "wb") as out:
    out.write(base64.b64decode(response.json()["image"]))
print("wrote image.png")
"#
        }
        Task::Tabular => {
            r#"
# The model's signature (MLflow tensor specs): one row is as wide as its input.
schema = requests.get(f"{inference_url}@PATH@/schema", headers=headers, timeout=30)
schema.raise_for_status()
shape = schema.json()["inputs"][0]["tensor-spec"]["shape"]
# A row of zeros; put your features here.
row = [0.0] * shape[1] if len(shape) == 2 else 0.0
response = requests.post(
    f"{inference_url}@PATH@", headers=headers, json=[row], timeout=@CLIENT_TIMEOUT@
)
response.raise_for_status()
print(response.json()["data"])
"#
        }
        Task::TextClassification | Task::Embedding | Task::Rerank | Task::Translation => {
            r#"
payload = @PY_PAYLOAD@
response = requests.post(
    f"{inference_url}@PATH@", headers=headers, json=payload, timeout=@CLIENT_TIMEOUT@
)
response.raise_for_status()
print(response.json())
"#
        }
    };
    let imports = match target.task {
        Task::TextGeneration => "import json\n",
        Task::SpeechRecognition => "import sys\n",
        Task::TextToSpeech | Task::TextToImage => "import base64\n",
        _ => "",
    };
    PYTHON_HEAD.replacen("import os\n", &format!("{imports}import os\n"), 1) + body
}

const CURL_HEAD: &str = r#"#!/usr/bin/env bash
# @TITLE@ through infergate, with curl.
# Set INFERGATE_TOKEN to an access token of this model version first.
set -euo pipefail
inference_url="@API_ROOT@"
"#;

/// The headers every curl call sends (and the deadline, which this deployment defaults to).
const CURL_AUTH: &str =
    r#"-H "Authorization: Bearer $INFERGATE_TOKEN" -H "OICM-Request-Timeout: @TIMEOUT@""#;

fn curl(target: &Target) -> String {
    let call = |path: &str, extra: &str| {
        format!(
            "curl -sS --fail-with-body --max-time @CLIENT_TIMEOUT@ -X POST \"$inference_url{path}\" \\\n  {CURL_AUTH} \\\n  {extra}"
        )
    };
    let json_body = r#"-H "Content-Type: application/json" -d @SH_PAYLOAD@"#;
    let body = match target.task {
        Task::TextGeneration => format!(
            "# Server-sent events as they come: a `data: {{json}}` line per chunk, then `data: [DONE]`.\n{} -N \\\n  -H \"Accept: text/event-stream\"\necho\n",
            call("@PATH@", json_body)
        ),
        Task::SpeechRecognition => format!(
            "# A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.\n{}\necho\n",
            call("@PATH@", r#"-F "file=@${1:-recording.wav}""#)
        ),
        Task::Tabular => format!(
            "# A row of zeros as wide as the model's input (its signature says); put your features here.\n\
             row=\"$(curl -sS --fail-with-body \"$inference_url@PATH@/schema\" {CURL_AUTH} |\n  \
             jq -c '.inputs[0][\"tensor-spec\"].shape as $s | [if ($s | length) == 2 then [range($s[1]) | 0.0] else 0.0 end]')\"\n{}\necho\n",
            call("@PATH@", r#"-H "Content-Type: application/json" -d "$row""#)
        ),
        task => match media(task) {
            Some((field, file)) => {
                let schema = if task == Task::TextToSpeech {
                    format!(
                        "# The fields this model takes, with a description of each.\ncurl -sS --fail-with-body \"$inference_url@PATH@/schema\" {CURL_AUTH}\necho\n"
                    )
                } else {
                    String::new()
                };
                format!(
                    "{schema}# The answer's `{field}` is base64: decoded into {file}.\n{} |\n  jq -r .{field} | base64 -d > {file}\necho \"wrote {file}\"\n",
                    call("@PATH@", json_body)
                )
            }
            None => format!("{}\necho\n", call("@PATH@", json_body)),
        },
    };
    format!("{CURL_HEAD}\n{body}")
}

const JAVASCRIPT_HEAD: &str = r#"// @TITLE@ through infergate, with Node's fetch (Node 18 or later).
// Set INFERGATE_TOKEN to an access token of this model version first.
@IMPORTS@
const inferenceUrl = "@API_ROOT@";
const headers = {
  Authorization: `Bearer ${process.env.INFERGATE_TOKEN}`,
  // The deployment's default deadline in seconds; send more for longer requests.
  "OICM-Request-Timeout": "@TIMEOUT@",
};

async function post(path, init) {
  const response = await fetch(`${inferenceUrl}${path}`, {
    method: "POST",
    ...init,
    headers: { ...headers, ...init.headers },
    signal: AbortSignal.timeout(@CLIENT_TIMEOUT@_000),
  });
  if (!response.ok) throw new Error(`${response.status}: ${await response.text()}`);
  return response;
}
"#;

fn javascript(target: &Target) -> String {
    let post_json = "await post(\"@PATH@\", {\n  headers: { \"Content-Type\": \"application/json\" },\n  body: JSON.stringify(payload),\n})";
    let (imports, body) = match target.task {
        Task::TextGeneration => (
            "",
            format!(
                r#"
const payload = @JS_PAYLOAD@;
const response = {post_json};
// Server-sent events: a `data: {{json}}` line per chunk, then `data: [DONE]`.
const decoder = new TextDecoder();
let pending = "";
for await (const bytes of response.body) {{
  pending += decoder.decode(bytes, {{ stream: true }});
  const lines = pending.split("\n");
  pending = lines.pop();
  for (const line of lines) {{
    if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
    for (const choice of JSON.parse(line.slice("data: ".length)).choices) {{
      process.stdout.write(choice.delta.content ?? "");
    }}
  }}
}}
process.stdout.write("\n");
"#
            ),
        ),
        Task::SpeechRecognition => (
            "import { readFile } from \"node:fs/promises\";\nimport { basename } from \"node:path\";\n",
            r#"
// A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.
const audioPath = process.argv[2] ?? "recording.wav";
const form = new FormData();
form.append("file", new Blob([await readFile(audioPath)]), basename(audioPath));
const response = await post("@PATH@", { body: form });
console.log((await response.json()).text);
"#
            .to_owned(),
        ),
        Task::Tabular => (
            "",
            r#"
// The model's signature (MLflow tensor specs): one row is as wide as its input.
const schema = await fetch(`${inferenceUrl}@PATH@/schema`, { headers });
if (!schema.ok) throw new Error(`${schema.status}: ${await schema.text()}`);
const shape = (await schema.json()).inputs[0]["tensor-spec"].shape;
// A row of zeros; put your features here.
const row = shape.length === 2 ? new Array(shape[1]).fill(0.0) : 0.0;
const response = await post("@PATH@", {
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify([row]),
});
console.log(JSON.stringify((await response.json()).data));
"#
            .to_owned(),
        ),
        task => match media(task) {
            Some((field, file)) => {
                let schema = if task == Task::TextToSpeech {
                    "// The fields this model takes, with a description of each.\nconst schema = await fetch(`${inferenceUrl}@PATH@/schema`, { headers });\nif (!schema.ok) throw new Error(`${schema.status}: ${await schema.text()}`);\nconsole.log(\"fields:\", (await schema.json()).map((field) => field.name).join(\", \"));\n\n"
                } else {
                    ""
                };
                (
                    "import { writeFile } from \"node:fs/promises\";\n",
                    format!(
                        "\n{schema}const payload = @JS_PAYLOAD@;\nconst response = {post_json};\nawait writeFile(\"{file}\", Buffer.from((await response.json()).{field}, \"base64\"));\nconsole.log(\"wrote {file}\");\n"
                    ),
                )
            }
            None => (
                "",
                format!(
                    "\nconst payload = @JS_PAYLOAD@;\nconst response = {post_json};\nconsole.log(JSON.stringify(await response.json(), null, 2));\n"
                ),
            ),
        },
    };
    JAVASCRIPT_HEAD.replace("@IMPORTS@", imports) + &body
}

const OPENAI_PYTHON_HEAD: &str = r#""""@TITLE@ through infergate, with the openai Python package.

Set INFERGATE_TOKEN to an access token of this model version first.
"""
@IMPORTS@import os

from openai import OpenAI

client = OpenAI(
    base_url="@API_ROOT@",
    api_key=os.environ["INFERGATE_TOKEN"],
    # The deployment's default deadline in seconds; send more for longer requests.
    default_headers={"OICM-Request-Timeout": "@TIMEOUT@"},
    timeout=@CLIENT_TIMEOUT@,
    max_retries=0,
)
"#;

fn openai_python(target: &Target) -> String {
    let (imports, body) = match target.task {
        Task::TextGeneration => (
            "",
            r#"
stream = client.chat.completions.create(
    model="@MODEL@",
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is Deep Learning?"},
    ],
    temperature=@TEMPERATURE@,
    top_p=@TOP_P@,
    max_tokens=200,
    stream=True,
)
for chunk in stream:
    for choice in chunk.choices:
        print(choice.delta.content or "", end="", flush=True)
print()
"#,
        ),
        Task::Embedding => (
            "",
            r#"
response = client.embeddings.create(model="@MODEL@", input=["What is Deep Learning?"])
vector = response.data[0].embedding
print(f"{len(vector)} dimensions: {vector[:4]}...")
"#,
        ),
        Task::SpeechRecognition => (
            "import sys\n",
            r#"
# A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.
audio_path = sys.argv[1] if len(sys.argv) > 1 else "recording.wav"
with open(audio_path, "rb") as audio:
    transcription = client.audio.transcriptions.create(model="@MODEL@", file=audio)
print(transcription.text)
"#,
        ),
        Task::TextToSpeech => (
            "",
            r#"
# The model speaks with its own voice; the client requires the field.
speech = client.audio.speech.create(
    model="@MODEL@", voice="alloy", input="Hi, can you help me?", response_format="wav"
)
speech.write_to_file("speech.wav")
print("wrote speech.wav")
"#,
        ),
        Task::TextToImage => (
            "import base64\n",
            r#"
images = client.images.generate(
    model="@MODEL@", prompt="A lighthouse at dusk", response_format="b64_json"
)
with open("image.png", "wb") as out:
    out.write(base64.b64decode(images.data[0].b64_json))
print("wrote image.png")
"#,
        ),
        _ => unreachable!("Language::covers"),
    };
    OPENAI_PYTHON_HEAD.replace("@IMPORTS@", imports) + body
}

const OPENAI_NODE_HEAD: &str = r#"// @TITLE@ through infergate, with the openai npm package.
// Set INFERGATE_TOKEN to an access token of this model version first.
@IMPORTS@import OpenAI from "openai";

const client = new OpenAI({
  baseURL: "@API_ROOT@",
  apiKey: process.env.INFERGATE_TOKEN,
  // The deployment's default deadline in seconds; send more for longer requests.
  defaultHeaders: { "OICM-Request-Timeout": "@TIMEOUT@" },
  timeout: @CLIENT_TIMEOUT@_000,
  maxRetries: 0,
});
"#;

fn openai_node(target: &Target) -> String {
    let (imports, body) = match target.task {
        Task::TextGeneration => (
            "",
            r#"
const stream = await client.chat.completions.create({
  model: "@MODEL@",
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "What is Deep Learning?" },
  ],
  temperature: @TEMPERATURE@,
  top_p: @TOP_P@,
  max_tokens: 200,
  stream: true,
});
for await (const chunk of stream) {
  for (const choice of chunk.choices) process.stdout.write(choice.delta.content ?? "");
}
process.stdout.write("\n");
"#,
        ),
        Task::Embedding => (
            "",
            r#"
const response = await client.embeddings.create({
  model: "@MODEL@",
  input: ["What is Deep Learning?"],
});
const vector = response.data[0].embedding;
console.log(`${vector.length} dimensions: ${vector.slice(0, 4)}...`);
"#,
        ),
        Task::SpeechRecognition => (
            "import { createReadStream } from \"node:fs\";\n",
            r#"
// A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.
const audioPath = process.argv[2] ?? "recording.wav";
const transcription = await client.audio.transcriptions.create({
  model: "@MODEL@",
  file: createReadStream(audioPath),
});
console.log(transcription.text);
"#,
        ),
        Task::TextToSpeech => (
            "import { writeFile } from \"node:fs/promises\";\n",
            r#"
// The model speaks with its own voice; the client requires the field.
const speech = await client.audio.speech.create({
  model: "@MODEL@",
  voice: "alloy",
  input: "Hi, can you help me?",
  response_format: "wav",
});
await writeFile("speech.wav", Buffer.from(await speech.arrayBuffer()));
console.log("wrote speech.wav");
"#,
        ),
        Task::TextToImage => (
            "import { writeFile } from \"node:fs/promises\";\n",
            r#"
const images = await client.images.generate({
  model: "@MODEL@",
  prompt: "A lighthouse at dusk",
  response_format: "b64_json",
});
await writeFile("image.png", Buffer.from(images.data[0].b64_json, "base64"));
console.log("wrote image.png");
"#,
        ),
        _ => unreachable!("Language::covers"),
    };
    OPENAI_NODE_HEAD.replace("@IMPORTS@", imports) + body
}

const HUGGING_FACE_HEAD: &str = r#""""@TITLE@ through infergate, with huggingface_hub's InferenceClient.

Set INFERGATE_TOKEN to an access token of this model version first.
"""
@IMPORTS@import os

from huggingface_hub import InferenceClient

client = InferenceClient(
    model="@HF_ROOT@",
    token=os.environ["INFERGATE_TOKEN"],
    # The deployment's default deadline in seconds; send more for longer requests.
    headers={"OICM-Request-Timeout": "@TIMEOUT@"},
    timeout=@CLIENT_TIMEOUT@,
)
"#;

fn hugging_face(target: &Target) -> String {
    let (imports, body) = match target.task {
        Task::TextGeneration => (
            "",
            r#"
stream = client.chat_completion(
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is Deep Learning?"},
    ],
    temperature=@TEMPERATURE@,
    top_p=@TOP_P@,
    max_tokens=200,
    stream=True,
)
for chunk in stream:
    for choice in chunk.choices:
        print(choice.delta.content or "", end="", flush=True)
print()
"#,
        ),
        Task::TextClassification => (
            "",
            r#"
for label in client.text_classification("this is good!"):
    print(f"{label.label}: {label.score:.4f}")
"#,
        ),
        Task::Embedding => (
            "",
            r#"
embedding = client.feature_extraction("What is Deep Learning?")
print(f"shape {embedding.shape}: {embedding[0][:4]}...")
"#,
        ),
        Task::Translation => (
            "",
            r#"
print(client.translation("A man walking on the moon").translation_text)
"#,
        ),
        Task::SpeechRecognition => (
            "import sys\n",
            r#"
# A WAV, MP3, FLAC or OGG file: the first argument, else recording.wav.
audio_path = sys.argv[1] if len(sys.argv) > 1 else "recording.wav"
print(client.automatic_speech_recognition(audio_path).text)
"#,
        ),
        Task::TextToSpeech => (
            "",
            r#"
with open("speech.wav", "wb") as out:
    out.write(client.text_to_speech("Hi, can you help me?"))
print("wrote speech.wav")
"#,
        ),
        Task::TextToImage => (
            "",
            r#"
image = client.text_to_image("A lighthouse at dusk", num_inference_steps=20)
image.save("image.png")
print("wrote image.png")
"#,
        ),
        Task::Rerank | Task::Tabular => unreachable!("Language::covers"),
    };
    HUGGING_FACE_HEAD.replace("@IMPORTS@", imports) + body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(task: Task) -> Target {
        Target {
            name: "chat".into(),
            task,
            base_url: "https://inference.example.com/".into(),
            model_version_id: "mv-1".into(),
            timeout_seconds: 300,
            temperature: 0.7,
            top_p: 0.9,
        }
    }

    #[test]
    fn every_task_has_a_python_curl_and_javascript_snippet_and_every_marker_is_filled() {
        for task in Task::ALL {
            let snippets = all(&target(task));
            for language in [Language::Python, Language::Curl, Language::Javascript] {
                assert!(
                    snippets.contains_key(&language.file_name()),
                    "{task} {language:?}"
                );
            }
            for (file, code) in &snippets {
                let markers = unfilled_markers(code);
                assert!(markers.is_empty(), "{task} {file}: {markers:?}");
                assert!(code.contains("INFERGATE_TOKEN"), "{task} {file}");
                assert!(code.contains("OICM-Request-Timeout"), "{task} {file}");
                assert!(
                    code.contains("300"),
                    "{task} {file}: the deployment's deadline"
                );
                assert!(
                    code.contains("https://inference.example.com/models/mv-1/proxy"),
                    "{task} {file}: the endpoint without a double slash"
                );
                assert!(
                    !code.contains("igt_"),
                    "{task} {file}: no token in the text"
                );
            }
        }
    }

    /// `@WORD@` markers left in `code`.
    fn unfilled_markers(code: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find('@') {
            rest = &rest[at + 1..];
            let word: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if !word.is_empty() && rest[word.len()..].starts_with('@') {
                found.push(word);
            }
        }
        found
    }

    #[test]
    fn snippets_call_the_route_of_their_task() {
        let route = |task, language| render(&target(task), language).unwrap();
        assert!(route(Task::TextClassification, Language::Python).contains("/classify"));
        assert!(route(Task::Embedding, Language::Curl).contains("\"$inference_url/embed\""));
        assert!(route(Task::Rerank, Language::Javascript).contains("\"/rerank\""));
        assert!(route(Task::Translation, Language::Python).contains("/translate"));
        assert!(
            route(Task::SpeechRecognition, Language::Curl)
                .contains("-F \"file=@${1:-recording.wav}\"")
        );
        assert!(route(Task::TextToSpeech, Language::Python).contains("/generate-speech/schema"));
        assert!(route(Task::TextToImage, Language::Javascript).contains("\"/generate-image\""));
        assert!(route(Task::Tabular, Language::Curl).contains("/predict/schema"));
        let chat = route(Task::TextGeneration, Language::Python);
        assert!(chat.contains("/chat/completions") && chat.contains("\"stream\": True"));
        assert!(chat.contains("\"model\": \"mv-1\""), "{chat}");
        let stream = route(Task::TextGeneration, Language::Curl);
        assert!(stream.contains(" -N ") && stream.contains("text/event-stream"));
    }

    #[test]
    fn hugging_face_posts_to_the_root_and_openai_to_v1() {
        let hf = render(&target(Task::Embedding), Language::Huggingface).unwrap();
        assert!(hf.contains("model=\"https://inference.example.com/models/mv-1/proxy\","));
        let openai = render(&target(Task::Embedding), Language::OpenaiNode).unwrap();
        assert!(openai.contains("baseURL: \"https://inference.example.com/models/mv-1/proxy/v1\""));
    }

    #[test]
    fn a_language_without_the_task_names_the_ones_that_have_it() {
        let error = render(&target(Task::Rerank), Language::OpenaiPython).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no openai-python snippet for task rerank: OpenAI's API has no route for it; use --lang python, curl, javascript"
        );
        let error = render(&target(Task::Tabular), Language::Huggingface).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("InferenceClient has no call for it")
        );
        assert_eq!(all(&target(Task::Rerank)).len(), 3);
        assert_eq!(all(&target(Task::TextGeneration)).len(), 6);
    }

    #[test]
    fn the_deployments_sampling_defaults_are_the_snippets() {
        let mut chat = target(Task::TextGeneration);
        chat.temperature = 0.2;
        chat.top_p = 0.5;
        for language in Language::ALL {
            let code = render(&chat, language).unwrap();
            assert!(code.contains("0.2") && code.contains("0.5"), "{language:?}");
        }
    }

    #[test]
    fn payloads_are_literals_of_each_language() {
        let payload = json!({"stream": true, "stop": null, "texts": ["it's", "b"]});
        assert_eq!(
            inline_literal(&payload, Syntax::Python),
            r#"{"texts": ["it's", "b"], "stream": True, "stop": None}"#
        );
        let javascript = inline_literal(&payload, Syntax::JavaScript);
        assert_eq!(
            javascript,
            r#"{"texts": ["it's", "b"], "stream": true, "stop": null}"#
        );
        assert_eq!(
            shell_quote(&javascript),
            r#"'{"texts": ["it'\''s", "b"], "stream": true, "stop": null}'"#
        );
        let long = json!({"texts": ["a long passage of text that does not fit", "another one that is as long"]});
        assert_eq!(
            literal(&long, Syntax::Python, 0),
            "{\n    \"texts\": [\n        \"a long passage of text that does not fit\",\n        \"another one that is as long\",\n    ],\n}"
        );
    }
}
