//! Validation: a request's prompt and knobs, checked against the model's limits, become the plan
//! the engine runs. Every invalid field is a 400 `invalid_field` whose message begins with the
//! field's name.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::wire::{ChatRequest, Knobs, PromptField, StopField, TgiParameters};
use crate::error::ApiError;
use crate::generate::engine::StopRule;
use crate::generate::sampling::SamplingParams;
use crate::generate::template::Message;
use crate::models::{LoadError, read_json};

/// Sampling defaults when a request sets none (docs/architecture.md, runtime contract).
#[derive(Debug, Clone, Copy)]
pub struct GenerationDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        GenerationDefaults {
            temperature: 0.7,
            top_p: 0.9,
            max_new_tokens: 1024,
        }
    }
}

/// The EOS ids of a model: `generation_config.json` first (what `generate` uses), then
/// `config.json`; each a number or a list.
pub fn eos_token_ids(dir: &Path) -> Result<Vec<i64>, LoadError> {
    let from = |value: &serde_json::Value| -> Vec<i64> {
        match value {
            serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
            serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_i64()).collect(),
            _ => Vec::new(),
        }
    };
    let generation: serde_json::Value =
        read_json(&dir.join("generation_config.json")).unwrap_or_default();
    let ids = from(&generation["eos_token_id"]);
    if !ids.is_empty() {
        return Ok(ids);
    }
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    Ok(from(&config["eos_token_id"]))
}

pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidField(message.into())
}

/// A number for requests that bring none (a seed, a completion's id): distinct per request, not
/// reproducible.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// What a request is checked against: the model's length, the server's defaults, and the EOS
/// ids that end every sequence that does not ignore them.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub max_sequence_tokens: usize,
    pub defaults: GenerationDefaults,
    pub eos_token_ids: &'a [i64],
}

/// A validated request, ready to run.
#[derive(Debug)]
pub struct Plan {
    pub prompt: Vec<i64>,
    pub sampling: SamplingParams,
    pub stop: StopRule,
    pub stop_strings: Vec<String>,
    pub deadline: Option<Instant>,
}

impl Rules<'_> {
    /// `default_max_tokens`: the route's own default, where it has one (OpenAI's completions).
    pub fn plan(
        &self,
        prompt: Vec<i64>,
        knobs: Knobs,
        default_max_tokens: Option<usize>,
        deadline: Option<Instant>,
    ) -> Result<Plan, ApiError> {
        if knobs.n.is_some_and(|n| n != 1) {
            return Err(invalid("n: only 1 choice per request is supported"));
        }
        if knobs
            .logprobs
            .as_ref()
            .is_some_and(|l| !l.is_null() && l != &serde_json::Value::Bool(false))
        {
            return Err(invalid("logprobs: not supported"));
        }
        for (field, value) in [
            ("frequency_penalty", knobs.frequency_penalty),
            ("presence_penalty", knobs.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(invalid(format!(
                    "{field}: not supported; use repetition_penalty"
                )));
            }
        }
        let limit = self.max_sequence_tokens;
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        if prompt.len() >= limit {
            return Err(ApiError::InputTooLong {
                index: 0,
                tokens: prompt.len(),
                limit: limit - 1,
            });
        }
        let room = limit - prompt.len();
        let (field, asked) = [
            ("max_tokens", knobs.max_tokens),
            ("max_completion_tokens", knobs.max_completion_tokens),
            ("max_new_tokens", knobs.max_new_tokens),
        ]
        .into_iter()
        .find_map(|(field, value)| value.map(|v| (field, v)))
        .unzip();
        let max_new_tokens = match asked {
            Some(0) => {
                return Err(invalid(format!(
                    "{}: must be at least 1",
                    field.unwrap_or_default()
                )));
            }
            Some(n) if n as usize > room => {
                return Err(invalid(format!(
                    "{}: {n} new tokens after a prompt of {} exceed this model's limit of {limit} tokens; ask for at most {room}",
                    field.unwrap_or_default(),
                    prompt.len()
                )));
            }
            Some(n) => n as usize,
            None => default_max_tokens
                .unwrap_or(self.defaults.max_new_tokens)
                .min(room),
        };
        let temperature = match (knobs.do_sample, knobs.temperature) {
            (_, Some(t)) if !t.is_finite() || !(0.0..=100.0).contains(&t) => {
                return Err(invalid("temperature: must be between 0 and 100"));
            }
            (Some(false), _) => 0.0,
            (_, Some(t)) => t as f32,
            (_, None) => self.defaults.temperature,
        };
        let top_p = match knobs.top_p {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                return Err(invalid("top_p: must be in (0, 1]"));
            }
            Some(p) => p as f32,
            None => self.defaults.top_p,
        };
        let top_k = match knobs.top_k {
            Some(k) if k < 0 => return Err(invalid("top_k: must be 0 (off) or positive")),
            Some(k) => k as usize,
            None => 0,
        };
        let repetition_penalty = match knobs.repetition_penalty {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                return Err(invalid("repetition_penalty: must be positive"));
            }
            Some(r) => r as f32,
            None => 1.0,
        };
        let stop_strings = knobs.stop.map(StopField::into_vec).unwrap_or_default();
        if stop_strings.len() > 16 || stop_strings.iter().any(|s| s.len() > 256) {
            return Err(invalid("stop: at most 16 strings of at most 256 bytes"));
        }
        let mut stop_token_ids = knobs.stop_token_ids.unwrap_or_default();
        if !knobs.ignore_eos.unwrap_or(false) {
            stop_token_ids.extend(self.eos_token_ids);
        }
        Ok(Plan {
            prompt,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                repetition_penalty,
                seed: knobs.seed.unwrap_or_else(fresh_seed),
            },
            stop: StopRule {
                max_new_tokens,
                stop_token_ids,
            },
            stop_strings,
            deadline,
        })
    }
}

