//! Continuous batching, as a backend of the executor (`crate::executor::StepBackend`): the
//! model thread owns the decoder and its KV cache, and each pass (a step) prefills the
//! sequences starting in it into free cache slots, up to a budget of prompt tokens so decoding
//! never stalls behind long prompts, then decodes one token for every running sequence in a
//! single batch. Finished sequences leave between steps. A sequence whose client went away (its
//! event receiver dropped) or whose deadline passed is stopped before the next step, so no
//! token is computed for it after that; the executor does the same for those still waiting.
//!
//! Memory for keys and values is fixed at start: `max_running_sequences` slots of
//! `max_sequence_tokens` positions. When every slot is taken, new sequences wait; beyond
//! `max_concurrent_requests` in flight, or when the time rule (`admission`) predicts a
//! sequence would wait too long for its first token, submission is refused (429).

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Kind, Tensor};
use tokio::sync::{mpsc, watch};

use super::admission::{Board, Commitment};
use super::sampling::{SamplingParams, SeededRng, sample};
use crate::admission::{Admission, AdmissionLimits, QueueRule};
use crate::error::{ApiError, BackendError};
use crate::executor::{BatchLimits, Queue, Queued, Room, Shape, Started, StepBackend, Work};
use crate::metrics::Metrics;
use crate::models::LoadError;
use crate::models::llama::{Logits, Placement};

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
    /// How long a sequence may be predicted to wait for its first token; `None`: count only.
    pub queue: Option<QueueRule>,
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

/// A sequence waiting to start: what it asks for, where its events go, and its place on the
/// admission board.
struct Sequence {
    submission: Submission,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    taken: Taken,
}

/// A sequence's commitment on the board, from its admission until it starts: dropped unrun
/// (client gone, deadline passed), it leaves the board.
struct Taken {
    board: Arc<Mutex<Board>>,
    number: u64,
    commitment: Commitment,
}

impl Drop for Taken {
    fn drop(&mut self) {
        lock(&self.board).submitted.remove(&self.number);
    }
}

impl Work for Sequence {
    /// A prompt is a row of its tokens: the prefill budget bounds rows × the longest prompt.
    fn shape(&self) -> Shape {
        Shape {
            rows: 1,
            width: self.submission.prompt.len(),
        }
    }
}

impl Queued for Sequence {
    fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.submission.deadline
    }

    fn expire(self) {
        let _ = self.events.send(Event::Finished {
            reason: FinishReason::Deadline,
            prompt_tokens: self.submission.prompt.len(),
            generated_tokens: 0,
        });
    }
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
    admission: Admission,
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
    queue: Queue<Sequence>,
    board: Arc<Mutex<Board>>,
    metrics: Metrics,
    pub limits: EngineLimits,
}

impl Engine {
    /// Starts the model thread: `load` builds the decoder there; `/health` turns ready after.
    pub fn start<M, L>(
        load: L,
        limits: EngineLimits,
        metrics: Metrics,
        ready: watch::Sender<bool>,
    ) -> (Engine, JoinHandle<Result<(), LoadError>>)
    where
        M: Decoder,
        L: FnOnce() -> Result<M, LoadError> + Send + 'static,
    {
        let board = Arc::new(Mutex::new(Board::default()));
        let scheduler_board = board.clone();
        let scheduler_metrics = metrics.clone();
        let engine_metrics = metrics.clone();
        let load = move || {
            let model = load()?;
            let cache = model.new_cache(
                limits.max_running_sequences as i64,
                limits.max_sequence_tokens as i64,
            );
            Ok(Scheduler::new(
                model,
                cache,
                limits,
                scheduler_metrics,
                scheduler_board,
            ))
        };
        // The queue's gate counts requests; the board's replay of the schedule forecasts for
        // the time rule, so the gate's own is off.
        let batch = BatchLimits {
            max_batch_tokens: limits.max_prefill_tokens,
            max_batch_requests: limits.max_running_sequences,
            admission: AdmissionLimits {
                max_concurrent_requests: limits.max_concurrent_requests,
                queue: None,
            },
        };
        let (queue, thread) = Queue::start(load, batch, metrics, ready);
        let engine = Engine {
            queue,
            board,
            metrics: engine_metrics,
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
        let admission = self.queue.admit()?;
        let steps = submission.stop.max_new_tokens.min(
            self.limits
                .max_sequence_tokens
                .saturating_sub(submission.prompt.len()),
        );
        let now = Instant::now();
        let (number, commitment) = lock(&self.board)
            .admit(
                submission.prompt.len(),
                steps,
                self.limits.queue,
                self.limits.max_running_sequences,
                submission.deadline,
                now,
            )
            .inspect_err(|error| self.metrics.refused(error))?;
        let taken = Taken {
            board: self.board.clone(),
            number,
            commitment,
        };
        let (events, receiver) = mpsc::unbounded_channel();
        let sequence = Sequence {
            submission,
            events,
            submitted: now,
            taken,
        };
        self.queue.enqueue(admission, sequence)?;
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
    /// Sequences starting in the current step, until their prefill has run.
    starting: Vec<Started<Sequence>>,
    running: Vec<Running>,
}

impl<M: Decoder> StepBackend for Scheduler<M> {
    type Job = Sequence;

    /// A free cache slot per starting sequence, within the per-step budget of prompt tokens.
    fn room(&self) -> Room {
        Room {
            rows: self.free_slots.len(),
            units: self.limits.max_prefill_tokens,
        }
    }

    /// First come, first prefilled, while they fit: always at least one when a slot is free,
    /// so a prompt longer than the budget still runs.
    fn select(&self, waiting: &[Shape], room: Room) -> Vec<usize> {
        let mut longest = 0;
        let mut chosen = Vec::new();
        for (index, shape) in waiting.iter().enumerate() {
            let padded = (chosen.len() + 1) * longest.max(shape.width);
            if chosen.len() == room.rows || (!chosen.is_empty() && padded > room.units) {
                break;
            }
            longest = longest.max(shape.width);
            chosen.push(index);
        }
        chosen
    }

    fn is_busy(&self) -> bool {
        !self.running.is_empty()
    }

    fn step(&mut self, starting: Vec<Started<Sequence>>) {
        self.drop_abandoned();
        {
            // On the board as running from now, so that admission never misses them while
            // they prefill.
            let mut board = lock(&self.board);
            for started in &starting {
                let taken = &started.job.taken;
                board.submitted.remove(&taken.number);
                board.running.push(Commitment {
                    prompt_tokens: 0,
                    ..taken.commitment
                });
            }
        }
        self.starting = starting;
        self.prefill();
        self.decode();
        self.publish();
        self.metrics.running.set(self.running.len() as i64);
    }

    fn fail_running(&mut self, error: &BackendError) {
        for started in self.starting.drain(..) {
            let _ = started.job.events.send(Event::Failed(error.clone()));
        }
        for sequence in self.running.drain(..) {
            let _ = sequence.events.send(Event::Failed(error.clone()));
            self.free_slots.push(sequence.slot);
        }
        // Slots of a prefill that failed part-way hold nothing anyone reads.
        self.free_slots = (0..self.limits.max_running_sequences as i64)
            .rev()
            .collect();
        self.publish();
        self.metrics.running.set(0);
    }
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
            starting: Vec::new(),
            running: Vec::new(),
        }
    }

