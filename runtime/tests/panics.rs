//! A model that panics mid-pass (libtorch turns CUDA out of memory and shape errors into
//! panics) fails the requests of that pass with a 500 that names the failure; the model thread
//! and the process live on, and the next request is served. Shown for an encoder task over HTTP
//! and for text generation's scheduler, each with its real model wrapped in one that panics on
//! a marked token.

mod support;

use std::sync::Arc;
use std::time::Duration;

use runtime::encoder::{Encoder, EncoderFront, EncoderModel, PaddedBatch};
use runtime::error::BackendError;
use runtime::executor::Executor;
use runtime::generate::engine::{
    Decoder, Engine, EngineLimits, Event, FinishReason, StopRule, Submission,
};
use runtime::generate::sampling::SamplingParams;
use runtime::metrics::Metrics;
use runtime::models::llama::{LlamaModel, Logits, Placement};
use runtime::models::pooling::Pooling;
use runtime::settings::Settings;
use runtime::tasks::embedding::backend::EmbeddingBackend;
use runtime::tasks::embedding::http::{EmbeddingTask, routes};
use runtime::tasks::text_encoder;
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};
use tokio::sync::watch;

/// A token id the fixtures' vocabularies have, and no test prompt uses.
const MARK: i64 = 120;

/// The real model, except that a pass holding `MARK` panics.
struct PanicsOnMark<M>(M);

impl<M: EncoderModel> EncoderModel for PanicsOnMark<M> {
    fn forward(&mut self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, BackendError> {
        assert!(
            !batch.input_ids.contains(&MARK),
            "a marked input reached the encoder"
        );
        self.0.forward(batch)
    }

    fn pad_id(&self) -> i64 {
        self.0.pad_id()
    }
}

impl<M: Decoder> Decoder for PanicsOnMark<M> {
    type Cache = M::Cache;

    fn new_cache(&self, slots: i64, positions: i64) -> Self::Cache {
        self.0.new_cache(slots, positions)
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn forward(
        &self,
        tokens: &Tensor,
        placements: &[Placement],
        cache: &mut Self::Cache,
        logits: Logits<'_>,
    ) -> Tensor {
        let marked = tokens.eq(MARK).any().int64_value(&[]) != 0;
        assert!(!marked, "a marked prompt reached the decoder");
        self.0.forward(tokens, placements, cache, logits)
    }
}

fn settings(task: &str, dir: &std::path::Path) -> Settings {
    use clap::Parser;
    let args = runtime::settings::Args::parse_from([
        "infergate-runtime",
        "--task",
        task,
        "--model-dir",
        dir.to_str().unwrap(),
    ]);
    let task = args.task.unwrap();
    Settings::resolve(args, task, dir.to_owned(), Device::Cpu).unwrap()
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_pass_that_panics_answers_500_and_the_next_request_is_served() {
    let dir = support::fixture_dir();
    let settings = settings("embedding", &dir);
    let (encoder, _) = text_encoder(&dir).unwrap();
    let (ready, mut loaded) = watch::channel(false);
    let model_dir = dir.clone();
    let load = move || {
        EmbeddingBackend::load(&model_dir, Device::Cpu, Kind::Float, Pooling::Mean)
            .map(|backend| Encoder(PanicsOnMark(backend)))
    };
    let (executor, model_thread) = Executor::start(load, settings.batch, Metrics::new(), ready);
    let task = EmbeddingTask {
        front: EncoderFront {
            executor,
            tokenizer: encoder,
            max_client_batch_size: 32,
        },
        model_id: "bert".to_owned(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/embed", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, routes().with_state(Arc::new(task)))
            .await
            .unwrap()
    });
    loaded.wait_for(|ready| *ready).await.unwrap();

    let (status, body) = post(&url, json!({"inputs": [[2, MARK, 3]]})).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "model_panicked");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("a marked input reached the encoder"),
        "names the failure: {message}"
    );

    let (status, body) = post(&url, json!({"inputs": "the model thread lives on"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body[0].as_array().unwrap().is_empty(),
        "an embedding: {body}"
    );
    assert!(!model_thread.is_finished());
}

fn submission(prompt: Vec<i64>) -> Submission {
    Submission {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopRule {
            max_new_tokens: 4,
            stop_token_ids: Vec::new(),
        },
        deadline: None,
    }
}

async fn events(engine: &Engine, prompt: Vec<i64>) -> Vec<Event> {
    let mut receiver = engine.submit(submission(prompt)).unwrap();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(120), receiver.recv())
        .await
        .expect("the engine answers")
    {
        events.push(event);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoding_step_that_panics_fails_its_sequences_and_the_next_is_generated() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama");
    let settings = settings("text-generation", &dir);
    let limits = EngineLimits {
        max_running_sequences: 4,
        max_sequence_tokens: 64,
        max_concurrent_requests: 8,
        max_prefill_tokens: 256,
        queue: None,
    };
    let (ready, mut loaded) = watch::channel(false);
    let load = move || LlamaModel::load(&dir, Device::Cpu, settings.kind).map(PanicsOnMark);
    let (engine, model_thread) = Engine::start(load, limits, Metrics::new(), ready);
    loaded.wait_for(|ready| *ready).await.unwrap();

    let failed = events(&engine, vec![1, MARK, 5]).await;
    match failed.as_slice() {
        [Event::Failed(BackendError::Panicked(message))] => {
            assert!(
                message.contains("a marked prompt reached the decoder"),
                "{message}"
            )
        }
        other => panic!("expected one failure naming the panic, got {other:?}"),
    }

    let generated = events(&engine, vec![1, 5, 9]).await;
    let tokens = generated
        .iter()
        .filter(|event| matches!(event, Event::Token(_)))
        .count();
    assert_eq!(tokens, 4, "{generated:?}");
    assert!(matches!(
        generated.last(),
        Some(Event::Finished {
            reason: FinishReason::Length,
            ..
        })
    ));
    assert!(!model_thread.is_finished());
}
