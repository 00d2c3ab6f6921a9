//! The continuous-batching scheduler: one model thread owns the decoder and its KV cache and
//! loops over steps. Between steps, new sequences are admitted (prefilled into a free cache
//! slot, up to a budget of prompt tokens per step so decoding never stalls behind long
//! prompts) and finished ones leave; each step decodes one token for every running sequence in
//! a single batch. A sequence whose client went away (its event receiver dropped) or whose
//! deadline passed is stopped before the next step, so no token is computed for it after that.
//!
//! Memory for keys and values is fixed at start: `max_running_sequences` slots of `max_sequence_tokens`
//! positions. When every slot is taken, new sequences wait; beyond `max_concurrent_requests` in flight, or
//! when the slowdown rule (`admission`) predicts a sequence too slow, submission is refused
//! (429).

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Kind, Tensor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::admission::{Board, Commitment};
use super::sampling::{SamplingParams, SeededRng, sample};
use crate::admission::Slowdown;
use crate::error::{ApiError, BackendError};
use crate::executor::panic_message;
use crate::metrics::Metrics;
use crate::models::llama::{KvCache, LlamaModel, Logits, Placement};

/// What the scheduler drives: a decoder whose keys and values live in a cache of fixed slots.
/// The model thread's panics in `forward` (CUDA out of memory, a shape error) fail the step's
/// sequences; the scheduler goes on.
pub trait Decoder: 'static {
    type Cache;

    /// A cache of `slots` sequences of up to `positions` tokens each.
    fn new_cache(&self, slots: i64, positions: i64) -> Self::Cache;

    fn device(&self) -> tch::Device;

    /// Runs `tokens` [rows, length], row `i` placed in the cache at `placements[i]`.
    fn forward(
        &self,
        tokens: &Tensor,
        placements: &[Placement],
        cache: &mut Self::Cache,
        logits: Logits<'_>,
    ) -> Tensor;
}

impl Decoder for LlamaModel {
    type Cache = KvCache;

    fn new_cache(&self, slots: i64, positions: i64) -> KvCache {
        LlamaModel::new_cache(self, slots, positions)
    }

    fn device(&self) -> tch::Device {
        LlamaModel::device(self)
    }

    fn forward(
        &self,
        tokens: &Tensor,
        placements: &[Placement],
        cache: &mut KvCache,
        logits: Logits<'_>,
    ) -> Tensor {
        LlamaModel::forward(self, tokens, placements, cache, logits)
    }
}

/// Sizes of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences decoded together (KV cache slots).
    pub max_running_sequences: usize,
    /// Prompt plus generated tokens of one sequence (positions per slot).
    pub max_sequence_tokens: usize,
    /// Sequences admitted at once, running or waiting; more get 429.
    pub max_concurrent_requests: usize,
    /// Prompt tokens prefilled per step before the running batch decodes again.
    pub max_prefill_tokens: usize,
    /// Largest predicted completion over time alone a sequence is taken at; `None`: count only.
    pub max_slowdown: Option<Slowdown>,
}

/// When a sequence stops, besides its client leaving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopRule {
    pub max_new_tokens: usize,
    /// Token ids that end the sequence (EOS unless ignored, plus the request's).
    pub stop_token_ids: Vec<i64>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (not included in the output).
    StopToken,
    /// `max_new_tokens`, or the slot is full.
    Length,
    /// The request's deadline passed.
    Deadline,
}

/// What the engine sends a request, in order: tokens, then one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Token(i64),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        generated_tokens: usize,
    },
    Failed(BackendError),
}

/// One sequence to generate.
#[derive(Debug)]
pub struct Submission {
    pub prompt: Vec<i64>,
    pub sampling: SamplingParams,
    pub stop: StopRule,
    pub deadline: Option<Instant>,
}

struct Queued {
    submission: Submission,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    admission: OwnedSemaphorePermit,
    /// Its number on the board and what it was taken with.
    number: u64,
    commitment: Commitment,
}

struct Running {
    slot: i64,
    tokens: Vec<i64>,
    prompt_len: usize,
    sampling: SamplingParams,
    rng: SeededRng,
    stop: StopRule,
    deadline: Option<Instant>,
    events: mpsc::UnboundedSender<Event>,
    last_token_at: Instant,
    admission: OwnedSemaphorePermit,
    promise: Option<Instant>,
}

impl Running {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn steps_left(&self, max_sequence_tokens: usize) -> usize {
        (self.stop.max_new_tokens.saturating_sub(self.generated()))
            .min(max_sequence_tokens.saturating_sub(self.tokens.len()))
    }
}

