//! Streamed answers as server-sent events: OpenAI's chunks (of a chat or a text completion, with
//! TGI's fields too for a TGI-style body on the chat route) and TGI's `/generate_stream` events.

use std::convert::Infallible;

use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::run::{Piece, Run};
use super::wire::{ChunkChoice, Head, Object, StreamDetails, StreamResponse, Usage};
use crate::error::ApiError;
use crate::error::ErrorBody;

/// One server-sent event, before axum frames it (axum's own event cannot be read back).
#[derive(Debug)]
pub struct Frame {
    /// The `event:` name; `None` is the default event, `message`.
    pub event: Option<&'static str>,
    pub data: String,
}

impl Frame {
    fn json(value: &impl Serialize) -> Frame {
        Frame {
            event: None,
            // Our wire types have string keys only: serialising them cannot fail.
            data: serde_json::to_string(value).unwrap_or_default(),
        }
    }

    /// OpenAI's end of a stream that finished.
    fn done() -> Frame {
        Frame {
            event: None,
            data: "[DONE]".to_owned(),
        }
    }

    /// The `event: error` that ends a stream that cannot finish normally: the error's usual body.
    fn error(error: &ApiError) -> Frame {
        Frame {
            event: Some("error"),
            ..Frame::json(&ErrorBody::from(error))
        }
    }
}

impl From<Frame> for SseEvent {
    fn from(frame: Frame) -> SseEvent {
        // axum writes the fields in the order they are set: the name goes first.
        let event = match frame.event {
            Some(name) => SseEvent::default().event(name),
            None => SseEvent::default(),
        };
        event.data(frame.data)
    }
}

/// An SSE response with the headers that keep proxies from buffering it.
fn sse_response<S>(frames: S) -> Response
where
    S: futures::Stream<Item = Frame> + Send + 'static,
{
    use futures::StreamExt;
    let events = frames.map(|frame| Ok::<_, Infallible>(SseEvent::from(frame)));
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Where an OpenAI stream is: a chat opens with a chunk that only names the role; after the
/// last choice come the usage (when asked for) and `[DONE]`, unless an error ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    Streaming,
    Usage,
    Done,
    Closed,
}

/// What one OpenAI stream sends, in order.
#[derive(Debug)]
pub struct OpenAiStream {
    run: Run,
    head: Head,
    chat: bool,
    include_usage: bool,
    /// A TGI-style body on the chat route: the text so far, for the last chunk's
    /// `generated_text`.
    tgi: Option<String>,
    state: State,
}

impl OpenAiStream {
    pub fn new(run: Run, head: Head, chat: bool, include_usage: bool, tgi_style: bool) -> Self {
        OpenAiStream {
            run,
            head,
            chat,
            include_usage,
            tgi: tgi_style.then(String::new),
            state: State::Opening,
        }
    }

    pub fn into_response(self) -> Response {
        sse_response(futures::stream::unfold(self, |mut stream| async move {
            let frame = stream.next().await?;
            Some((frame, stream))
        }))
    }

    fn object(&self) -> Object {
        if self.chat {
            Object::ChatCompletionChunk
        } else {
            Object::TextCompletion
        }
    }

    pub async fn next(&mut self) -> Option<Frame> {
        match self.state {
            State::Opening => {
                self.state = State::Streaming;
                if self.chat {
                    let choice = ChunkChoice::new(true, String::new(), None);
                    return Some(Frame::json(&self.head.chunk(self.object(), vec![choice])));
                }
                self.streamed().await
            }
            State::Streaming => self.streamed().await,
            State::Usage => {
                self.state = State::Done;
                let mut chunk = self.head.chunk(self.object(), Vec::new());
                chunk.usage = Some(self.run.usage());
                Some(Frame::json(&chunk))
            }
            State::Done => {
                self.state = State::Closed;
                Some(Frame::done())
            }
            State::Closed => None,
        }
    }

