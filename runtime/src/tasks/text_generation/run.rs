//! One request on the engine, as text: the engine's token ids go through the incremental
//! decoder and the stop strings, and come out as the pieces of the answer, in order.

use crate::usage::Meter;
use internal_token::usage::Unit;
use std::collections::VecDeque;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::wire::{FinishReason, TgiFinishReason, Token, Usage};
use crate::error::{ApiError, BackendError};
use crate::generate::engine::{self, Event};
use crate::generate::text::{IncrementalDecoder, StopStrings};

/// A piece of the answer, in order: text pieces, then exactly one of the others.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text safe to show. `token` is the id that released it; `None` for text released only
    /// when the answer ends.
    Text {
        text: String,
        token: Option<i64>,
    },
    Done {
        finish_reason: Finish,
    },
    Timeout,
    Failed(BackendError),
}

/// Why the answer ended, in the words of each API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    StopToken,
    StopString,
    Length,
}

impl Finish {
    pub fn openai(self) -> FinishReason {
        match self {
            Finish::StopToken | Finish::StopString => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
        }
    }

    pub fn tgi(self) -> TgiFinishReason {
        match self {
            Finish::StopToken => TgiFinishReason::EosToken,
            Finish::StopString => TgiFinishReason::StopSequence,
            Finish::Length => TgiFinishReason::Length,
        }
    }
}

/// The whole answer of a run that finished.
#[derive(Debug)]
pub struct Answer {
    pub text: String,
    /// Each generated token with the text it released (TGI's `details.tokens`).
    pub tokens: Vec<(i64, String)>,
    pub finish: Finish,
    pub usage: Usage,
}

/// One running request, as the answer needs it.
#[derive(Debug)]
pub struct Run {
    tokenizer: Arc<Tokenizer>,
    events: mpsc::UnboundedReceiver<Event>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    /// TGI streams one event per token, even while its text is held back.
    every_token: bool,
    pieces: VecDeque<Piece>,
    finished: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// The request's usage report, which a stream fills after its handler has returned.
    meter: Option<Arc<Meter>>,
}

impl Run {
    pub fn new(
        events: mpsc::UnboundedReceiver<Event>,
        tokenizer: Arc<Tokenizer>,
        stop_strings: Vec<String>,
        every_token: bool,
        prompt_tokens: usize,
    ) -> Run {
        let meter = crate::usage::current();
        if let Some(meter) = &meter {
            meter.add(Unit::PromptTokens, prompt_tokens as f64);
        }
        Run {
            tokenizer,
            events,
            decoder: IncrementalDecoder::default(),
            stops: StopStrings::new(stop_strings),
            every_token,
            pieces: VecDeque::new(),
            finished: false,
            prompt_tokens,
            completion_tokens: 0,
            meter,
        }
    }