/// A poisoned board only means a thread panicked mid-update of estimates; they still serve.
fn lock(board: &Mutex<Board>) -> MutexGuard<'_, Board> {
    board
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The async side: submits sequences to the model thread.
#[derive(Debug, Clone)]
pub struct Engine {
    submissions: std_mpsc::Sender<QueuedHandle>,
    admission: Arc<Semaphore>,
    board: Arc<Mutex<Board>>,
    pub limits: EngineLimits,
}

/// `Queued` without its `Debug`-less parts exposed; what crosses the channel.
struct QueuedHandle(Queued);

impl std::fmt::Debug for QueuedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

impl Engine {
    /// Starts the model thread: `load` builds the decoder there; `/health` turns ready after.
    pub fn start<M, L>(
        load: L,
        limits: EngineLimits,
        metrics: Metrics,
        ready: watch::Sender<bool>,
    ) -> (Engine, JoinHandle<Result<(), String>>)
    where
        M: Decoder,
        L: FnOnce() -> Result<M, String> + Send + 'static,
    {
        let (submissions, receiver) = std_mpsc::channel::<QueuedHandle>();
        let board = Arc::new(Mutex::new(Board::default()));
        let scheduler_board = board.clone();
        let thread = std::thread::Builder::new()
            .name("model".to_owned())
            .spawn(move || {
                let model = load()?;
                let cache = model.new_cache(
                    limits.max_running_sequences as i64,
                    limits.max_sequence_tokens as i64,
                );
                let _ = ready.send(true);
                tch::no_grad(|| {
                    Scheduler::new(model, cache, limits, metrics, scheduler_board).run(receiver)
                });
                Ok(())
            })
            .expect("spawning the model thread");
        let engine = Engine {
            submissions,
            admission: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            board,
            limits,
        };
        (engine, thread)
    }

    /// Queues `submission`; its events arrive on the returned receiver. Dropping the receiver
    /// stops the sequence at the next step.
    pub fn submit(
        &self,
        submission: Submission,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)?;
        let steps = submission.stop.max_new_tokens.min(
            self.limits
                .max_sequence_tokens
                .saturating_sub(submission.prompt.len()),
        );
        let now = Instant::now();
        let (number, commitment) = {
            let mut board = lock(&self.board);
            match self.limits.max_slowdown {
                Some(slowdown) => board.admit(
                    submission.prompt.len(),
                    steps,
                    slowdown,
                    self.limits.max_running_sequences,
                    now,
                )?,
                None => (
                    0,
                    Commitment {
                        steps_left: steps,
                        prompt_tokens: submission.prompt.len(),
                        promise: None,
                    },
                ),
            }
        };
        let (events, receiver) = mpsc::unbounded_channel();
        let queued = Queued {
            submission,
            events,
            submitted: now,
            admission: permit,
            number,
            commitment,
        };
        self.submissions
            .send(QueuedHandle(queued))
            .map_err(|_| ApiError::ShuttingDown)?;
        Ok(receiver)
    }
}

struct Scheduler<M: Decoder> {
    model: M,
    cache: M::Cache,
    limits: EngineLimits,
    metrics: Metrics,
    board: Arc<Mutex<Board>>,
    free_slots: Vec<i64>,
    waiting: VecDeque<Queued>,
    running: Vec<Running>,
}

impl<M: Decoder> Scheduler<M> {
    fn new(
        model: M,
        cache: M::Cache,
        limits: EngineLimits,
        metrics: Metrics,
        board: Arc<Mutex<Board>>,
    ) -> Self {
        Scheduler {
            model,
            cache,
            metrics,
            board,
            free_slots: (0..limits.max_running_sequences as i64).rev().collect(),
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    fn run(mut self, receiver: std_mpsc::Receiver<QueuedHandle>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match receiver.recv() {
                    Ok(QueuedHandle(queued)) => self.receive(queued),
                    Err(_) => return,
                }
            }
            while let Ok(QueuedHandle(queued)) = receiver.try_recv() {
                self.receive(queued);
            }
            self.drop_abandoned();
            self.admit();
            self.decode();
            self.publish();
            self.metrics.running.set(self.running.len() as i64);
            self.metrics.waiting.set(self.waiting.len() as i64);
        }
    }

    /// Takes a submission into the waiting queue, on the board as well.
    fn receive(&mut self, queued: Queued) {
        let mut board = lock(&self.board);
        if board.submitted.remove(&queued.number).is_some() {
            board.waiting.push(queued.commitment);
        }
        drop(board);
        self.waiting.push_back(queued);
    }