/// TGI's knobs: TGI samples only with `do_sample`, or a temperature, top_k or top_p that
/// implies it; otherwise it is greedy, where OpenAI's routes sample by default.
pub fn tgi_knobs(parameters: Option<TgiParameters>) -> (Knobs, bool) {
    let TgiParameters { mut knobs, details } = parameters.unwrap_or_default();
    if knobs.do_sample.is_none() {
        let implied = knobs.temperature.is_some() || knobs.top_k.is_some() || knobs.top_p.is_some();
        knobs.do_sample = Some(implied);
    }
    (knobs, details)
}

/// What the chat route runs.
#[derive(Debug, PartialEq)]
pub enum ChatPrompt {
    /// OpenAI's messages, to render through a chat template.
    Messages {
        messages: Vec<Message>,
        add_generation_prompt: bool,
        chat_template: Option<String>,
    },
    /// A TGI-style body's `inputs`: the prompt as is (no chat template, as TGI's `/generate`).
    Inputs(String),
}

/// The prompt of a chat body, and its knobs: a TGI-style body's top-level knobs win over those
/// under `parameters`.
pub fn chat_prompt(request: ChatRequest) -> Result<(ChatPrompt, Knobs), ApiError> {
    match (request.messages, request.inputs) {
        (Some(messages), None) => Ok((
            ChatPrompt::Messages {
                messages: normalise_messages(messages)?,
                add_generation_prompt: request.add_generation_prompt.unwrap_or(true),
                chat_template: request.chat_template,
            },
            request.knobs,
        )),
        (None, Some(inputs)) => {
            let knobs = match request.parameters {
                Some(parameters) => request.knobs.or(parameters.knobs),
                None => request.knobs,
            };
            Ok((ChatPrompt::Inputs(inputs), knobs))
        }
        (Some(_), Some(_)) => Err(invalid(
            "send either messages (OpenAI) or inputs (TGI), not both",
        )),
        (None, None) => Err(invalid(
            "messages: missing field (or send TGI-style inputs)",
        )),
    }
}