    /// The chunk of the answer's next piece.
    async fn streamed(&mut self) -> Option<Frame> {
        match self.run.next().await? {
            Piece::Text { text, token } => {
                let tgi_token = match &mut self.tgi {
                    Some(generated) => {
                        generated.push_str(&text);
                        Some(self.run.token(token, text.clone()))
                    }
                    None => None,
                };
                let choice = ChunkChoice::new(self.chat, text, None);
                let mut chunk = self.head.chunk(self.object(), vec![choice]);
                if let Some(token) = tgi_token {
                    chunk.token = Some(token);
                    chunk.generated_text = Some(None);
                    chunk.details = Some(None);
                }
                Some(Frame::json(&chunk))
            }
            Piece::Done { finish_reason } => {
                self.state = if self.include_usage {
                    State::Usage
                } else {
                    State::Done
                };
                let choice =
                    ChunkChoice::new(self.chat, String::new(), Some(finish_reason.openai()));
                let mut chunk = self.head.chunk(self.object(), vec![choice]);
                if let Some(generated) = &self.tgi {
                    chunk.generated_text = Some(Some(generated));
                    chunk.details = Some(Some(StreamDetails {
                        finish_reason: finish_reason.tgi(),
                        generated_tokens: self.run.usage().completion_tokens,
                        input_length: None,
                        seed: None,
                    }));
                }
                Some(Frame::json(&chunk))
            }
            Piece::Timeout => {
                self.state = State::Closed;
                Some(Frame::error(&ApiError::Timeout))
            }
            Piece::Failed(error) => {
                self.state = State::Closed;
                Some(Frame::error(&ApiError::Backend(error)))
            }
        }
    }
}

/// What one `/generate_stream` sends: an event per token, each sent one token late so that the
/// last token's event can carry the whole text and the details, as TGI's does.
#[derive(Debug)]
pub struct TgiStream {
    run: Run,
    seed: Option<u64>,
    /// Events sent so far (TGI counts from 1).
    index: usize,
    text: String,
    /// The token not yet sent, with its text (and any text released after it).
    last: Option<(i64, String)>,
    closed: bool,
}

impl TgiStream {
    pub fn new(run: Run, seed: Option<u64>) -> Self {
        TgiStream {
            run,
            seed,
            index: 0,
            text: String::new(),
            last: None,
            closed: false,
        }
    }

    pub fn into_response(self) -> Response {
        sse_response(futures::stream::unfold(self, |mut stream| async move {
            let frame = stream.next().await?;
            Some((frame, stream))
        }))
    }