    /// The next piece: text as soon as it is safe to show, then the ending.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.pieces.pop_front() {
                return Some(piece);
            }
            if self.finished {
                return None;
            }
            let event = self.events.recv().await;
            self.take(event);
        }
    }

    /// Turns one engine event (`None`: the engine dropped the request) into pieces.
    fn take(&mut self, event: Option<Event>) {
        let Some(event) = event else {
            self.finished = true;
            self.pieces.push_back(Piece::Failed(BackendError::Output(
                "the model thread stopped".to_owned(),
            )));
            return;
        };
        match event {
            Event::Token(token) => {
                self.completion_tokens += 1;
                if let Some(meter) = &self.meter {
                    meter.add(Unit::CompletionTokens, 1.0);
                }
                let delta = self.decoder.push(&self.tokenizer, token);
                let released = self.stops.push(&delta);
                if !released.text.is_empty() || self.every_token {
                    self.pieces.push_back(Piece::Text {
                        text: released.text,
                        token: Some(token),
                    });
                }
                if released.stopped {
                    // Closing the receiver stops the sequence before the next step.
                    self.events.close();
                    self.finished = true;
                    self.pieces.push_back(Piece::Done {
                        finish_reason: Finish::StopString,
                    });
                }
            }
            Event::Finished { reason, .. } => {
                self.finished = true;
                let tail = self.decoder.finish(&self.tokenizer);
                let released = self.stops.push(&tail);
                let mut rest = released.text;
                if !released.stopped {
                    rest.push_str(&self.stops.finish());
                }
                if !rest.is_empty() {
                    self.pieces.push_back(Piece::Text {
                        text: rest,
                        token: None,
                    });
                }
                self.pieces.push_back(match (reason, released.stopped) {
                    (_, true) => Piece::Done {
                        finish_reason: Finish::StopString,
                    },
                    (engine::FinishReason::Deadline, _) => Piece::Timeout,
                    (engine::FinishReason::StopToken, _) => Piece::Done {
                        finish_reason: Finish::StopToken,
                    },
                    (engine::FinishReason::Length, _) => Piece::Done {
                        finish_reason: Finish::Length,
                    },
                });
            }
            Event::Failed(error) => {
                self.finished = true;
                self.pieces.push_back(Piece::Failed(error));
            }
        }
    }

    /// The whole answer, once it ends.
    pub async fn collect(mut self) -> Result<Answer, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(piece) = self.next().await {
            match piece {
                Piece::Text { text: t, token } => {
                    if let Some(token) = token {
                        tokens.push((token, t.clone()));
                    }
                    text.push_str(&t);
                }
                Piece::Done { finish_reason } => {
                    return Ok(Answer {
                        text,
                        tokens,
                        finish: finish_reason,
                        usage: self.usage(),
                    });
                }
                Piece::Timeout => return Err(ApiError::Timeout),
                Piece::Failed(error) => return Err(ApiError::Backend(error)),
            }
        }
        Err(ApiError::Backend(BackendError::Output(
            "the answer ended without a reason".to_owned(),
        )))
    }

    /// The tokens so far: the prompt's, and those generated (stop strings' included).
    pub fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.completion_tokens)
    }

    /// TGI's view of a token that released `text`.
    pub fn token(&self, id: Option<i64>, text: String) -> Token {
        token(&self.tokenizer, id, text)
    }
}

