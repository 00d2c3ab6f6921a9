//! The whole system in local mode, black box: `infergate up` on the YAML files one would
//! `kubectl apply`, the real all-MiniLM-L6-v2 and the tiny fixture models of every other task
//! that exists, called through the proxy by real clients (Python `requests` as the seed document
//! writes it, the `openai` client, curl), with tokens read from the console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::local::LocalMode;
use e2e::objectstore::{MINILM_FILES, ObjectStore};
use e2e::{built, fixture, minilm_dir, node_client, python_client, text_generation_client};
use serde_json::{Value, json};

const READY_LIMIT: Duration = Duration::from_secs(180);

fn infergate() -> PathBuf {
    built("infergate")
}

/// A ModelDeployment served under its name.
fn model(name: &str, task: &str, dir: &str) -> String {
    format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n  task: {task}\n  model: {{uri: 'file://{dir}'}}\n---\n"
    )
}

fn token(name: &str, models: &[&str], extra: &str) -> String {
    format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {{name: {name}}}\nspec:\n  models: [{}]\n{extra}---\n",
        models.join(", ")
    )
}

/// Every task the runtime implements, each under the name of its task.
fn every_task() -> String {
    [
        model("embedding", "embedding", &minilm_dir()),
        model(
            "text-classification",
            "text-classification",
            &fixture("bert-classifier"),
        ),
        model("rerank", "rerank", &fixture("xlm-roberta-reranker")),
        model("tabular", "tabular", &fixture("tabular-mlp")),
        model("text-generation", "text-generation", &fixture("llama")),
        model("translation", "translation", &fixture("marian")),
        model(
            "speech-recognition",
            "speech-recognition",
            &fixture("whisper"),
        ),
        model("text-to-speech", "text-to-speech", &fixture("vits")),
        model(
            "text-to-image",
            "text-to-image",
            &fixture("stable-diffusion"),
        ),
    ]
    .concat()
}

/// A recording for the speech model: the Whisper fixture's clip.
fn recording() -> String {
    format!("{}/clip.wav", fixture("whisper"))
}

const TASKS: [&str; 9] = [
    "embedding",
    "text-classification",
    "rerank",
    "tabular",
    "text-generation",
    "translation",
    "speech-recognition",
    "text-to-speech",
    "text-to-image",
];