    pub async fn next(&mut self) -> Option<Frame> {
        while !self.closed {
            let frame = match self.run.next().await? {
                Piece::Text { text, token } => {
                    self.text.push_str(&text);
                    let previous = match token {
                        Some(id) => self.last.replace((id, text)),
                        None => {
                            if let Some(last) = self.last.as_mut() {
                                last.1.push_str(&text);
                            }
                            None
                        }
                    };
                    let Some((id, text)) = previous else { continue };
                    self.index += 1;
                    Frame::json(&StreamResponse {
                        details: None,
                        generated_text: None,
                        index: self.index,
                        token: self.run.token(Some(id), text),
                    })
                }
                Piece::Done { finish_reason } => {
                    self.closed = true;
                    let (id, text) = self.last.take().unwrap_or((0, String::new()));
                    self.index += 1;
                    let Usage {
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } = self.run.usage();
                    Frame::json(&StreamResponse {
                        details: Some(StreamDetails {
                            finish_reason: finish_reason.tgi(),
                            generated_tokens: completion_tokens,
                            input_length: Some(prompt_tokens),
                            seed: self.seed,
                        }),
                        generated_text: Some(std::mem::take(&mut self.text)),
                        index: self.index,
                        token: self.run.token(Some(id), text),
                    })
                }
                Piece::Timeout => {
                    self.closed = true;
                    Frame::error(&ApiError::Timeout)
                }
                Piece::Failed(error) => {
                    self.closed = true;
                    Frame::error(&ApiError::Backend(error))
                }
            };
            return Some(frame);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::error::BackendError;
    use crate::generate::engine::{Event, FinishReason};
    use crate::tasks::text_generation::run::tests::{A, EOS, ONCE, TIME, UPON, finished, run};

    fn head() -> Head {
        Head {
            id: "chatcmpl-1".to_owned(),
            created: 1700000000,
            model: "llama".to_owned(),
            system_fingerprint: "0.1.0-float32-7ffe390c74".to_owned(),
        }
    }

    fn json_of(frame: &Frame) -> Value {
        serde_json::from_str(&frame.data).unwrap()
    }

    /// What a client reads from each frame, in a few words.
    fn outline(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|frame| {
                if frame.event == Some("error") {
                    return format!("error {}", json_of(frame)["error"]["code"]);
                }
                assert_eq!(frame.event, None);
                if frame.data == "[DONE]" {
                    return frame.data.clone();
                }
                let chunk = json_of(frame);
                if let Some(usage) = chunk.get("usage") {
                    assert_eq!(chunk["choices"], json!([]), "{chunk}");
                    return format!(
                        "usage {} + {} = {}",
                        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
                    );
                }
                let choice = &chunk["choices"][0];
                let mut words = match choice.get("delta") {
                    Some(delta) => {
                        assert_eq!(delta["role"], "assistant", "every delta names the role");
                        format!("delta {}", delta["content"])
                    }
                    None => format!("text {}", choice["text"]),
                };
                if let Some(reason) = choice["finish_reason"].as_str() {
                    words.push_str(&format!(" finish {reason}"));
                }
                words
            })
            .collect()
    }

    async fn openai(stream: OpenAiStream) -> Vec<Frame> {
        let mut stream = stream;
        let mut frames = Vec::new();
        while let Some(frame) = stream.next().await {
            frames.push(frame);
        }
        frames
    }

    fn once_upon_a_time(finish: FinishReason) -> Vec<Event> {
        vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            Event::Token(A),
            Event::Token(TIME),
            finished(finish),
        ]
    }

    /// A chat stream (`chat`), else a text completion's, without TGI's fields.
    fn plain(events: Vec<Event>, chat: bool, include_usage: bool) -> OpenAiStream {
        OpenAiStream::new(run(events, &[], false), head(), chat, include_usage, false)
    }

