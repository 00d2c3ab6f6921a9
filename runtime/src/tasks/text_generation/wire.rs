//! What clients send and get on the text-generation routes: OpenAI's chat and text completions
//! (whole, and as stream chunks), TGI's `/generate` and `/generate_stream`, and the tokenize
//! routes.
//!
//! Response fields are declared in alphabetical order, and that order is part of the contract:
//! these bodies used to be built as `serde_json::Value`s, whose maps sort their keys, so clients
//! have always seen them sorted. The tests at the end pin each shape byte for byte.

use serde::{Deserialize, Serialize};

use crate::generate::template::Message;

/// The `system_fingerprint` of a loaded model, as OpenAI's and TGI's completions carry it (TGI's
/// OpenAPI document requires it): the runtime's version, the dtype, and a digest of what
/// else decides the outputs for a given request (the model's id, its `config.json`, the
/// device). Stable while one model stays loaded; it changes when any of these does, so a client
/// comparing seeded outputs can tell a changed backend.
pub fn system_fingerprint(model_id: &str, dtype: &str, device: &str, config: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for part in [
        model_id.as_bytes(),
        dtype.as_bytes(),
        device.as_bytes(),
        config,
    ] {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    let hex: String = digest.finalize()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{dtype}-{hex}", env!("CARGO_PKG_VERSION"))
}

// Requests.

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Declares the knobs struct and its merge from one list of fields, so that a knob added to the
/// struct is merged too: a hand-written merge compiled fine when it forgot one.
macro_rules! knobs {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[$field_attr:meta])* pub $field:ident: Option<$ty:ty>, )*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $( $(#[$field_attr])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// Each knob that `self` sets, else the one `fallback` sets.
            pub fn or(self, fallback: $name) -> $name {
                $name {
                    $( $field: self.$field.or(fallback.$field), )*
                }
            }
        }
    };
}

knobs! {
    /// Sampling and stopping fields shared by every body shape (OpenAI names, TGI names, and the
    /// extensions vLLM clients send: `top_k`, `repetition_penalty`, `ignore_eos`,
    /// `stop_token_ids`). All optional: a field left out takes the server's default.
    #[derive(Debug, Clone, PartialEq, Deserialize, Default)]
    pub struct Knobs {
        pub max_tokens: Option<u64>,
        pub max_completion_tokens: Option<u64>,
        pub max_new_tokens: Option<u64>,
        pub temperature: Option<f64>,
        pub top_p: Option<f64>,
        pub top_k: Option<i64>,
        pub repetition_penalty: Option<f64>,
        pub seed: Option<u64>,
        pub do_sample: Option<bool>,
        pub stop: Option<StopField>,
        pub ignore_eos: Option<bool>,
        pub stop_token_ids: Option<Vec<i64>>,
        pub n: Option<u64>,
        pub logprobs: Option<serde_json::Value>,
        pub frequency_penalty: Option<f64>,
        pub presence_penalty: Option<f64>,
    }
}

/// TGI's `parameters`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct TgiParameters {
    #[serde(flatten)]
    pub knobs: Knobs,
    #[serde(default)]
    pub details: bool,
}

/// The body of `/v1/chat/completions`: OpenAI's, or TGI-style with `inputs`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    pub inputs: Option<String>,
    pub parameters: Option<TgiParameters>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// `prompt` of `/v1/completions`: a string, or a list of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// TGI's `/generate` and `/generate_stream` body.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<TgiParameters>,
    #[serde(default)]
    pub stream: bool,
}

// OpenAI's answers.

/// OpenAI's `object` of each answer shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Object {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
    /// Text completions use one name whole and streamed.
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// Why an answer ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            completion_tokens,
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A chat completion's `message`, and each chunk's `delta`: every delta names the role and has
/// content (empty in the first and the last), as TGI's do and its document requires; OpenAI's
/// clients read either form.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub content: String,
    pub role: Role,
}

impl AssistantMessage {
    pub fn new(content: String) -> AssistantMessage {
        AssistantMessage {
            content,
            role: Role::Assistant,
        }
    }
}

