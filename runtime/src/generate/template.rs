//! Chat templates: the model's (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`) or one a request brings, rendered with minijinja configured as
//! transformers configures jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! `raise_exception`, `tojson`, `strftime_now`, Python's string methods).
//!
//! A request-supplied template is untrusted code: a 116-byte template can ask for minutes of CPU
//! (nested loops) in servers that render it unguarded. Every render here has a fuel budget (the
//! VM's instruction count), a size limit on the template and on its output, and runs on the
//! blocking pool, never on the async executor; compiled templates are cached by their source.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// Fuel of one render (docs/architecture.md, limits): a chat of a few hundred messages through
/// a real template uses a few tens of thousands; this bounds a hostile template to a fraction of
/// a second of CPU.
pub const RENDER_FUEL: u64 = 500_000;
/// Largest template a request may bring.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// Largest rendered prompt, in bytes (docs/architecture.md, limits).
pub const MAX_RENDERED_BYTES: usize = 1024 * 1024;
/// Compiled request templates kept.
const CACHED_TEMPLATES: usize = 64;

/// Why a chat could not be rendered; answered as 400 naming the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum TemplateError {
    #[error("chat_template is {0} bytes, more than the limit of {MAX_TEMPLATE_BYTES}")]
    TooLarge(usize),
    #[error("chat_template does not compile: {0}")]
    Syntax(String),
    #[error("chat_template raised an error: {0}")]
    Raised(String),
    #[error("chat_template ran out of fuel ({RENDER_FUEL} instructions) before finishing")]
    OutOfFuel,
    #[error("chat_template rendered more than {MAX_RENDERED_BYTES} bytes")]
    OutputTooLarge,
    #[error("chat_template failed: {0}")]
    Render(String),
    #[error("this model has no chat template; send chat_template or use /v1/completions")]
    Missing,
    #[error("chat_template exceeded the memory of its sandbox")]
    ResourcesExhausted,
    #[error("chat_template used more than {0:?} of CPU")]
    OutOfCpu(std::time::Duration),
    #[error("chat_template did not finish within {0:?}")]
    OutOfTime(std::time::Duration),
}

/// One message as templates see it: `role`, `content` (text) and any other fields the client
/// sent (`name`, `tool_calls`...), passed through.
pub type Message = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

/// A render's output, refused past `MAX_RENDERED_BYTES`.
#[derive(Debug, Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The model's template and the cache of request templates.
#[derive(Debug)]
pub struct ChatTemplates {
    model_template: Option<Arc<Environment<'static>>>,
    bos_token: String,
    eos_token: String,
    cache: Mutex<HashMap<String, Arc<Environment<'static>>>>,
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// Marks an error as the template's own `raise_exception`.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let now = jiff::Zoned::now();
    jiff::fmt::strtime::format(format.as_bytes(), &now)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// An environment holding `source` as template "chat", configured like transformers' jinja2.
fn compile(source: &str) -> Result<Environment<'static>, TemplateError> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Syntax(e.to_string()))?,
    );
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned("chat", source.to_owned())
        .map_err(|e| TemplateError::Syntax(describe(&e)))?;
    Ok(env)
}

/// The error and its causes in one line, without the template's source dump.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    if let Some(line) = error.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