async fn post(url: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("the proxy answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// "200", or the status with the body that explains it.
async fn answered(response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    if status == 200 {
        return status.to_string();
    }
    let body = response.text().await.unwrap_or_default();
    format!("{status} {body}")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Whether `infergate snippet` has code of `task` in `language`: OpenAI's API has routes for
/// five tasks, huggingface_hub's InferenceClient calls for all but reranking and tabular.
fn snippet_exists(task: &str, language: &str) -> bool {
    match language {
        "openai-python" | "openai-node" => matches!(
            task,
            "text-generation"
                | "embedding"
                | "speech-recognition"
                | "text-to-speech"
                | "text-to-image"
        ),
        "huggingface" => !matches!(task, "rerank" | "tabular"),
        _ => true,
    }
}

/// Whether a snippet's run shows its task's answer: the text it printed, or the file it wrote.
fn shows_the_answer(task: &str, language: &str, stdout: &str, dir: &Path) -> bool {
    // JSON as printed, pretty or not.
    let compact: String = stdout.split_whitespace().collect();
    let file_starts_with = |name: &str, magic: &[u8]| {
        std::fs::read(dir.join(name)).is_ok_and(|bytes| bytes.starts_with(magic))
    };
    match (task, language) {
        // The raw event stream, to its end.
        ("text-generation", "curl") => stdout.contains("data: [DONE]"),
        ("text-generation" | "speech-recognition", _) => !stdout.trim().is_empty(),
        // Every label, a line each.
        ("text-classification", "huggingface") => stdout.lines().count() == 3,
        ("text-classification", _) => stdout.contains("classification"),
        ("embedding", "openai-python" | "openai-node") => stdout.starts_with("384 dimensions"),
        ("embedding", "huggingface") => stdout.starts_with("shape (1, 384)"),
        ("embedding", _) => compact.starts_with("[["),
        ("rerank", _) => stdout.contains("index"),
        ("translation", "huggingface") => !stdout.trim().is_empty(),
        ("translation", _) => stdout.contains("translation"),
        ("text-to-speech", _) => file_starts_with("speech.wav", b"RIFF"),
        ("text-to-image", _) => file_starts_with("image.png", b"\x89PNG"),
        ("tabular", _) => compact.contains("[["),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_snippet_runs_unmodified_against_its_task() {
    use e2e::snippets::{LANGUAGES, run, workdir};
    use e2e::succeeded;
    let yaml = every_task() + &token("app", &TASKS, "");
    let local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_ready(&TASKS, READY_LIMIT);
    let token = local.token("app");
    let dir = workdir("local");
    let snippet = |task: &str, language: &str| {
        std::process::Command::new(infergate())
            .args(["snippet", task, "--lang", language, "-f"])
            .arg(&local.dir)
            .output()
            .unwrap()
    };

    let mut ran = 0;
    for task in TASKS {
        for language in LANGUAGES {
            let printed = snippet(task, language);
            if !snippet_exists(task, language) {
                assert_eq!(printed.status.code(), Some(1), "{task} in {language}");
                let stderr = String::from_utf8_lossy(&printed.stderr);
                assert!(
                    stderr.contains(&format!("no {language} snippet for task {task}")),
                    "{stderr}"
                );
                continue;
            }
            let code = succeeded(&format!("snippet {task} --lang {language}"), &printed);
            // The proxy of `infergate up`, found in its state directory; the token nowhere.
            assert!(
                code.contains(&format!("{}/models/{task}/proxy", local.url)),
                "{code}"
            );
            assert!(!code.contains(&token));
            for written in ["speech.wav", "image.png"] {
                let _ = std::fs::remove_file(dir.join(written));
            }
            let what = format!("the {language} snippet of {task}");
            let stdout = succeeded(&what, &run(language, &code, &token, &dir));
            assert!(
                shows_the_answer(task, language, &stdout, &dir),
                "{what} printed:\n{stdout}"
            );
            ran += 1;
        }
    }
    assert_eq!(
        ran, 44,
        "every task in python, curl and javascript, and the rest where they exist"
    );

    // What those runs used, per token and model, in each task's unit, as the proxy counts it.
    let page = reqwest::get(&local.metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str, model: &str, label: &str| -> f64 {
        page.lines()
            .filter(|l| l.starts_with(&format!("infergate_proxy_token_{name}{{")))
            .filter(|l| l.contains(&format!("model=\"{model}\"")) && l.contains(label))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let requests = |model: &str| metric("requests_total", model, "class=\"2xx\"");
    let used = |model: &str, unit: &str| metric("usage_total", model, &format!("unit=\"{unit}\""));
    // Speech and tabular snippets in python, curl and javascript read a schema first.
    for (model, answered) in [
        ("text-generation", 6.0),
        ("text-classification", 4.0),
        ("embedding", 6.0),
        ("rerank", 3.0),
        ("translation", 4.0),
        ("speech-recognition", 6.0),
        ("text-to-speech", 9.0),
        ("text-to-image", 6.0),
        ("tabular", 6.0),
    ] {
        assert_eq!(requests(model), answered, "{model}:\n{page}");
    }
    for (model, inputs) in [
        ("text-classification", 4.0),
        ("embedding", 6.0),
        ("rerank", 6.0),
        ("translation", 4.0),
        ("tabular", 3.0),
    ] {
        assert_eq!(used(model, "inputs"), inputs, "{model}");
    }
    assert_eq!(used("speech-recognition", "audio_seconds_in"), 6.0 * 2.5);
    assert!(used("text-to-speech", "audio_seconds_out") > 0.0);
    assert_eq!(used("text-to-image", "images"), 6.0);
    // 20 steps where the snippet asks, 50 (the default) from OpenAI's clients.
    assert_eq!(used("text-to-image", "steps"), 4.0 * 20.0 + 2.0 * 50.0);
    assert!(used("text-generation", "prompt_tokens") > 6.0);
    let completion = used("text-generation", "completion_tokens");
    assert!((6.0..=6.0 * 200.0).contains(&completion), "{completion}");
    assert!(!page.contains(&token), "no token in the metrics");

    // Python is the default; an unknown model is named.
    let default = snippet("embedding", "python");
    let python = std::process::Command::new(infergate())
        .args(["snippet", "embedding", "-f"])
        .arg(&local.dir)
        .output()
        .unwrap();
    assert_eq!(python.stdout, default.stdout);
    let unknown = std::process::Command::new(infergate())
        .args(["snippet", "nothing", "-f"])
        .arg(&local.dir)
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no ModelDeployment nothing"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_answers_real_clients_through_local_mode() {
    let yaml = every_task() + &token("app", &TASKS, "");
    let local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_ready(&TASKS, READY_LIMIT);
    let token = local.token("app");

    // The seed document's section 5 examples as its snippets write them (Python `requests`,
    // their own payloads and headers), each on the model of its task; its 7.1 call (a `Bearer:`
    // header); and a tabular row.
    let models: serde_json::Map<String, Value> =
        TASKS.iter().map(|t| (t.to_string(), json!(t))).collect();
    let seed = python_client(
        "seed_requests.py",
        &[
            &json!({"url": local.url, "token": token, "models": models, "recording": recording()})
                .to_string(),
        ],
    );
    let examples = [
        "5.1.2",
        "5.1.3",
        "5.2-vllm",
        "5.2-tgi",
        "5.3",
        "5.3-curl",
        "5.4",
        "5.5",
        "5.6",
        "5.7",
        "5.8-embed",
        "5.8-rerank",
        "5.8-predict",
        "7.1",
        "tabular",
    ];
    assert_eq!(seed.as_object().unwrap().len(), examples.len(), "{seed}");
    for example in examples {
        assert_eq!(seed[example]["status"], 200, "{example}: {}", seed[example]);
    }
    // 5.1.2 (the TGI-style body, greedy, 200 new tokens) and 5.2's two chats (a model id from
    // GET /v1/models, sampled, up to 1000 tokens): SSE whose every line but the final
    // `[DONE]` is a JSON chunk, the seed's loop printing choices[0].delta.content.
    for (example, max_tokens) in [("5.1.2", 200), ("5.2-vllm", 1000), ("5.2-tgi", 1000)] {
        let stream = &seed[example]["body"];
        assert_eq!(
            stream["content_type"], "text/event-stream",
            "{example}: {stream}"
        );
        assert_eq!(stream["malformed"], json!([]), "{example}: {stream}");
        assert_eq!(stream["last"], "data: [DONE]", "{example}: {stream}");
        let chunks = stream["content_chunks"].as_u64().unwrap();
        // The opening chunk (role and empty content), at most one per token, and the last
        // (the finish reason, empty content).
        assert!(
            (2..=max_tokens + 2).contains(&chunks),
            "{example}: {stream}"
        );
        assert!(
            matches!(stream["finish_reason"].as_str(), Some("stop" | "length")),
            "{example}: {stream}"
        );
    }
    // Greedy, so the same every run: the model does not end this text within its 200 tokens,
    // one chunk each.
    assert_eq!(seed["5.1.2"]["body"]["finish_reason"], "length");
    assert_eq!(seed["5.1.2"]["body"]["content_chunks"], 202);
    assert!(
        !seed["5.1.2"]["body"]["printed"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{}",
        seed["5.1.2"]
    );
    for example in ["5.2-vllm", "5.2-tgi"] {
        assert_eq!(seed[example]["body"]["model"], "text-generation");
    }
    // 5.1.3: the request's Jinja template renders the chat (the empty assistant message last,
    // so no "Assistant:" cue), and the whole answer is a chat completion of that prompt.
    // The prompt is what transformers renders from it (Jinja with trim_blocks and
    // lstrip_blocks), the template's indentation included.
    let templated = &seed["5.1.3"]["body"];
    assert_eq!(
        templated["templated_text"],
        "\n\n                Be friendly\n            \n\nuser: What's the capital of UAE?\n\n            \n\nassistant: \n\n    ",
        "{templated}"
    );
    let completion = &templated["completion"];
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert!(completion["choices"][0]["message"]["content"].is_string());
    assert!(completion["system_fingerprint"].is_string(), "{completion}");
    assert_eq!(
        completion["usage"]["prompt_tokens"], templated["templated_tokens"],
        "{templated}"
    );
    // 5.3: every label with its score, best first; its curl line and 7.1's `Bearer:` header
    // get the same answer.
    let labels = seed["5.3"]["body"]["classification"].as_array().unwrap();
    assert_eq!(labels.len(), 3, "every label: {labels:?}");
    let scores: Vec<f64> = labels
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert!(scores.is_sorted_by(|a, b| a >= b), "{labels:?}");
    assert!(
        (scores.iter().sum::<f64>() - 1.0).abs() < 1e-4,
        "{labels:?}"
    );
    assert!(labels.iter().all(|l| l["label"].is_string()));
    assert_eq!(seed["5.3-curl"]["body"], seed["5.3"]["body"]);
    assert_eq!(seed["7.1"]["body"], seed["5.3"]["body"]);
    // 5.4: "file_name.mp3" typed audio/wav, whatever the file is, transcribed.
    let transcript = seed["5.4"]["body"]["text"].as_str().unwrap();
    assert!(!transcript.trim().is_empty(), "{}", seed["5.4"]);
    // 5.5: the schema, then the seed's body: base64 WAV at the rate it names.
    let speech = &seed["5.5"]["body"];
    assert_eq!(speech["schema_status"], 200, "{speech}");
    let fields: Vec<&str> = speech["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"text") && fields.contains(&"description"),
        "{fields:?}"
    );
    assert_eq!(speech["riff"], true, "{speech}");
    assert_eq!(speech["sampling_rate"], 16000, "{speech}");
    assert_eq!(speech["header_rate"], speech["sampling_rate"]);
    assert!(speech["samples"].as_u64() > Some(0), "{speech}");
    // 5.6: high_noise_frac 8 accepted; a PNG of the model's size.
    let image = &seed["5.6"]["body"];
    assert_eq!(image["keys"], json!(["image"]), "{image}");
    assert_eq!(image["png"], true, "{image}");
    assert_eq!(image["size"], json!([64, 64]), "{image}");
    // 5.7
    let translation = seed["5.7"]["body"]["translation"].as_str().unwrap();
    assert!(!translation.is_empty(), "{}", seed["5.7"]);
    // 5.8: one 384-dimensional embedding in a list; both passages ranked, best first; and
    // /predict's labels, best first.
    let embedding = seed["5.8-embed"]["body"].as_array().unwrap();
    assert_eq!(embedding.len(), 1);
    let vector = embedding[0].as_array().unwrap();
    assert_eq!(vector.len(), 384);
    assert!(
        vector
            .iter()
            .all(|x| x.as_f64().is_some_and(f64::is_finite))
    );
    let ranks = seed["5.8-rerank"]["body"].as_array().unwrap();
    let mut indices: Vec<u64> = ranks.iter().map(|r| r["index"].as_u64().unwrap()).collect();
    let rank_scores: Vec<f64> = ranks.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(rank_scores.is_sorted_by(|a, b| a >= b), "{ranks:?}");
    indices.sort_unstable();
    assert_eq!(indices, [0, 1], "{ranks:?}");
    let predicted = seed["5.8-predict"]["body"].as_array().unwrap();
    assert_eq!(predicted.len(), 3, "{predicted:?}");
    let predicted_scores: Vec<f64> = predicted
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert!(
        predicted_scores.is_sorted_by(|a, b| a >= b),
        "{predicted:?}"
    );
    assert_eq!(seed["tabular"]["body"]["data"].as_array().unwrap().len(), 1);

    // The openai client, unmodified: a streamed chat and base64 embeddings.
    let openai = python_client(
        "openai_client.py",
        &[
            &local.url,
            &token,
            "text-generation",
            "embedding",
            "speech-recognition",
            &recording(),
            "text-to-speech",
            "text-to-image",
        ],
    );
    assert!(
        openai["chat"]["chunks"].as_u64() >= Some(2),
        "{}",
        openai["chat"]
    );
    assert_eq!(openai["embeddings"]["count"], 2);
    assert!(
        openai["embeddings"]["float_vs_base64_max_diff"].as_f64() < Some(1e-7),
        "{}",
        openai["embeddings"]
    );
    assert_eq!(
        openai["chat_whole"]["completion_tokens"], 8,
        "{}",
        openai["chat_whole"]
    );
    assert_eq!(openai["chat_whole"]["finish_reason"], "length");
    assert_eq!(
        openai["completion"]["completion_tokens"], 8,
        "{}",
        openai["completion"]
    );
    assert_eq!(
        openai["models"],
        json!(["text-generation"]),
        "{}",
        openai["models"]
    );
    assert_eq!(openai["embeddings"]["dims"], 384);
    let norm = openai["embeddings"]["norm"].as_f64().unwrap();
    assert!((norm - 1.0).abs() < 1e-4, "normalized embeddings: {norm}");
    let transcription = &openai["transcription"];
    assert!(transcription["text"].is_string(), "{transcription}");
    assert_eq!(
        transcription["plain"].as_str().map(str::trim_end),
        transcription["text"].as_str()
    );
    assert_eq!(transcription["duration"], 2.5);
    assert_eq!(transcription["language"], "english");
    assert!(transcription["segments"].as_u64() >= Some(1));
    assert_eq!(openai["speech"]["riff"], true, "{}", openai["speech"]);
    assert_eq!(openai["image"]["png"], true, "{}", openai["image"]);

    // huggingface_hub's InferenceClient with the proxy's endpoint root as its model URL.
    let models_json = json!(models).to_string();
    let hf = python_client(
        "hf_client.py",
        &[&local.url, &token, &models_json, &recording()],
    );
    assert_eq!(hf["feature_extraction"], json!([1, 384]), "{hf}");
    let similarity = hf["sentence_similarity"].as_array().unwrap();
    assert!(
        similarity[0].as_f64() > similarity[1].as_f64(),
        "bread is closer to food than a baby: {similarity:?}"
    );
    assert_eq!(hf["health_check"], true);
    assert_eq!(hf["text_classification"].as_array().unwrap().len(), 3);
    assert!(hf["translation"].is_string());
    assert_eq!(
        hf["automatic_speech_recognition"], seed["5.4"]["body"]["text"],
        "{hf}"
    );
    assert_eq!(hf["text_to_speech"], "RIFF", "{hf}");
    assert_eq!(hf["text_to_image"], json!([32, 40]), "{hf}");
    assert!(hf["text_generation"].as_array().unwrap().len() >= 2, "{hf}");
    assert!(
        !hf["chat_completion"].as_array().unwrap().is_empty(),
        "{hf}"
    );

    // The npm clients: openai 6 and @huggingface/inference 4 (retry_on_error off).
    let js = node_client(
        "js_client.mjs",
        &[&local.url, &token, &models_json, &recording()],
    );
    assert_eq!(js["embeddings"]["dims"], 384, "{js}");
    let norm = js["embeddings"]["norm"].as_f64().unwrap();
    assert!((norm - 1.0).abs() < 1e-4, "decoded from base64: {norm}");
    assert!(js["chat"]["chunks"].as_u64() >= Some(1), "{js}");
    assert_eq!(js["feature_extraction"], json!([1, 384]), "{js}");
    assert_eq!(js["text_classification"], 3, "{js}");
    assert!(js["translation"].is_string(), "{js}");
    assert!(js["text_generation"].is_string(), "{js}");
    assert!(js["text_generation_stream"].as_u64() >= Some(2), "{js}");
    assert!(js["chat_completion_stream"].as_u64() >= Some(1), "{js}");
    assert_eq!(
        js["automatic_speech_recognition"],
        seed["5.4"]["body"]["text"]
    );
    assert_eq!(js["text_to_image"]["type"], "image/png", "{js}");
    assert_eq!(js["text_to_speech"]["type"], "audio/wav", "{js}");

    // TGI's own Python client.
    let tgi = text_generation_client(&[&local.url, &token, "text-generation"]);
    assert_eq!(tgi["generated_tokens"], 8, "{tgi}");
    assert_eq!(tgi["stream_tokens"], 8, "{tgi}");
    assert_eq!(tgi["stream_final"], tgi["generated_text"], "{tgi}");

    // curl, as the console's sample line shows it.
    let curl = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/models/embedding/proxy/v1/embed", local.url))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/json"])
        .args(["-d", r#"{"inputs": "curl works too"}"#])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");

    // Every sample line the console printed with the token works as printed.
    let samples: Vec<String> = local
        .console()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("curl ").map(str::to_owned))
        .collect();
    assert_eq!(samples.len(), TASKS.len(), "{}", local.console());
    // The speech sample uploads ./recording.wav.
    let samples_dir = local.dir.with_extension("samples");
    std::fs::create_dir_all(&samples_dir).unwrap();
    std::fs::copy(recording(), samples_dir.join("recording.wav")).unwrap();
    for sample in samples {
        let answered = std::process::Command::new("bash")
            .current_dir(&samples_dir)
            .arg("-c")
            .arg(format!("curl {sample} -o /dev/null -w '%{{http_code}}'"))
            .output()
            .expect("bash");
        assert_eq!(String::from_utf8_lossy(&answered.stdout), "200", "{sample}");
    }

    // Ten concurrent clients per model, three requests each: every one answered 200 at once. A
    // runtime refuses (429) only what it cannot serve in time, and these tiny models serve ten
    // at once in milliseconds (speech recognition aside, below).
    let bodies = [
        ("embedding", "/v1/embed", json!({"inputs": "concurrent"})),
        (
            "text-classification",
            "/v1/classify",
            json!({"inputs": "concurrent"}),
        ),
        (
            "rerank",
            "/v1/rerank",
            json!({"query": "q", "texts": ["a", "b"]}),
        ),
        ("tabular", "/v1/predict", json!([[0.1, 0.2, 0.3, 0.4]])),
        (
            "text-generation",
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 8}),
        ),
        ("translation", "/v1/translate", json!({"text": "Hello"})),
    ];
    // Speech recognition gets three: a debug-built Whisper pass takes seconds on two shared
    // cores, so ten clients queue for minutes and admission rightly refuses (429) what it
    // predicts cannot finish in time (seen in CI under load).
    let speech_clients: Vec<_> = (0..3)
        .map(|_| {
            let url = format!("{}/models/speech-recognition/proxy/", local.url);
            let auth = bearer(&token);
            tokio::spawn(async move {
                let audio = std::fs::read(recording()).unwrap();
                let request = || {
                    reqwest::Client::new()
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("content-type", "audio/wav")
                        .body(audio.clone())
                };
                let mut statuses = Vec::new();
                for _ in 0..3 {
                    let response = request().send().await.expect("the proxy answers");
                    statuses.push(answered(response).await);
                }
                (url, statuses)
            })
        })
        .collect();
    let auth = bearer(&token);
    let mut clients = Vec::new();
    for (model, path, body) in &bodies {
        for _ in 0..10 {
            let url = format!("{}/models/{model}/proxy{path}", local.url);
            let (body, auth) = (body.to_string(), auth.clone());
            clients.push(tokio::spawn(async move {
                let request = || {
                    reqwest::Client::new()
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("content-type", "application/json")
                        .body(body.clone())
                };
                let mut statuses = Vec::new();
                for _ in 0..3 {
                    let response = request().send().await.expect("the proxy answers");
                    statuses.push(answered(response).await);
                }
                (url, statuses)
            }));
        }
    }
    for client in clients.into_iter().chain(speech_clients) {
        let (url, statuses) = client.await.unwrap();
        assert_eq!(statuses, ["200", "200", "200"], "{url}");
    }
    assert!(
        !local.console().contains("exited"),
        "no runtime died:\n{}",
        local.console()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_and_deadline_failure_has_its_status_and_code() {
    let yaml = [
        // Autoscaling is for clusters: local mode says so and serves the model all the same.
        model("embedding", "embedding", &minilm_dir()).replace(
            "---\n",
            "  autoscaling: {minReplicas: 0, maxReplicas: 3, inFlightPerReplica: 4}\n---\n",
        ),
        model("chat", "text-generation", &fixture("llama"))
            .replace("---\n", "  generation: {maxNewTokens: 7}\n---\n"),
        token("app", &["embedding", "chat"], ""),
        token("scoped", &["chat"], ""),
        token(
            "expired",
            &["embedding"],
            "  expiresAt: '2020-01-01T00:00:00Z'\n",
        ),
        token("revoked", &["embedding"], "  revoked: true\n"),
    ]
    .concat();
    let local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_ready(&["embedding", "chat"], READY_LIMIT);
    assert!(
        local.console().contains(
            "embedding: autoscaling is a cluster feature; local mode runs one runtime for embedding"
        ),
        "{}",
        local.console()
    );
    let embed = format!("{}/models/embedding/proxy/v1/embed", local.url);
    let body = json!({"inputs": "hello"});
    let code = |answer: &(u16, Value)| {
        (
            answer.0,
            answer.1["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };
    let app = bearer(&local.token("app"));
    type Headers = Vec<(&'static str, String)>;
    let cases: Vec<(Headers, u16, &str)> = vec![
        (vec![], 401, "missing_token"),
        (
            vec![("Authorization", bearer("igt_not_a_token"))],
            401,
            "invalid_token",
        ),
        (
            vec![("Authorization", bearer(&local.token("expired")))],
            401,
            "token_expired",
        ),
        (
            vec![("Authorization", bearer(&local.token("revoked")))],
            401,
            "token_revoked",
        ),
        (
            vec![("Authorization", bearer(&local.token("scoped")))],
            403,
            "model_not_allowed",
        ),
        (
            vec![
                ("Authorization", app.clone()),
                ("OICM-Request-Timeout", "soon".to_owned()),
            ],
            400,
            "invalid_timeout",
        ),
    ];
    for (headers, status, expected) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = post(&embed, &headers, &body).await;
        assert_eq!(code(&answer), (status, expected.to_owned()), "{headers:?}");
    }
    // Scope is checked before existence (the contract's order): a model id the token does not
    // name is 403 whether or not it exists, so a token cannot probe for model ids.
    let unknown = post(
        &format!("{}/models/nope/proxy/v1/embed", local.url),
        &[("Authorization", &app)],
        &body,
    )
    .await;
    assert_eq!(code(&unknown), (403, "model_not_allowed".to_owned()));

    // The model's generation defaults reach its runtime.
    let completions = format!("{}/models/chat/proxy/v1/completions", local.url);
    let defaulted = post(
        &format!("{}/models/chat/proxy/v1/chat/completions", local.url),
        &[("Authorization", &app)],
        &json!({"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": true}),
    )
    .await;
    assert_eq!(defaulted.0, 200, "{}", defaulted.1);
    assert_eq!(
        defaulted.1["usage"]["completion_tokens"], 7,
        "{}",
        defaulted.1
    );

    // A generation far longer than its deadline: 504 at the deadline, not when it would end.
    let long = json!({"prompt": "Once", "max_tokens": 4000, "ignore_eos": true});
    let started = Instant::now();
    let late = post(
        &completions,
        &[("Authorization", &app), ("OICM-Request-Timeout", "0.5")],
        &long,
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(code(&late), (504, "timeout".to_owned()));
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // SSE arrives as it is produced: the first event long before the last.
    let stream = json!({"prompt": "Once", "max_tokens": 300, "ignore_eos": true, "stream": true});
    let mut response = reqwest::Client::new()
        .post(&completions)
        .header("Authorization", &app)
        .header("content-type", "application/json")
        .body(stream.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-accel-buffering")
            .map(|v| v.as_bytes()),
        Some(&b"no"[..])
    );
    let started = Instant::now();
    let (mut first, mut text) = (None, String::new());
    while let Some(chunk) = response.chunk().await.unwrap() {
        first.get_or_insert_with(|| started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (first, total) = (first.unwrap(), started.elapsed());
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.matches("data: ").count() > 100);
    assert!(
        first * 4 < total,
        "the first event came at {first:?} of a {total:?} stream"
    );

    // No token reached a log of the proxy or a runtime, whatever was refused.
    let logs = local.dir.join(".infergate/logs");
    for entry in std::fs::read_dir(&logs).unwrap() {
        let path = entry.unwrap().path();
        let log = std::fs::read_to_string(&path).unwrap();
        for name in ["app", "scoped", "expired", "revoked"] {
            assert!(
                !log.contains(&local.token(name)),
                "{} holds the token of {name}",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_to_the_files_apply_while_it_runs() {
    let base = model("embedding", "embedding", &minilm_dir());
    let tokens = |extra_for_app: &str, scope: &[&str], brief_expiry: &str| {
        token("app", scope, extra_for_app)
            + &token(
                "brief",
                &["embedding"],
                &format!("  expiresAt: '{brief_expiry}'\n"),
            )
    };
    let far = "2099-01-01T00:00:00Z";
    let local = LocalMode::start(
        &infergate(),
        &[
            ("models.yaml", &base),
            ("tokens.yaml", &tokens("", &["embedding"], far)),
        ],
    );
    local.wait_ready(&["embedding"], READY_LIMIT);
    let (app, brief) = (bearer(&local.token("app")), bearer(&local.token("brief")));
    let call = |model: &str, auth: &str| {
        let url = format!("{}/models/{model}/proxy/v1/embed", local.url);
        let auth = auth.to_owned();
        async move {
            let answer = post(&url, &[("Authorization", &auth)], &json!({"inputs": "x"})).await;
            (
                answer.0,
                answer.1["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    assert_eq!(call("embedding", &app).await.0, 200);

    // A new model, and the token's scope grown to it, in one edit.
    local.write(
        "models.yaml",
        &(base.clone() + &model("bert", "embedding", &fixture("bert-mean"))),
    );
    local.write("tokens.yaml", &tokens("", &["embedding", "bert"], far));
    local.wait_for("bert: ready", 1, READY_LIMIT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while call("bert", &app).await.0 != 200 {
        assert!(Instant::now() < deadline, "the new model is not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken edit is reported and the last valid files keep serving.
    local.write(
        "models.yaml",
        &base.replace("task: embedding", "task: nonsense"),
    );
    // The problem goes to stderr and the verdict to stdout: two pipes, so no order between them.
    for line in [
        "models.yaml (document 1): spec.task",
        "still serving the last valid ones",
    ] {
        local.wait_for(line, 1, Duration::from_secs(5));
    }
    assert_eq!(call("bert", &app).await.0, 200);

    // An expiry moved to two seconds from now takes effect then.
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    local.write(
        "models.yaml",
        &(base.clone() + &model("bert", "embedding", &fixture("bert-mean"))),
    );
    local.write(
        "tokens.yaml",
        &tokens("", &["embedding", "bert"], &soon.to_string()),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(call("embedding", &brief).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        call("embedding", &brief).await,
        (401, "token_expired".to_owned())
    );

    // Revocation by editing the file: refused within a second.
    local.write(
        "tokens.yaml",
        &tokens("  revoked: true\n", &["embedding", "bert"], far),
    );
    let edited = Instant::now();
    while call("embedding", &app).await != (401, "token_revoked".to_owned()) {
        assert!(
            edited.elapsed() < Duration::from_secs(1),
            "still accepted {:?} after the edit",
            edited.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !local.console().contains("exited"),
        "no runtime restarted:\n{}",
        local.console()
    );
}

/// `infergate token ARGS -f DIR`: its standard output, which must be a success's.
fn local_token(local: &LocalMode, args: &[&str]) -> String {
    let output = std::process::Command::new(infergate())
        .arg("token")
        .args(args)
        .arg("-f")
        .arg(&local.dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "token {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Predicts the tabular model's one row with `token`: the status and error code.
async fn predict(local: &LocalMode, token: &str) -> (u16, String) {
    let (status, body) = post(
        &format!("{}/models/tabular/proxy/v1/predict", local.url),
        &[("authorization", &bearer(token))],
        &json!([[0.0, 0.0, 0.0, 0.0]]),
    )
    .await;
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

/// Predicts until the answer is `want`: `infergate up` applies file edits within its poll.
async fn predict_until(local: &LocalMode, token: &str, want: (u16, &str)) {
    let started = Instant::now();
    loop {
        let (status, code) = predict(local, token).await;
        if (status, code.as_str()) == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {status} {code:?}, not {want:?}:\n{}",
            local.console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_commands_edit_local_modes_files_and_it_applies_them() {
    // A person's own token file, with comments the commands must keep.
    let own = "# tokens of the team\n".to_owned()
        + &token("team", &["tabular"], "  # until further notice\n");
    let local = LocalMode::start(
        &infergate(),
        &[
            (
                "models.yaml",
                &model("tabular", "tabular", &fixture("tabular-mlp")),
            ),
            ("team.yaml", &own),
        ],
    );
    local.wait_ready(&["tabular"], READY_LIMIT);
    let team = local.token("team");

    // Create: shown once, only its digest written, served as soon as the command returns.
    let created: Value = serde_json::from_str(&local_token(
        &local,
        &[
            "create", "app", "--models", "tabular", "--ttl", "30d", "-o", "json",
        ],
    ))
    .unwrap();
    let app = created["token"].as_str().unwrap().to_owned();
    let file = std::fs::read_to_string(local.dir.join("accesstoken-app.yaml")).unwrap();
    assert!(file.contains("tokenHash: sha256:"), "{file}");
    for entry in std::fs::read_dir(&local.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert!(
                !std::fs::read_to_string(&path).unwrap().contains(&app),
                "{}",
                path.display()
            );
        }
    }
    predict_until(&local, &app, (200, "")).await;

    let listed = local_token(&local, &["list"]);
    let row = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{listed}"))
            .to_owned()
    };
    assert!(listed.starts_with("NAME"), "{listed}");
    assert!(
        row("app").contains("Active") && row("app").contains("tabular"),
        "{listed}"
    );
    assert!(
        row("team").contains("Active") && row("team").contains("igt_"),
        "{listed}"
    );
    assert!(!listed.contains(&app) && !listed.contains(&team));

    // Rotate: both work during the grace, then only the successor.
    let rotated = local_token(&local, &["rotate", "app", "--grace", "4s", "-o", "env"]);
    let value = |key: &str| {
        rotated
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_owned()
    };
    let (successor, successor_name) = (value("INFERGATE_TOKEN"), value("INFERGATE_TOKEN_NAME"));
    assert!(successor_name.starts_with("app-"), "{successor_name}");
    let rotated_at = Instant::now();
    predict_until(&local, &successor, (200, "")).await;
    assert_eq!(
        predict(&local, &app).await,
        (200, String::new()),
        "during the grace"
    );
    tokio::time::sleep(
        Duration::from_secs(4).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    predict_until(&local, &app, (401, "token_expired")).await;
    assert_eq!(predict(&local, &successor).await, (200, String::new()));

    // Revoke, in the person's own file: refused, and the file keeps its comments.
    let said = local_token(&local, &["revoke", "team"]);
    assert!(said.contains("team.yaml"), "{said}");
    predict_until(&local, &team, (401, "token_revoked")).await;
    let edited = std::fs::read_to_string(local.dir.join("team.yaml")).unwrap();
    assert!(
        edited.contains("# tokens of the team") && edited.contains("# until further notice"),
        "{edited}"
    );
    assert!(edited.contains("revoked: true"), "{edited}");

    // Limits: 6 a minute, a burst of 1.
    let limited: Value = serde_json::from_str(&local_token(
        &local,
        &[
            "create",
            "limited",
            "--models",
            "tabular",
            "--requests-per-minute",
            "6",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    let limited = limited["token"].as_str().unwrap().to_owned();
    predict_until(&local, &limited, (200, "")).await;
    assert_eq!(
        predict(&local, &limited).await,
        (429, "requests_per_minute_exceeded".to_owned())
    );
    // What each token was used for, from the running proxy: the limited one's 2 requests,
    // one refused, and the row it predicted.
    let listed = local_token(&local, &["list"]);
    let limited_row = listed.lines().find(|l| l.starts_with("limited ")).unwrap();
    assert!(limited_row.contains("6 rpm"), "{listed}");
    assert!(limited_row.contains("2 (1 4xx)"), "{listed}");
    assert!(limited_row.contains("inputs 1"), "{listed}");

    // A name the files hold already is refused, and nothing is written.
    let again = std::process::Command::new(infergate())
        .args(["token", "create", "app", "--models", "tabular", "-f"])
        .arg(&local.dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

/// Child processes of `pid`, by their command line.
fn children(pid: u32) -> Vec<(u32, String)> {
    let listed = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(|child: u32| {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            (child, String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_dies_is_restarted_and_sigterm_stops_everything() {
    let yaml = model("embedding", "embedding", &minilm_dir()) + &token("app", &["embedding"], "");
    let mut local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_ready(&["embedding"], READY_LIMIT);
    let app = bearer(&local.token("app"));
    let embed = format!("{}/models/embedding/proxy/v1/embed", local.url);
    let processes = children(local.pid());
    let runtime = processes
        .iter()
        .find(|(_, cmd)| cmd.contains("infergate-runtime"))
        .unwrap_or_else(|| panic!("no runtime among {processes:?}"))
        .0;
    assert!(
        processes
            .iter()
            .any(|(_, cmd)| cmd.contains("infergate-proxy"))
    );

    std::process::Command::new("kill")
        .args(["-KILL", &runtime.to_string()])
        .status()
        .unwrap();
    local.wait_for("embedding: exited", 1, Duration::from_secs(5));
    local.wait_for("embedding: ready", 2, READY_LIMIT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while post(&embed, &[("Authorization", &app)], &json!({"inputs": "x"}))
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the restarted runtime is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let survivors = children(local.pid());
    let status = local.stop(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "infergate up did not exit cleanly: {status:?}"
    );
    for (pid, cmd) in survivors {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{cmd} outlived infergate up"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_cannot_start_is_reported_once_with_a_fix_and_not_restarted() {
    let empty = std::env::temp_dir().join(format!("infergate-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let yaml = model("embedding", "embedding", &minilm_dir())
        + &model("broken", "embedding", &empty.display().to_string())
        + &token("app", &["embedding", "broken"], "");
    let local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_for("broken: cannot start", 1, READY_LIMIT);
    // The other model is served all the same.
    local.wait_ready(&["embedding"], READY_LIMIT);
    // The old supervisor restarted it after 1 s, 2 s, 4 s...: a few seconds show any loop.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let console = local.console();
    assert_eq!(
        console.matches("broken: cannot start").count(),
        1,
        "reported once:\n{console}"
    );
    assert!(console.contains("fix: "), "with a fix:\n{console}");
    assert!(
        !console.contains("broken: exited") && !console.contains("broken: restarting"),
        "not restarted:\n{console}"
    );
    let _ = std::fs::remove_dir_all(&empty);
}

/// The runtime's address as local mode routes to it (the proxy's file source).
fn runtime_endpoint(local: &LocalMode, model: &str) -> String {
    let config = std::fs::read_to_string(local.dir.join(".infergate/proxy.yaml")).unwrap();
    let config: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
    config["models"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_str() == Some(model))
        .and_then(|m| m["endpoints"][0].as_str())
        .unwrap_or_else(|| panic!("no endpoint for {model}"))
        .to_owned()
}

/// How many signing keys local mode holds now.
fn signing_keys(local: &LocalMode) -> usize {
    let keys = std::fs::read(local.dir.join(".infergate/internal-keys/signing.json")).unwrap();
    serde_json::from_slice::<Value>(&keys).unwrap()["keys"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_answers_only_what_the_proxy_signed_and_a_key_rotation_loses_no_request() {
    let yaml = model("minilm", "embedding", &minilm_dir()) + &token("app", &["minilm"], "");
    let local = LocalMode::start(&infergate(), &[("models.yaml", &yaml)]);
    local.wait_ready(&["minilm"], READY_LIMIT);
    let token = bearer(&local.token("app"));
    let body = json!({"inputs": "the side door is shut"});

    // Straight to the runtime's port, as any local process could: refused before any work,
    // with or without the client's own token.
    let direct = format!("http://{}/embed", runtime_endpoint(&local, "minilm"));
    let (status, refused) = post(&direct, &[], &body).await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["error"]["code"], "internal_token_missing");
    let (status, refused) = post(&direct, &[("authorization", &token)], &body).await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["error"]["code"], "internal_token_invalid");
    let through = format!("{}/models/minilm/proxy/embed", local.url);
    assert_eq!(
        post(&through, &[("authorization", &token)], &body).await.0,
        200
    );
    // With the proxy's key, as only a process that can read the private file could: refused
    // for another model or once expired, answered for this one.
    let keys = std::fs::read(local.dir.join(".infergate/internal-keys/signing.json")).unwrap();
    let for_minilm = e2e::proxy_signed(&keys, "minilm", Duration::ZERO);
    let refusals = [
        (
            e2e::proxy_signed(&keys, "another-model", Duration::ZERO),
            "internal_token_wrong_model",
        ),
        (
            e2e::proxy_signed(&keys, "minilm", Duration::from_secs(30)),
            "internal_token_expired",
        ),
    ];
    for (jwt, code) in &refusals {
        let (status, refused) = post(&direct, &[("authorization", jwt)], &body).await;
        assert_eq!(status, 401, "{refused}");
        assert_eq!(refused["error"]["code"], *code);
    }
    let (status, embedded) = post(&direct, &[("authorization", &for_minilm)], &body).await;
    assert_eq!(status, 200, "{embedded}");

    // Requests keep flowing while the key is replaced: before the new key signs, when it
    // starts to, and when the old one is retired.
    let traffic = {
        let (through, token, body) = (through.clone(), token.clone(), body.clone());
        e2e::Traffic::start(3, move || {
            let (through, token, body) = (through.clone(), token.clone(), body.clone());
            async move { post(&through, &[("authorization", &token)], &body).await.0 }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rotated = std::process::Command::new(infergate())
        .args(["rotate-keys", "-f"])
        .arg(&local.dir)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    local.wait_for("internal signing key rotated", 1, Duration::from_secs(5));
    assert_eq!(
        signing_keys(&local),
        2,
        "both keys verify during the overlap"
    );
    let retired = Instant::now() + Duration::from_secs(60);
    while signing_keys(&local) > 1 {
        assert!(Instant::now() < retired, "the old key was never retired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let statuses = traffic.stop().await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let answered = statuses.len();
    assert!(answered > 30, "{answered} requests across the rotation");
    let console = local.console();
    for bearer in refusals.iter().map(|(jwt, _)| jwt).chain([&for_minilm]) {
        let jwt = bearer.strip_prefix("Bearer ").unwrap();
        let leaks = e2e::canary::jwt_leaks(jwt, &console);
        assert!(leaks.is_empty(), "a JWT leaked into the logs: {leaks:?}");
    }
}

/// A model in an S3 bucket, served by local mode as a cluster would: fetched (keys from the
/// state directory's copy of the Secret) into the state directory, then served; the download's
/// outcome line is on the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_an_s3_bucket_is_fetched_then_served() {
    let scratch = std::env::temp_dir().join(format!("infergate-local-s3-{}", std::process::id()));
    let store = ObjectStore::start(&scratch, "127.0.0.1", "local-access", "local-secret");
    store.put_model("models", "minilm", Path::new(&minilm_dir()), &MINILM_FILES);
    let yaml = format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: minilm-s3}}\nspec:\n  task: embedding\n  model:\n    uri: s3://models/minilm\n    endpoint: {}\n    pathStyle: true\n    credentialsSecret: store-keys\n---\n",
        store.endpoint
    ) + &token("app", &["minilm-s3"], "");
    let local = LocalMode::start(
        &infergate(),
        &[
            ("models.yaml", &yaml),
            (
                ".infergate/secrets/store-keys/AWS_ACCESS_KEY_ID",
                "local-access",
            ),
            (
                ".infergate/secrets/store-keys/AWS_SECRET_ACCESS_KEY",
                "local-secret",
            ),
        ],
    );
    local.wait_ready(&["minilm-s3"], READY_LIMIT);
    let console = local.console();
    assert!(
        console.contains("minilm-s3: Downloaded: s3://models/minilm: 10 files"),
        "{console}"
    );
    assert!(!console.contains("local-secret"), "{console}");
    let (status, body) = post(
        &format!("{}/models/minilm-s3/proxy/v1/embed", local.url),
        &[("Authorization", &bearer(&local.token("app")))],
        &json!({"inputs": "from a bucket"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0].as_array().map(Vec::len), Some(384));
    drop(store);
    let _ = std::fs::remove_dir_all(scratch);
}