/// TGI's view of a token that released `text`: `special` as the tokenizer marks it.
pub fn token(tokenizer: &Tokenizer, id: Option<i64>, text: String) -> Token {
    let special = id.is_some_and(|id| {
        tokenizer
            .id_to_token(u32::try_from(id).unwrap_or(u32::MAX))
            .is_some_and(|t| tokenizer.get_added_vocabulary().is_special_token(&t))
    });
    Token {
        id,
        logprob: (),
        special,
        text,
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A word-level tokenizer: ids 0-4 are the words below, 5 is the special `</s>`. Decoding
    /// joins words with spaces, so each word after the first adds " word".
    pub fn tokenizer() -> Arc<Tokenizer> {
        let json = r#"{
            "version": "1.0",
            "added_tokens": [{"id": 5, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "Once": 1, "upon": 2, "a": 3, "time": 4, "</s>": 5}}
        }"#;
        Arc::new(Tokenizer::from_bytes(json).unwrap())
    }

    pub const ONCE: i64 = 1;
    pub const UPON: i64 = 2;
    pub const A: i64 = 3;
    pub const TIME: i64 = 4;
    pub const EOS: i64 = 5;

    pub fn finished(reason: engine::FinishReason) -> Event {
        Event::Finished {
            reason,
            prompt_tokens: 3,
            generated_tokens: 0,
        }
    }

    /// A run whose engine already sent `events` (and then hung up unless one ended it).
    pub fn run(events: Vec<Event>, stops: &[&str], every_token: bool) -> Run {
        let (sender, receiver) = mpsc::unbounded_channel();
        for event in events {
            sender.send(event).unwrap();
        }
        Run::new(
            receiver,
            tokenizer(),
            stops.iter().map(|s| s.to_string()).collect(),
            every_token,
            3,
        )
    }

    async fn pieces(mut run: Run) -> Vec<Piece> {
        let mut pieces = Vec::new();
        while let Some(piece) = run.next().await {
            pieces.push(piece);
        }
        pieces
    }

    fn text(text: &str, token: Option<i64>) -> Piece {
        Piece::Text {
            text: text.to_owned(),
            token,
        }
    }

    #[tokio::test]
    async fn tokens_become_text_then_the_ending() {
        let run = run(
            vec![
                Event::Token(ONCE),
                Event::Token(UPON),
                finished(engine::FinishReason::Length),
            ],
            &[],
            false,
        );
        assert_eq!(
            pieces(run).await,
            [
                text("Once", Some(ONCE)),
                text(" upon", Some(UPON)),
                Piece::Done {
                    finish_reason: Finish::Length
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_stop_string_ends_the_text_right_before_it_and_stops_the_sequence() {
        let run = run(
            vec![Event::Token(ONCE), Event::Token(UPON), Event::Token(A)],
            &[" upon"],
            false,
        );
        // The engine sent a third token before it saw the receiver closed: it is not read.
        assert_eq!(
            pieces(run).await,
            [
                text("Once", Some(ONCE)),
                Piece::Done {
                    finish_reason: Finish::StopString
                },
            ]
        );
    }

    #[tokio::test]
    async fn text_held_back_for_a_stop_string_that_never_completes_is_released_at_the_end() {
        let events = vec![
            Event::Token(ONCE),
            Event::Token(UPON),
            finished(engine::FinishReason::StopToken),
        ];
        assert_eq!(
            pieces(run(events.clone(), &[" upon a"], false)).await,
            [
                text("Once", Some(ONCE)),
                text(" upon", None),
                Piece::Done {
                    finish_reason: Finish::StopToken
                },
            ]
        );
        // TGI's streams get a piece for every token, even an empty one.
        assert_eq!(
            pieces(run(events, &[" upon a"], true)).await,
            [
                text("Once", Some(ONCE)),
                text("", Some(UPON)),
                text(" upon", None),
                Piece::Done {
                    finish_reason: Finish::StopToken
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_passed_deadline_a_failure_and_a_vanished_engine_end_without_a_reason() {
        let timeout = run(vec![finished(engine::FinishReason::Deadline)], &[], false);
        assert_eq!(pieces(timeout).await, [Piece::Timeout]);
        let failure = BackendError::OutOfMemory("CUDA".to_owned());
        let failed = run(vec![Event::Failed(failure.clone())], &[], false);
        assert_eq!(pieces(failed).await, [Piece::Failed(failure)]);
        let vanished = run(vec![Event::Token(ONCE)], &[], false);
        assert_eq!(
            pieces(vanished).await,
            [
                text("Once", Some(ONCE)),
                Piece::Failed(BackendError::Output("the model thread stopped".to_owned())),
            ]
        );
    }

    #[tokio::test]
    async fn the_whole_answer_has_its_text_tokens_reason_and_usage() {
        let run = run(
            vec![
                Event::Token(ONCE),
                Event::Token(UPON),
                Event::Token(EOS),
                finished(engine::FinishReason::StopToken),
            ],
            &[],
            true,
        );
        let answer = run.collect().await.unwrap();
        assert_eq!(answer.text, "Once upon");
        assert_eq!(
            answer.tokens,
            [
                (ONCE, "Once".to_owned()),
                (UPON, " upon".to_owned()),
                (EOS, String::new()),
            ]
        );
        assert_eq!(answer.finish, Finish::StopToken);
        assert_eq!(answer.usage, Usage::new(3, 3));
    }

    #[tokio::test]
    async fn a_whole_answer_that_cannot_finish_is_an_error() {
        let timeout = run(vec![finished(engine::FinishReason::Deadline)], &[], false);
        assert!(matches!(timeout.collect().await, Err(ApiError::Timeout)));
        let failed = run(vec![Event::Failed(BackendError::Abandoned)], &[], false);
        assert!(matches!(
            failed.collect().await,
            Err(ApiError::Backend(BackendError::Abandoned))
        ));
    }

    #[test]
    fn each_api_names_the_ending_in_its_own_words() {
        assert_eq!(Finish::StopToken.openai(), FinishReason::Stop);
        assert_eq!(Finish::StopString.openai(), FinishReason::Stop);
        assert_eq!(Finish::Length.openai(), FinishReason::Length);
        assert_eq!(Finish::StopToken.tgi(), TgiFinishReason::EosToken);
        assert_eq!(Finish::StopString.tgi(), TgiFinishReason::StopSequence);
        assert_eq!(Finish::Length.tgi(), TgiFinishReason::Length);
    }

    #[test]
    fn tgi_tokens_say_whether_the_tokenizer_marks_them_special() {
        let tokenizer = tokenizer();
        assert!(token(&tokenizer, Some(EOS), String::new()).special);
        assert!(!token(&tokenizer, Some(TIME), " time".to_owned()).special);
        assert!(!token(&tokenizer, None, " time".to_owned()).special);
        assert!(!token(&tokenizer, Some(-1), String::new()).special);
    }
}