impl ChatTemplates {
    /// The model directory's template (`chat_template.jinja` first, as current repositories
    /// ship it, else `chat_template` in `tokenizer_config.json`) and its special tokens.
    pub fn from_model_dir(dir: &Path) -> Result<ChatTemplates, String> {
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        };
        let source = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or_else(|| match &config["chat_template"] {
                serde_json::Value::String(s) => Some(s.clone()),
                // A list of named templates: the one named "default".
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_owned),
                _ => None,
            });
        let model_template = source
            .map(|s| compile(&s).map(Arc::new))
            .transpose()
            .map_err(|e| format!("the model's chat template: {e}"))?;
        Ok(ChatTemplates {
            model_template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            cache: Mutex::default(),
        })
    }

    /// No model template: only request templates, with these special tokens (the sandbox's).
    pub fn without_model(bos_token: &str, eos_token: &str) -> ChatTemplates {
        ChatTemplates {
            model_template: None,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            cache: Mutex::default(),
        }
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    pub fn has_model_template(&self) -> bool {
        self.model_template.is_some()
    }

    /// The environment for a request's template (compiled once per distinct source), or the
    /// model's.
    fn environment(
        &self,
        request_template: Option<&str>,
    ) -> Result<Arc<Environment<'static>>, TemplateError> {
        let Some(source) = request_template else {
            return self.model_template.clone().ok_or(TemplateError::Missing);
        };
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLarge(source.len()));
        }
        if let Some(env) = self.cache.lock().expect("template cache").get(source) {
            return Ok(env.clone());
        }
        let env = Arc::new(compile(source)?);
        let mut cache = self.cache.lock().expect("template cache");
        if cache.len() >= CACHED_TEMPLATES {
            cache.clear();
        }
        cache.insert(source.to_owned(), env.clone());
        Ok(env)
    }

    /// Renders `messages`. Call it on the blocking pool: it may use its whole fuel.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        request_template: Option<&str>,
    ) -> Result<String, TemplateError> {
        let env = self.environment(request_template)?;
        let template = env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let context = Context {
            messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
        };
        // Output goes through a capped writer, so an oversized prompt stops as it grows
        // instead of being built whole and measured afterwards.
        let mut output = CappedOutput::default();
        let rendered = template
            .render_captured_to(Value::from(minijinja::value::Serde(&context)), &mut output);
        if output.overflowed {
            return Err(TemplateError::OutputTooLarge);
        }
        rendered.map_err(|e| {
            let raised = std::error::Error::source(&e).is_some_and(|s| s.is::<Raised>());
            match e.kind() {
                ErrorKind::OutOfFuel => TemplateError::OutOfFuel,
                _ if raised => TemplateError::Raised(e.detail().unwrap_or_default().to_owned()),
                _ => TemplateError::Render(describe(&e)),
            }
        })?;
        String::from_utf8(output.bytes)
            .map_err(|e| TemplateError::Render(format!("the rendered prompt is not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates(source: &str) -> ChatTemplates {
        ChatTemplates {
            model_template: Some(Arc::new(compile(source).unwrap())),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            cache: Mutex::default(),
        }
    }

    fn chat(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(role, content)| {
                serde_json::json!({"role": role, "content": content})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect()
    }

    #[test]
    fn templates_see_python_methods_tojson_and_whitespace_control() {
        let t = templates(
            "{{ bos_token }}\n{% for m in messages %}\n[{{ m['role'] | upper }}] {{ m['content'].strip() }} {{ m | tojson }}\n{% endfor %}\n{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
        );
        let out = t.render(&chat(&[("user", "  hi  ")]), true, None).unwrap();
        // What transformers renders (jinja2), checked by hand with keys in sorted order.
        assert_eq!(
            out,
            "<s>\n[USER] hi {\"content\": \"  hi  \", \"role\": \"user\"}\n[ASSISTANT]"
        );
    }

    #[test]
    fn raise_exception_names_its_message() {
        let t = templates(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}",
        );
        assert_eq!(
            t.render(&chat(&[("assistant", "x")]), true, None),
            Err(TemplateError::Raised(
                "first message must be from the user".into()
            ))
        );
    }

    #[test]
    fn a_hostile_request_template_runs_out_of_fuel_quickly() {
        let t = templates("{{ bos_token }}");
        // The shape of the known attack: nested loops costing minutes when unguarded.
        let hostile = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        assert_eq!(
            t.render(&chat(&[("user", "x")]), true, Some(hostile)),
            Err(TemplateError::OutOfFuel)
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn request_templates_are_checked_compiled_and_cached() {
        let t = templates("{{ bos_token }}");
        assert_eq!(
            t.render(&chat(&[]), true, Some(&"x".repeat(MAX_TEMPLATE_BYTES + 1))),
            Err(TemplateError::TooLarge(MAX_TEMPLATE_BYTES + 1))
        );
        assert!(matches!(
            t.render(&chat(&[]), true, Some("{% for %}")),
            Err(TemplateError::Syntax(_))
        ));
        let own = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        assert_eq!(
            t.render(&chat(&[("user", "a")]), false, Some(own)).unwrap(),
            "<user>a"
        );
        assert_eq!(t.cache.lock().unwrap().len(), 1);
        assert_eq!(
            t.render(&chat(&[("user", "b")]), false, Some(own)).unwrap(),
            "<user>b"
        );
        assert_eq!(t.cache.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_exploding_output_is_refused() {
        let t = templates("{{ bos_token }}");
        let big = "{{ 'x' * 2000000 }}";
        assert_eq!(
            t.render(&chat(&[]), true, Some(big)),
            Err(TemplateError::OutputTooLarge)
        );
    }
}