    /// Puts the running and waiting sequences on the board for admission to read.
    fn publish(&self) {
        let max_sequence_tokens = self.limits.max_sequence_tokens;
        let mut board = lock(&self.board);
        board.running = self
            .running
            .iter()
            .map(|sequence| Commitment {
                steps_left: sequence.steps_left(max_sequence_tokens),
                prompt_tokens: 0,
                promise: sequence.promise,
            })
            .collect();
        board.waiting = self.waiting.iter().map(|q| q.commitment).collect();
        if board.running.is_empty() && board.waiting.is_empty() && board.submitted.is_empty() {
            board.busy.went_idle(Instant::now());
        }
    }

    /// Ends sequences nobody waits for, or whose deadline passed, before spending a step on them.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let expired = |deadline: Option<Instant>| deadline.is_some_and(|d| d <= now);
        let metrics = &self.metrics;
        self.waiting.retain(|queued| {
            if queued.events.is_closed() {
                metrics.dropped.inc();
                return false;
            }
            if expired(queued.submission.deadline) {
                let _ = queued.events.send(Event::Finished {
                    reason: FinishReason::Deadline,
                    prompt_tokens: queued.submission.prompt.len(),
                    generated_tokens: 0,
                });
                return false;
            }
            true
        });
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &self.running[index];
            if sequence.events.is_closed() {
                self.metrics.abandoned.inc();
                self.free(index, None);
            } else if expired(sequence.deadline) {
                self.metrics.abandoned.inc();
                self.free(index, Some(FinishReason::Deadline));
            } else {
                index += 1;
            }
        }
    }

    /// Removes running sequence `index`, telling its client why when there is one to tell.
    fn free(&mut self, index: usize, reason: Option<FinishReason>) {
        let sequence = self.running.swap_remove(index);
        let generated_tokens = sequence.generated();
        let Running {
            slot,
            prompt_len,
            events,
            admission,
            ..
        } = sequence;
        // The admission slot is free before the client hears the end, so its next request
        // finds it free.
        drop(admission);
        if let Some(reason) = reason {
            let _ = events.send(Event::Finished {
                reason,
                prompt_tokens: prompt_len,
                generated_tokens,
            });
        }
        self.free_slots.push(slot);
    }

    /// Prefills waiting sequences into free slots in one forward pass, within the per-step
    /// budget of (padded) prompt tokens; always at least one, so a prompt longer than the
    /// budget still runs.
    fn admit(&mut self) {
        let budget = self.limits.max_prefill_tokens;
        let mut chosen: Vec<Queued> = Vec::new();
        let mut longest = 0;
        while let Some(queued) = self.waiting.front() {
            let len = queued.submission.prompt.len();
            let padded = (chosen.len() + 1) * longest.max(len);
            if chosen.len() == self.free_slots.len() || (!chosen.is_empty() && padded > budget) {
                break;
            }
            longest = longest.max(len);
            chosen.push(self.waiting.pop_front().expect("front exists"));
        }
        if !chosen.is_empty() {
            self.prefill(chosen, longest);
        }
    }

    fn prefill(&mut self, batch: Vec<Queued>, longest: usize) {
        let slots: Vec<i64> = batch
            .iter()
            .map(|_| self.free_slots.pop().expect("a free slot per sequence"))
            .collect();
        for queued in &batch {
            self.metrics
                .queue_seconds
                .observe(queued.submitted.elapsed().as_secs_f64());
        }
        let padded: Vec<i64> = batch
            .iter()
            .flat_map(|q| {
                let prompt = &q.submission.prompt;
                prompt
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - prompt.len()))
            })
            .collect();
        let last: Vec<i64> = batch
            .iter()
            .map(|q| q.submission.prompt.len() as i64 - 1)
            .collect();
        let placements: Vec<Placement> = slots
            .iter()
            .map(|&slot| Placement { slot, start: 0 })
            .collect();
        let started = Instant::now();
        let tokens = Tensor::from_slice(&padded)
            .view([batch.len() as i64, longest as i64])
            .to_device(self.model.device());
        let forward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model
                .forward(&tokens, &placements, &mut self.cache, Logits::At(&last))
        }));
        let logits = match forward {
            Ok(logits) => logits,
            Err(panic) => {
                let error = failed_pass(panic.as_ref(), &self.metrics);
                for queued in batch {
                    let _ = queued.events.send(Event::Failed(error.clone()));
                }
                self.free_slots.extend(slots);
                return;
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.inference_seconds.observe(seconds);
        self.metrics.batch_tokens.observe(padded.len() as f64);
        lock(&self.board)
            .prefill_cost
            .observe(padded.len() as f64, seconds);
        let mut sequences = Vec::with_capacity(batch.len());
        let mut submitted_at = Vec::with_capacity(batch.len());
        for (queued, slot) in batch.into_iter().zip(slots) {
            let Queued {
                submission,
                events,
                submitted,
                admission,
                commitment,
                ..
            } = queued;
            self.metrics
                .prompt_tokens
                .inc_by(submission.prompt.len() as u64);
            submitted_at.push(submitted);
            sequences.push(Running {
                slot,
                prompt_len: submission.prompt.len(),
                tokens: submission.prompt,
                rng: SeededRng::new(submission.sampling.seed),
                sampling: submission.sampling,
                stop: submission.stop,
                deadline: submission.deadline,
                events,
                last_token_at: Instant::now(),
                admission,
                promise: commitment.promise,
            });
        }
        let first_tokens = choose(&logits, &mut sequences);
        for ((sequence, token), submitted) in
            sequences.into_iter().zip(first_tokens).zip(submitted_at)
        {
            self.metrics
                .time_to_first_token
                .observe(submitted.elapsed().as_secs_f64());
            self.running.push(sequence);
            let index = self.running.len() - 1;
            self.accept(index, token);
        }
    }

    /// One decode step of every running sequence.
    fn decode(&mut self) {
        // Sequences admitted this step already have their first token; all decode together.
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let last: Vec<i64> = self
            .running
            .iter()
            .map(|s| *s.tokens.last().expect("a token"))
            .collect();
        let placements: Vec<Placement> = self
            .running
            .iter()
            .map(|s| Placement {
                slot: s.slot,
                start: s.tokens.len() as i64 - 1,
            })
            .collect();
        let tokens = Tensor::from_slice(&last)
            .to_device(self.model.device())
            .unsqueeze(1);
        let forward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model
                .forward(&tokens, &placements, &mut self.cache, Logits::Last)
        }));
        let logits = match forward {
            Ok(logits) => logits,
            Err(panic) => {
                let error = failed_pass(panic.as_ref(), &self.metrics);
                for sequence in self.running.drain(..) {
                    let _ = sequence.events.send(Event::Failed(error.clone()));
                    self.free_slots.push(sequence.slot);
                }
                return;
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.inference_seconds.observe(seconds);
        self.metrics
            .batch_sequences
            .observe(self.running.len() as f64);
        lock(&self.board)
            .step_times
            .observe(self.running.len(), seconds);
        let chosen = choose(&logits, &mut self.running);
        // Backwards, so that freeing (swap_remove) never moves a sequence not yet visited.
        for index in (0..self.running.len()).rev() {
            self.accept(index, chosen[index]);
        }
    }

    /// Appends `token` to running sequence `index` and sends it, or ends the sequence.
    fn accept(&mut self, index: usize, token: i64) {
        let sequence = &mut self.running[index];
        let now = Instant::now();
        if sequence.generated() > 0 {
            self.metrics
                .time_per_output_token
                .observe(now.duration_since(sequence.last_token_at).as_secs_f64());
        }
        sequence.last_token_at = now;
        if sequence.stop.stop_token_ids.contains(&token) {
            self.free(index, Some(FinishReason::StopToken));
            return;
        }
        sequence.tokens.push(token);
        self.metrics.generated_tokens.inc();
        let _ = sequence.events.send(Event::Token(token));
        let full = sequence.tokens.len() >= self.limits.max_sequence_tokens;
        if sequence.generated() >= sequence.stop.max_new_tokens || full {
            self.free(index, Some(FinishReason::Length));
        }
    }
}

/// The next token of each sequence from its row of `logits` [rows, vocab].
fn choose(logits: &Tensor, sequences: &mut [Running]) -> Vec<i64> {
    if sequences.iter().all(|s| s.sampling.is_plain_argmax()) {
        return Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))
            .expect("argmax is a vector of ids");
    }
    let (rows, vocab) = logits.size2().expect("logits are [rows, vocab]");
    let mut host = vec![0f32; (rows * vocab) as usize];
    logits
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous()
        .copy_data(&mut host, (rows * vocab) as usize);
    sequences
        .iter_mut()
        .zip(host.chunks_mut(vocab as usize))
        .map(|(sequence, row)| sample(row, &sequence.sampling, &sequence.tokens, &mut sequence.rng))
        .collect()
}

/// A step that panicked: its sequences fail, the scheduler goes on.
fn failed_pass(panic: &(dyn std::any::Any + Send), metrics: &Metrics) -> BackendError {
    let error = BackendError::from_panic(panic_message(panic));
    tracing::error!(%error, "a decoding step panicked; its sequences fail, the model thread goes on");
    metrics.panics.inc();
    error
}