    #[tokio::test]
    async fn a_chat_stream_names_the_role_then_streams_content_then_why_it_ended_then_done() {
        let frames = openai(plain(once_upon_a_time(FinishReason::Length), true, false)).await;
        assert_eq!(
            outline(&frames),
            [
                r#"delta """#,
                r#"delta "Once""#,
                r#"delta " upon""#,
                r#"delta " a""#,
                r#"delta " time""#,
                r#"delta "" finish length"#,
                "[DONE]",
            ]
        );
        for frame in &frames[..frames.len() - 1] {
            let chunk = json_of(frame);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], "chatcmpl-1", "one id for the whole stream");
            assert_eq!(chunk["system_fingerprint"], "0.1.0-float32-7ffe390c74");
            assert!(chunk.get("token").is_none(), "no TGI fields: {chunk}");
        }
    }

    #[tokio::test]
    async fn usage_follows_the_last_choice_when_stream_options_ask_for_it() {
        let frames = openai(plain(once_upon_a_time(FinishReason::StopToken), true, true)).await;
        assert_eq!(
            outline(&frames[frames.len() - 3..]),
            [r#"delta "" finish stop"#, "usage 3 + 4 = 7", "[DONE]"]
        );
    }

    #[tokio::test]
    async fn a_text_completion_stream_begins_with_its_text() {
        let frames = openai(plain(once_upon_a_time(FinishReason::Length), false, true)).await;
        assert_eq!(
            outline(&frames),
            [
                r#"text "Once""#,
                r#"text " upon""#,
                r#"text " a""#,
                r#"text " time""#,
                r#"text "" finish length"#,
                "usage 3 + 4 = 7",
                "[DONE]",
            ]
        );
        assert!(
            frames[..frames.len() - 1]
                .iter()
                .all(|f| json_of(f)["object"] == "text_completion")
        );
    }

    #[tokio::test]
    async fn a_stop_string_ends_the_stream_as_a_normal_stop() {
        let stream = OpenAiStream::new(
            run(once_upon_a_time(FinishReason::Length), &[" a"], false),
            head(),
            true,
            true,
            false,
        );
        assert_eq!(
            outline(&openai(stream).await),
            [
                r#"delta """#,
                r#"delta "Once""#,
                r#"delta " upon""#,
                r#"delta "" finish stop"#,
                "usage 3 + 3 = 6",
                "[DONE]",
            ]
        );
    }

    #[tokio::test]
    async fn an_error_mid_stream_becomes_an_error_event_and_nothing_follows() {
        for (ending, code) in [
            (finished(FinishReason::Deadline), "\"timeout\""),
            (
                Event::Failed(BackendError::OutOfMemory("CUDA".to_owned())),
                "\"out_of_memory\"",
            ),
            (
                Event::Failed(BackendError::Tensor("shape".to_owned())),
                "\"inference_failed\"",
            ),
        ] {
            let events = vec![Event::Token(ONCE), ending];
            let frames = openai(plain(events, true, true)).await;
            assert_eq!(
                outline(&frames),
                [r#"delta """#, r#"delta "Once""#, &format!("error {code}")]
            );
        }
        // The engine went away without a word.
        let frames = openai(plain(vec![Event::Token(ONCE)], false, false)).await;
        assert_eq!(
            outline(&frames),
            [r#"text "Once""#, "error \"inference_failed\""]
        );
    }

    #[tokio::test]
    async fn a_tgi_style_chat_stream_also_speaks_tgi() {
        // " a time" is held back for a stop string that never completes, and released at the
        // end by no token of its own.
        let events = vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            Event::Token(A),
            Event::Token(TIME),
            Event::Token(EOS),
            finished(FinishReason::StopToken),
        ];
        let stream = OpenAiStream::new(
            run(events, &[" a time now"], false),
            head(),
            true,
            true,
            true,
        );
        let frames = openai(stream).await;
        assert_eq!(
            outline(&frames),
            [
                r#"delta """#,
                r#"delta "Once""#,
                r#"delta " upon""#,
                r#"delta " a time""#,
                r#"delta "" finish stop"#,
                "usage 3 + 5 = 8",
                "[DONE]",
            ]
        );
        let chunks: Vec<Value> = frames[..frames.len() - 1].iter().map(json_of).collect();
        let tgi = |chunk: &Value| {
            json!([
                chunk.get("token"),
                chunk.get("generated_text"),
                chunk.get("details")
            ])
        };
        assert_eq!(
            tgi(&chunks[0]),
            json!([null, null, null]),
            "opening: OpenAI's only"
        );
        assert_eq!(
            chunks[1]["token"],
            json!({"id": ONCE, "logprob": null, "special": false, "text": "Once"})
        );
        assert_eq!(chunks[2]["token"]["id"], UPON);
        assert_eq!(
            chunks[3]["token"],
            json!({"id": null, "logprob": null, "special": false, "text": " a time"}),
            "text no token released"
        );
        for chunk in &chunks[1..4] {
            assert_eq!(chunk["generated_text"], Value::Null);
            assert_eq!(chunk["details"], Value::Null);
            assert!(
                chunk.as_object().unwrap().contains_key("details"),
                "null, not absent"
            );
        }
        let last = &chunks[4];
        assert!(last.get("token").is_none());
        assert_eq!(last["generated_text"], "Once upon a time");
        assert_eq!(
            last["details"],
            json!({"finish_reason": "eos_token", "generated_tokens": 5, "seed": null})
        );
        assert_eq!(
            tgi(&chunks[5]),
            json!([null, null, null]),
            "usage: OpenAI's only"
        );
    }

    async fn tgi(events: Vec<Event>, stops: &[&str], seed: Option<u64>) -> Vec<Value> {
        let mut stream = TgiStream::new(run(events, stops, true), seed);
        let mut events = Vec::new();
        while let Some(frame) = stream.next().await {
            events.push(match frame.event {
                Some(name) => json!({ name: json_of(&frame) }),
                None => json_of(&frame),
            });
        }
        events
    }

    fn token(id: i64, text: &str) -> Value {
        json!({"id": id, "logprob": null, "special": id == EOS, "text": text})
    }

    #[tokio::test]
    async fn generate_stream_sends_a_token_per_event_and_the_text_and_details_with_the_last() {
        let events = vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            Event::Token(EOS),
            finished(FinishReason::StopToken),
        ];
        assert_eq!(
            tgi(events, &[], Some(7)).await,
            [
                json!({"index": 1, "token": token(ONCE, "Once"), "generated_text": null, "details": null}),
                json!({"index": 2, "token": token(UPON, " upon"), "generated_text": null, "details": null}),
                json!({
                    "index": 3, "token": token(EOS, ""), "generated_text": "Once upon",
                    "details": {"finish_reason": "eos_token", "generated_tokens": 3, "input_length": 3, "seed": 7},
                }),
            ]
        );
    }

    #[tokio::test]
    async fn generate_stream_gives_held_back_text_to_the_token_that_releases_it() {
        // " upon" waits to see whether " upon a" follows; " time" releases both.
        let events = vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            Event::Token(TIME),
            finished(FinishReason::Length),
        ];
        let events = tgi(events, &[" upon a"], None).await;
        let tokens: Vec<&Value> = events.iter().map(|e| &e["token"]).collect();
        assert_eq!(
            tokens,
            [
                &token(ONCE, "Once"),
                &token(UPON, ""),
                &token(TIME, " upon time")
            ]
        );
        assert_eq!(events[2]["generated_text"], "Once upon time");
        assert_eq!(events[2]["details"]["finish_reason"], "length");
        // Text released only at the end joins the last token's.
        let events = vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            finished(FinishReason::StopToken),
        ];
        let events = tgi(events, &[" upon a"], None).await;
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["token"], token(UPON, " upon"));
        assert_eq!(events[1]["generated_text"], "Once upon");
    }

    #[tokio::test]
    async fn generate_stream_ends_with_a_stop_sequence_or_an_error_event() {
        let events = tgi(once_upon_a_time(FinishReason::Length), &[" a"], None).await;
        let last = events.last().unwrap();
        assert_eq!(last["details"]["finish_reason"], "stop_sequence");
        assert_eq!(last["generated_text"], "Once upon");
        let events = vec![Event::Token(ONCE), finished(FinishReason::Deadline)];
        assert_eq!(
            tgi(events, &[], None).await,
            [json!({"error": {"error": {
                "code": "timeout",
                "message": "the request did not complete within its OICM-Request-Timeout deadline",
                "type": "timeout_error",
            }}})],
            "the token still held is not sent"
        );
    }

    #[tokio::test]
    async fn frames_go_out_as_server_sent_events_that_proxies_do_not_buffer() {
        let events = vec![Event::Token(ONCE), finished(FinishReason::Deadline)];
        let response = plain(events, false, false).into_response();
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            concat!(
                r#"data: {"choices":[{"finish_reason":null,"index":0,"logprobs":null,"text":"Once"}],"created":1700000000,"id":"chatcmpl-1","model":"llama","object":"text_completion","system_fingerprint":"0.1.0-float32-7ffe390c74"}"#,
                "\n\n",
                "event: error\n",
                r#"data: {"error":{"code":"timeout","message":"the request did not complete within its OICM-Request-Timeout deadline","type":"timeout_error"}}"#,
                "\n\n",
            )
        );
        let done = plain(vec![finished(FinishReason::Length)], false, false).into_response();
        let body = axum::body::to_bytes(done.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(body.ends_with(b"\n\ndata: [DONE]\n\n"), "{body:?}");
    }
}