/// The one choice of an answer (`n` other than 1 is refused). `logprobs` is always `null`:
/// requests for them are refused too.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Choice {
    Chat {
        finish_reason: FinishReason,
        index: u32,
        logprobs: (),
        message: AssistantMessage,
    },
    Text {
        finish_reason: FinishReason,
        index: u32,
        logprobs: (),
        text: String,
    },
}

/// The choice of a stream chunk: `finish_reason` is `null` until the last.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ChunkChoice {
    Chat {
        delta: AssistantMessage,
        finish_reason: Option<FinishReason>,
        index: u32,
        logprobs: (),
    },
    Text {
        finish_reason: Option<FinishReason>,
        index: u32,
        logprobs: (),
        text: String,
    },
}

impl ChunkChoice {
    pub fn new(chat: bool, text: String, finish_reason: Option<FinishReason>) -> ChunkChoice {
        if chat {
            ChunkChoice::Chat {
                delta: AssistantMessage::new(text),
                finish_reason,
                index: 0,
                logprobs: (),
            }
        } else {
            ChunkChoice::Text {
                finish_reason,
                index: 0,
                logprobs: (),
                text,
            }
        }
    }
}

/// What every answer of one request repeats, whole or in chunks.
#[derive(Debug)]
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

impl Head {
    /// A whole answer: chat (`message`) or text.
    pub fn completion(
        &self,
        chat: bool,
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    ) -> Completion<'_> {
        let (object, choice) = if chat {
            (
                Object::ChatCompletion,
                Choice::Chat {
                    finish_reason,
                    index: 0,
                    logprobs: (),
                    message: AssistantMessage::new(text),
                },
            )
        } else {
            (
                Object::TextCompletion,
                Choice::Text {
                    finish_reason,
                    index: 0,
                    logprobs: (),
                    text,
                },
            )
        };
        Completion {
            choices: [choice],
            created: self.created,
            id: &self.id,
            model: &self.model,
            object,
            system_fingerprint: &self.system_fingerprint,
            usage,
        }
    }

    /// A stream chunk with OpenAI's fields only.
    pub fn chunk(&self, object: Object, choices: Vec<ChunkChoice>) -> Chunk<'_> {
        Chunk {
            choices,
            created: self.created,
            details: None,
            generated_text: None,
            id: &self.id,
            model: &self.model,
            object,
            system_fingerprint: &self.system_fingerprint,
            token: None,
            usage: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub choices: [Choice; 1],
    pub created: u64,
    pub id: &'a str,
    pub model: &'a str,
    pub object: Object,
    pub system_fingerprint: &'a str,
    pub usage: Usage,
}

/// One `data:` chunk of an OpenAI stream. On a TGI-style chat body, chunks also carry TGI's
/// fields, so that TGI's clients and OpenAI's both read them: `token` on each text chunk, with
/// `generated_text` and `details` `null` until the last chunk has them (`Some(None)` is `null`,
/// `None` leaves the field out).
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub choices: Vec<ChunkChoice>,
    pub created: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Option<StreamDetails>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated_text: Option<Option<&'a str>>,
    pub id: &'a str,
    pub model: &'a str,
    pub object: Object,
    pub system_fingerprint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// Only in the chunk `stream_options.include_usage` asks for, after the last choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

// TGI's answers.

/// Why an answer ended, in TGI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TgiFinishReason {
    EosToken,
    StopSequence,
    Length,
}

/// TGI's `Token`. `logprob` is always `null` (not computed); `id` is `null` only on the chat
/// route, for text released when the answer ends that no token of its own carries.
#[derive(Debug, Serialize)]
pub struct Token {
    pub id: Option<i64>,
    pub logprob: (),
    pub special: bool,
    pub text: String,
}

/// `/generate`'s body; `details` only when the request asked for them.
#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<GenerateDetails>,
    pub generated_text: String,
}

#[derive(Debug, Serialize)]
pub struct GenerateDetails {
    pub finish_reason: TgiFinishReason,
    pub generated_tokens: usize,
    /// The prompt's tokens with their logprobs: not computed, so always empty.
    pub prefill: [Token; 0],
    pub seed: Option<u64>,
    pub tokens: Vec<Token>,
}