/// Messages as templates expect them: `content` as text (OpenAI's list of text parts joined).
pub fn normalise_messages(messages: Vec<Message>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(invalid("messages: at least one message is required"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, mut message)| {
            if !message.get("role").is_some_and(|r| r.is_string()) {
                return Err(invalid(format!("messages[{i}].role: a string is required")));
            }
            let content = match message.remove("content") {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(text)) => text,
                Some(serde_json::Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part["type"].as_str(), part["text"].as_str()) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(format!(
                                    "messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"
                                )));
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "messages[{i}].content: a string or a list of text parts is required"
                    )));
                }
            };
            message.insert("content".to_owned(), content.into());
            Ok(message)
        })
        .collect()
}

/// The one prompt of a completions body (`echo` is not supported).
pub fn completion_prompt(prompt: PromptField, echo: bool) -> Result<String, ApiError> {
    let prompt = match prompt {
        PromptField::One(prompt) => prompt,
        PromptField::Many(mut prompts) if prompts.len() == 1 => prompts.remove(0),
        PromptField::Many(_) => return Err(invalid("prompt: one prompt per request is supported")),
    };
    if echo {
        return Err(invalid("echo: not supported"));
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::text_generation::wire::CompletionRequest;
    use serde_json::json;

    const EOS: i64 = 2;

    fn rules() -> Rules<'static> {
        Rules {
            max_sequence_tokens: 32,
            defaults: GenerationDefaults::default(),
            eos_token_ids: &[EOS],
        }
    }

    fn knobs(body: serde_json::Value) -> Knobs {
        serde_json::from_value(body).unwrap()
    }

    /// The plan of a 4-token prompt with these knobs.
    fn plan(body: serde_json::Value) -> Result<Plan, ApiError> {
        rules().plan(vec![1, 10, 11, 12], knobs(body), None, None)
    }

    /// Asserts a 400 `invalid_field` whose message begins with `field`.
    fn assert_invalid(result: Result<impl std::fmt::Debug, ApiError>, field: &str) {
        let error = result.unwrap_err();
        assert_eq!(error.status(), 400, "{error}");
        assert_eq!(error.kind_and_code().1, "invalid_field", "{error}");
        assert!(
            error.to_string().starts_with(field),
            "{error:?} names {field}"
        );
    }

    #[test]
    fn each_bad_knob_is_a_400_that_names_it() {
        for (body, field) in [
            (json!({"n": 2}), "n:"),
            (json!({"logprobs": true}), "logprobs:"),
            (json!({"logprobs": 5}), "logprobs:"),
            (json!({"frequency_penalty": 0.5}), "frequency_penalty:"),
            (json!({"presence_penalty": -1.0}), "presence_penalty:"),
            (json!({"max_tokens": 0}), "max_tokens:"),
            (
                json!({"max_completion_tokens": 0}),
                "max_completion_tokens:",
            ),
            (json!({"max_new_tokens": 0}), "max_new_tokens:"),
            (json!({"max_new_tokens": 29}), "max_new_tokens:"),
            (json!({"temperature": -0.1}), "temperature:"),
            (json!({"temperature": 100.5}), "temperature:"),
            (json!({"top_p": 0.0}), "top_p:"),
            (json!({"top_p": 1.5}), "top_p:"),
            (json!({"top_k": -1}), "top_k:"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty:"),
            (json!({"stop": vec!["x"; 17]}), "stop:"),
            (json!({"stop": "x".repeat(257)}), "stop:"),
        ] {
            assert_invalid(plan(body), field);
        }
    }

    #[test]
    fn knobs_that_ask_for_nothing_unsupported_are_accepted() {
        for body in [
            json!({"n": 1}),
            json!({"logprobs": false}),
            json!({"logprobs": null}),
            json!({"frequency_penalty": 0.0, "presence_penalty": 0}),
            json!({"temperature": 0}),
            json!({"temperature": 100}),
            json!({"top_p": 1.0}),
            json!({"top_k": 0}),
            json!({"stop": vec!["x".repeat(256); 16]}),
        ] {
            assert!(plan(body.clone()).is_ok(), "{body}");
        }
    }

    #[test]
    fn new_tokens_fit_after_the_prompt_and_the_refusal_says_how_many_would() {
        // 32 positions, 4 taken by the prompt.
        assert_eq!(
            plan(json!({"max_new_tokens": 28}))
                .unwrap()
                .stop
                .max_new_tokens,
            28
        );
        let error = plan(json!({"max_new_tokens": 29})).unwrap_err();
        assert!(error.to_string().ends_with("ask for at most 28"), "{error}");
    }

    #[test]
    fn the_first_of_the_three_max_token_names_wins() {
        let first = plan(json!({"max_tokens": 3, "max_completion_tokens": 0, "max_new_tokens": 0}));
        assert_eq!(first.unwrap().stop.max_new_tokens, 3);
        let error = plan(json!({"max_completion_tokens": 0, "max_new_tokens": 5}));
        assert_invalid(error, "max_completion_tokens:");
    }

    #[test]
    fn without_knobs_the_server_defaults_apply_within_the_room_left() {
        let defaulted = plan(json!({})).unwrap();
        let defaults = GenerationDefaults::default();
        assert_eq!(defaulted.sampling.temperature, defaults.temperature);
        assert_eq!(defaulted.sampling.top_p, defaults.top_p);
        assert_eq!(defaulted.sampling.top_k, 0);
        assert_eq!(defaulted.sampling.repetition_penalty, 1.0);
        assert_eq!(
            defaulted.stop.max_new_tokens, 28,
            "1024 cut to the room left"
        );
        assert_eq!(defaulted.stop.stop_token_ids, [EOS]);
        assert!(defaulted.stop_strings.is_empty());
        // OpenAI's completions default to 16 new tokens.
        let completion = rules()
            .plan(vec![1, 10], Knobs::default(), Some(16), None)
            .unwrap();
        assert_eq!(completion.stop.max_new_tokens, 16);
    }

    #[test]
    fn knobs_become_the_sampling_and_stop_rules() {
        let asked = plan(json!({
            "temperature": 0.5, "top_p": 0.75, "top_k": 40, "repetition_penalty": 1.25,
            "seed": 7, "stop": "###", "stop_token_ids": [9],
        }))
        .unwrap();
        assert_eq!(
            asked.sampling,
            SamplingParams {
                temperature: 0.5,
                top_p: 0.75,
                top_k: 40,
                repetition_penalty: 1.25,
                seed: 7,
            }
        );
        assert_eq!(asked.stop_strings, ["###"]);
        assert_eq!(asked.stop.stop_token_ids, [9, EOS]);
        let ignoring = plan(json!({"ignore_eos": true, "stop_token_ids": [9]})).unwrap();
        assert_eq!(ignoring.stop.stop_token_ids, [9]);
    }

    #[test]
    fn do_sample_false_is_greedy_whatever_the_temperature() {
        let greedy = plan(json!({"do_sample": false, "temperature": 0.9})).unwrap();
        assert_eq!(greedy.sampling.temperature, 0.0);
    }

    #[test]
    fn an_empty_prompt_is_a_400_and_one_too_long_a_413() {
        let empty = rules().plan(Vec::new(), Knobs::default(), None, None);
        assert_invalid(empty, "the prompt is empty");
        let long = rules().plan(vec![1; 32], Knobs::default(), None, None);
        let error = long.unwrap_err();
        assert_eq!(error.status(), 413);
        assert_eq!(error.kind_and_code().1, "input_too_long");
        assert!(error.to_string().contains("limit of 31"), "{error}");
    }

    #[test]
    fn tgi_is_greedy_unless_a_knob_asks_to_sample() {
        let parameters = |body: serde_json::Value| {
            let parameters: TgiParameters = serde_json::from_value(body).unwrap();
            tgi_knobs(Some(parameters)).0.do_sample
        };
        assert_eq!(tgi_knobs(None).0.do_sample, Some(false));
        assert_eq!(parameters(json!({})), Some(false));
        assert_eq!(parameters(json!({"temperature": 0.5})), Some(true));
        assert_eq!(parameters(json!({"top_k": 5})), Some(true));
        assert_eq!(parameters(json!({"top_p": 0.5})), Some(true));
        assert_eq!(
            parameters(json!({"do_sample": false, "temperature": 0.5})),
            Some(false)
        );
        assert_eq!(parameters(json!({"do_sample": true})), Some(true));
    }

    #[test]
    fn tgi_details_are_asked_for_under_parameters() {
        let parameters: TgiParameters =
            serde_json::from_value(json!({"details": true, "seed": 3})).unwrap();
        let (knobs, details) = tgi_knobs(Some(parameters));
        assert!(details);
        assert_eq!(knobs.seed, Some(3));
        assert!(!tgi_knobs(None).1);
    }

    fn chat(body: serde_json::Value) -> Result<(ChatPrompt, Knobs), ApiError> {
        chat_prompt(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn a_tgi_style_chat_body_is_its_inputs_as_is_with_top_level_knobs_over_parameters() {
        let (prompt, knobs) = chat(json!({
            "inputs": "Once upon", "max_new_tokens": 4, "do_sample": false,
            "parameters": {"max_new_tokens": 9, "temperature": 0.5, "details": true},
        }))
        .unwrap();
        assert_eq!(prompt, ChatPrompt::Inputs("Once upon".to_owned()));
        assert_eq!(knobs.max_new_tokens, Some(4));
        assert_eq!(knobs.do_sample, Some(false));
        assert_eq!(knobs.temperature, Some(0.5));
        // Unlike TGI's own routes, sampling is not implied off: the chat route's defaults hold.
        let (_, flat) = chat(json!({"inputs": "Once upon"})).unwrap();
        assert_eq!(flat, Knobs::default());
    }

    #[test]
    fn an_openai_chat_body_keeps_its_template_settings() {
        let (prompt, knobs) = chat(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": false, "chat_template": "{{ messages }}", "max_tokens": 3,
        }))
        .unwrap();
        let ChatPrompt::Messages {
            messages,
            add_generation_prompt,
            chat_template,
        } = prompt
        else {
            panic!("messages expected");
        };
        assert_eq!(messages[0]["content"], "hi");
        assert!(!add_generation_prompt);
        assert_eq!(chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(knobs.max_tokens, Some(3));
        let (
            ChatPrompt::Messages {
                add_generation_prompt,
                ..
            },
            _,
        ) = chat(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap()
        else {
            panic!("messages expected");
        };
        assert!(add_generation_prompt, "on by default");
    }

    #[test]
    fn a_chat_body_has_messages_or_inputs_not_both_nor_neither() {
        assert_invalid(
            chat(json!({"messages": [{"role": "user", "content": "hi"}], "inputs": "hi"})),
            "send either messages (OpenAI) or inputs (TGI)",
        );
        assert_invalid(chat(json!({"max_tokens": 3})), "messages:");
    }

    #[test]
    fn each_bad_message_is_a_400_that_names_it() {
        for (messages, field) in [
            (json!([]), "messages:"),
            (json!([{"content": "hi"}]), "messages[0].role:"),
            (
                json!([{"role": "user", "content": "hi"}, {"role": 1}]),
                "messages[1].role:",
            ),
            (
                json!([{"role": "user", "content": 5}]),
                "messages[0].content:",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]),
                "messages[0].content[1]:",
            ),
        ] {
            assert_invalid(chat(json!({ "messages": messages })), field);
        }
    }

    #[test]
    fn message_content_becomes_text() {
        let messages = normalise_messages(
            serde_json::from_value(json!([
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": []},
                {"role": "user"},
            ]))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(messages[0]["content"], "ab");
        assert_eq!(messages[1]["content"], "");
        assert_eq!(
            messages[1]["tool_calls"],
            json!([]),
            "other fields pass through"
        );
        assert_eq!(messages[2]["content"], "");
    }

    fn completion(body: serde_json::Value) -> Result<String, ApiError> {
        let request: CompletionRequest = serde_json::from_value(body).unwrap();
        completion_prompt(request.prompt, request.echo)
    }

    #[test]
    fn a_completions_body_has_one_prompt_and_no_echo() {
        assert_eq!(completion(json!({"prompt": "a"})).unwrap(), "a");
        assert_eq!(completion(json!({"prompt": ["a"]})).unwrap(), "a");
        assert_invalid(completion(json!({"prompt": ["a", "b"]})), "prompt:");
        assert_invalid(completion(json!({"prompt": "a", "echo": true})), "echo:");
    }
}