    /// Puts the running sequences on the board for admission to read.
    fn publish(&self) {
        let max_sequence_tokens = self.limits.max_sequence_tokens;
        let mut board = lock(&self.board);
        board.running = self
            .running
            .iter()
            .map(|sequence| Commitment {
                steps_left: sequence.steps_left(max_sequence_tokens),
                prompt_tokens: 0,
            })
            .collect();
    }

    /// Ends running sequences nobody waits for, or whose deadline passed, before spending a
    /// step on them.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &self.running[index];
            if sequence.events.is_closed() {
                self.metrics.abandoned.inc();
                self.free(index, None);
            } else if sequence.deadline.is_some_and(|d| d <= now) {
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
        if matches!(reason, Some(FinishReason::StopToken | FinishReason::Length)) {
            lock(&self.board).lengths.observe(generated_tokens);
        }
        if let Some(reason) = reason {
            let _ = events.send(Event::Finished {
                reason,
                prompt_tokens: prompt_len,
                generated_tokens,
            });
        }
        self.free_slots.push(slot);
    }

    /// Prefills the starting sequences into free slots in one forward pass.
    fn prefill(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let longest = self
            .starting
            .iter()
            .map(|s| s.job.submission.prompt.len())
            .max()
            .unwrap_or(0);
        let slots: Vec<i64> = self
            .starting
            .iter()
            .map(|_| {
                self.free_slots
                    .pop()
                    .expect("a free slot per starting sequence")
            })
            .collect();
        let padded: Vec<i64> = self
            .starting
            .iter()
            .flat_map(|s| {
                let prompt = &s.job.submission.prompt;
                prompt
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - prompt.len()))
            })
            .collect();
        let last: Vec<i64> = self
            .starting
            .iter()
            .map(|s| s.job.submission.prompt.len() as i64 - 1)
            .collect();
        let placements: Vec<Placement> = slots
            .iter()
            .map(|&slot| Placement { slot, start: 0 })
            .collect();
        let started = Instant::now();
        let tokens = Tensor::from_slice(&padded)
            .view([self.starting.len() as i64, longest as i64])
            .to_device(self.model.device());
        let logits = self
            .model
            .forward(&tokens, &placements, &mut self.cache, Logits::At(&last));
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.batch_tokens.observe(padded.len() as f64);
        lock(&self.board)
            .prefill_cost
            .observe(padded.len() as f64, seconds);
        let mut sequences = Vec::with_capacity(self.starting.len());
        let mut submitted_at = Vec::with_capacity(self.starting.len());
        for (started, slot) in self.starting.drain(..).zip(slots) {
            let Started {
                job:
                    Sequence {
                        submission,
                        events,
                        submitted,
                        taken: _,
                    },
                admission,
            } = started;
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
        // Sequences prefilled this step already have their first token; all decode together.
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
        let logits = self
            .model
            .forward(&tokens, &placements, &mut self.cache, Logits::Last);
        let seconds = started.elapsed().as_secs_f64();
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