/// One event of `/generate_stream`: a token, and on the last also the whole text and details.
#[derive(Debug, Serialize)]
pub struct StreamResponse {
    pub details: Option<StreamDetails>,
    pub generated_text: Option<String>,
    pub index: usize,
    pub token: Token,
}

/// The details of a stream's last event. The chat route's TGI-style chunks leave
/// `input_length` out and their `seed` is `null`, as they always have.
#[derive(Debug, Serialize)]
pub struct StreamDetails {
    pub finish_reason: TgiFinishReason,
    pub generated_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_length: Option<usize>,
    pub seed: Option<u64>,
}

/// TGI's `SimpleToken`: an id with its text and byte offsets in the tokenized text.
#[derive(Debug, Serialize)]
pub struct SimpleToken {
    pub id: u32,
    pub start: usize,
    pub stop: usize,
    pub text: String,
}

/// `/chat_tokenize`'s body.
#[derive(Debug, Serialize)]
pub struct ChatTokenizeResponse {
    pub templated_text: String,
    pub tokenize_response: Vec<SimpleToken>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ApiError, BackendError, ErrorBody};

    fn json(value: &impl Serialize) -> String {
        serde_json::to_string(value).unwrap()
    }

    fn head() -> Head {
        Head {
            id: "chatcmpl-1".to_owned(),
            created: 1700000000,
            model: "llama".to_owned(),
            system_fingerprint: "0.1.0-float32-7ffe390c74".to_owned(),
        }
    }

    /// Every knob set, each to a value no other test uses: a struct literal without `..`, so
    /// adding a knob without adding it here does not compile.
    fn every_knob() -> Knobs {
        Knobs {
            max_tokens: Some(11),
            max_completion_tokens: Some(12),
            max_new_tokens: Some(13),
            temperature: Some(0.5),
            top_p: Some(0.75),
            top_k: Some(40),
            repetition_penalty: Some(1.25),
            seed: Some(7),
            do_sample: Some(true),
            stop: Some(StopField::One("###".to_owned())),
            ignore_eos: Some(true),
            stop_token_ids: Some(vec![5]),
            n: Some(1),
            logprobs: Some(serde_json::Value::Bool(false)),
            frequency_penalty: Some(0.0),
            presence_penalty: Some(0.0),
        }
    }

    #[test]
    fn every_knob_set_only_in_the_fallback_survives_the_merge() {
        assert_eq!(Knobs::default().or(every_knob()), every_knob());
        assert_eq!(every_knob().or(Knobs::default()), every_knob());
    }

    #[test]
    fn a_knob_set_in_both_places_takes_the_first() {
        let top = Knobs {
            max_new_tokens: Some(4),
            temperature: Some(0.0),
            ..Knobs::default()
        };
        let merged = top.or(every_knob());
        assert_eq!(merged.max_new_tokens, Some(4));
        assert_eq!(merged.temperature, Some(0.0));
        assert_eq!(merged.top_p, Some(0.75), "the rest from the fallback");
    }

    #[test]
    fn a_null_knob_is_unset_and_falls_back() {
        let top: Knobs = serde_json::from_str(r#"{"max_new_tokens": null}"#).unwrap();
        assert_eq!(top.or(every_knob()).max_new_tokens, Some(13));
    }

    #[test]
    fn the_chat_body_takes_knobs_at_the_top_and_under_tgi_parameters() {
        let body: ChatRequest = serde_json::from_str(
            r#"{"inputs": "Once upon", "max_new_tokens": 4,
                "parameters": {"max_new_tokens": 9, "do_sample": false, "details": true}}"#,
        )
        .unwrap();
        assert_eq!(body.knobs.max_new_tokens, Some(4));
        let parameters = body.parameters.unwrap();
        assert!(parameters.details);
        assert_eq!(parameters.knobs.max_new_tokens, Some(9));
        assert_eq!(parameters.knobs.do_sample, Some(false));
    }

    #[test]
    fn stop_is_one_string_or_a_list() {
        for (body, stops) in [
            (r#"{"stop": "END"}"#, vec!["END"]),
            (r#"{"stop": ["a", "b"]}"#, vec!["a", "b"]),
        ] {
            let knobs: Knobs = serde_json::from_str(body).unwrap();
            assert_eq!(knobs.stop.unwrap().into_vec(), stops);
        }
    }

    #[test]
    fn a_whole_chat_completion() {
        let head = head();
        let answer = head.completion(
            true,
            " a time".to_owned(),
            FinishReason::Length,
            Usage::new(3, 2),
        );
        assert_eq!(
            json(&answer),
            r#"{"choices":[{"finish_reason":"length","index":0,"logprobs":null,"message":{"content":" a time","role":"assistant"}}],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"chat.completion","system_fingerprint":"0.1.0-float32-7ffe390c74","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}"#
        );
    }

    #[test]
    fn a_whole_text_completion() {
        let head = head();
        let answer = head.completion(
            false,
            " Paris".to_owned(),
            FinishReason::Stop,
            Usage::new(4, 1),
        );
        assert_eq!(
            json(&answer),
            r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"text":" Paris"}],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"text_completion","system_fingerprint":"0.1.0-float32-7ffe390c74","usage":{"completion_tokens":1,"prompt_tokens":4,"total_tokens":5}}"#
        );
    }

    #[test]
    fn chunks_of_a_chat_and_of_a_text_completion() {
        let head = head();
        let chat = head.chunk(
            Object::ChatCompletionChunk,
            vec![ChunkChoice::new(true, " a".to_owned(), None)],
        );
        assert_eq!(
            json(&chat),
            r#"{"choices":[{"delta":{"content":" a","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"chat.completion.chunk","system_fingerprint":"0.1.0-float32-7ffe390c74"}"#
        );
        let text = head.chunk(
            Object::TextCompletion,
            vec![ChunkChoice::new(
                false,
                String::new(),
                Some(FinishReason::Length),
            )],
        );
        assert_eq!(
            json(&text),
            r#"{"choices":[{"finish_reason":"length","index":0,"logprobs":null,"text":""}],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"text_completion","system_fingerprint":"0.1.0-float32-7ffe390c74"}"#
        );
    }

    #[test]
    fn the_usage_chunk_has_no_choices() {
        let head = head();
        let mut chunk = head.chunk(Object::ChatCompletionChunk, Vec::new());
        chunk.usage = Some(Usage::new(3, 2));
        assert_eq!(
            json(&chunk),
            r#"{"choices":[],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"chat.completion.chunk","system_fingerprint":"0.1.0-float32-7ffe390c74","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}"#
        );
    }

    #[test]
    fn tgi_fields_sit_among_openais_in_a_tgi_style_chat_chunk() {
        let head = head();
        let mut text = head.chunk(
            Object::ChatCompletionChunk,
            vec![ChunkChoice::new(true, " a".to_owned(), None)],
        );
        text.token = Some(Token {
            id: Some(55),
            logprob: (),
            special: false,
            text: " a".to_owned(),
        });
        text.generated_text = Some(None);
        text.details = Some(None);
        assert_eq!(
            json(&text),
            r#"{"choices":[{"delta":{"content":" a","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1700000000,"details":null,"generated_text":null,"id":"chatcmpl-1","model":"llama","object":"chat.completion.chunk","system_fingerprint":"0.1.0-float32-7ffe390c74","token":{"id":55,"logprob":null,"special":false,"text":" a"}}"#
        );
        let mut last = head.chunk(
            Object::ChatCompletionChunk,
            vec![ChunkChoice::new(
                true,
                String::new(),
                Some(FinishReason::Stop),
            )],
        );
        last.generated_text = Some(Some(" a time"));
        last.details = Some(Some(StreamDetails {
            finish_reason: TgiFinishReason::StopSequence,
            generated_tokens: 3,
            input_length: None,
            seed: None,
        }));
        assert_eq!(
            json(&last),
            r#"{"choices":[{"delta":{"content":"","role":"assistant"},"finish_reason":"stop","index":0,"logprobs":null}],"created":1700000000,"details":{"finish_reason":"stop_sequence","generated_tokens":3,"seed":null},"generated_text":" a time","id":"chatcmpl-1","model":"llama","object":"chat.completion.chunk","system_fingerprint":"0.1.0-float32-7ffe390c74"}"#
        );
    }

    fn token(id: i64, text: &str) -> Token {
        Token {
            id: Some(id),
            logprob: (),
            special: false,
            text: text.to_owned(),
        }
    }

    #[test]
    fn generate_answers_the_text_and_the_details_only_when_asked() {
        let plain = GenerateResponse {
            details: None,
            generated_text: " France is".to_owned(),
        };
        assert_eq!(json(&plain), r#"{"generated_text":" France is"}"#);
        let detailed = GenerateResponse {
            details: Some(GenerateDetails {
                finish_reason: TgiFinishReason::Length,
                generated_tokens: 2,
                prefill: [],
                seed: Some(3),
                tokens: vec![token(266, " France"), token(110, " is")],
            }),
            generated_text: " France is".to_owned(),
        };
        assert_eq!(
            json(&detailed),
            r#"{"details":{"finish_reason":"length","generated_tokens":2,"prefill":[],"seed":3,"tokens":[{"id":266,"logprob":null,"special":false,"text":" France"},{"id":110,"logprob":null,"special":false,"text":" is"}]},"generated_text":" France is"}"#
        );
    }

    #[test]
    fn generate_stream_events_carry_nulls_until_the_last() {
        let first = StreamResponse {
            details: None,
            generated_text: None,
            index: 1,
            token: token(266, " France"),
        };
        assert_eq!(
            json(&first),
            r#"{"details":null,"generated_text":null,"index":1,"token":{"id":266,"logprob":null,"special":false,"text":" France"}}"#
        );
        let last = StreamResponse {
            details: Some(StreamDetails {
                finish_reason: TgiFinishReason::EosToken,
                generated_tokens: 2,
                input_length: Some(4),
                seed: None,
            }),
            generated_text: Some(" France is".to_owned()),
            index: 2,
            token: token(110, " is"),
        };
        assert_eq!(
            json(&last),
            r#"{"details":{"finish_reason":"eos_token","generated_tokens":2,"input_length":4,"seed":null},"generated_text":" France is","index":2,"token":{"id":110,"logprob":null,"special":false,"text":" is"}}"#
        );
    }

    #[test]
    fn tokenize_answers_simple_tokens() {
        let answer = ChatTokenizeResponse {
            templated_text: "<|bos|>hi".to_owned(),
            tokenize_response: vec![SimpleToken {
                id: 0,
                start: 0,
                stop: 7,
                text: "<|bos|>".to_owned(),
            }],
        };
        assert_eq!(
            json(&answer),
            r#"{"templated_text":"<|bos|>hi","tokenize_response":[{"id":0,"start":0,"stop":7,"text":"<|bos|>"}]}"#
        );
    }

    #[tokio::test]
    async fn a_streams_error_body_is_the_one_the_same_error_gets_as_a_response() {
        use axum::response::IntoResponse;
        for error in [
            ApiError::Timeout,
            ApiError::Backend(BackendError::Output("boom".to_owned())),
        ] {
            let body = json(&ErrorBody::from(&error));
            let response = error.into_response();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(body.as_bytes(), &bytes[..]);
        }
    }

    #[test]
    fn the_system_fingerprint_names_the_version_and_dtype_and_follows_the_model() {
        let config = br#"{"model_type": "llama"}"#;
        let fingerprint = system_fingerprint("llama", "float16", "cuda:0", config);
        assert_eq!(
            fingerprint,
            system_fingerprint("llama", "float16", "cuda:0", config),
            "stable for one model"
        );
        let (version, rest) = fingerprint.split_once('-').unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        let (dtype, digest) = rest.rsplit_once('-').unwrap();
        assert_eq!(dtype, "float16");
        assert_eq!(digest.len(), 10);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        for other in [
            system_fingerprint("mistral", "float16", "cuda:0", config),
            system_fingerprint("llama", "float32", "cuda:0", config),
            system_fingerprint("llama", "float16", "cpu", config),
            system_fingerprint("llama", "float16", "cuda:0", br#"{"model_type": "qwen2"}"#),
        ] {
            assert_ne!(other, fingerprint);
        }
    }
}
