//! Admission and dynamic batching for encoder tasks. HTTP handlers submit tokenized sequences;
//! one OS thread owns the model and runs padded batches of them. Admission (`admission`) refuses
//! with 429 what the queue cannot take in time; nothing waits in an unbounded queue.

use std::collections::VecDeque;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{Admission, AdmissionLimits, Gate, Queued};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// One tokenized input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Sequences padded to a rectangle, as the model consumes them.
#[derive(Debug)]
pub struct PaddedBatch {
    pub input_ids: Vec<i64>,
    pub type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub rows: usize,
    pub width: usize,
}

impl PaddedBatch {
    /// Right-pads every sequence to the longest with `pad_id`.
    pub fn new<'a>(
        sequences: impl Iterator<Item = &'a Sequence> + Clone,
        pad_id: i64,
    ) -> PaddedBatch {
        let width = sequences.clone().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut batch = PaddedBatch {
            input_ids: Vec::new(),
            type_ids: Vec::new(),
            attention_mask: Vec::new(),
            rows: 0,
            width,
        };
        for sequence in sequences {
            let pad = width - sequence.ids.len();
            batch.input_ids.extend(
                sequence
                    .ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad)),
            );
            batch.type_ids.extend(
                sequence
                    .type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            batch.attention_mask.extend(
                std::iter::repeat_n(1, sequence.ids.len()).chain(std::iter::repeat_n(0, pad)),
            );
            batch.rows += 1;
        }
        batch
    }
}

impl PaddedBatch {
    /// `(input_ids, type_ids, attention_mask)`, each [rows, width], on `device`.
    pub fn tensors(&self, device: tch::Device) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
        let shape = [self.rows as i64, self.width as i64];
        let tensor = |values: &[i64]| {
            tch::Tensor::from_slice(values)
                .view(shape)
                .to_device(device)
        };
        (
            tensor(&self.input_ids),
            tensor(&self.type_ids),
            tensor(&self.attention_mask),
        )
    }
}

/// The rows of a [rows, width] output as `f32` vectors, whatever its dtype and device.
pub fn tensor_rows(output: &tch::Tensor) -> Result<Vec<Vec<f32>>, String> {
    let output = output.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let width = output.size().get(1).copied().unwrap_or(1).max(1) as usize;
    let flat =
        Vec::<f32>::try_from(output.flatten(0, -1)).map_err(|e: tch::TchError| e.to_string())?;
    Ok(flat.chunks(width).map(<[f32]>::to_vec).collect())
}

/// What the model thread runs: one output vector per row of the batch.
pub trait EncoderBackend {
    fn run(&mut self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, String>;
    fn pad_id(&self) -> i64;
}

/// Bounds of a batch and of admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    /// Padded tokens (rows × longest row) in one forward pass.
    pub max_batch_tokens: usize,
    /// Sequences in one forward pass.
    pub max_batch_sequences: usize,
    pub admission: AdmissionLimits,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_batch_tokens: 16384,
            max_batch_sequences: 64,
            admission: AdmissionLimits::default(),
        }
    }
}

struct Job {
    sequences: Vec<Sequence>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
    enqueued: Instant,
    /// Holds the admission slot until the job is answered or dropped.
    admission: Admission,
    /// Its padded tokens on the queue, until its batch starts.
    queued: Option<Queued>,
}

impl Job {
    fn longest(&self) -> usize {
        self.sequences
            .iter()
            .map(|s| s.ids.len())
            .max()
            .unwrap_or(0)
    }

    fn padded_tokens(&self) -> usize {
        self.sequences.len() * self.longest()
    }
}

/// The handle handlers submit work through.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
    gate: Gate,
    limits: BatchLimits,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("sequences", &self.sequences.len())
            .finish()
    }
}

impl Batcher {
    /// Starts the model thread. `load` runs on it (libtorch objects never leave that thread);
    /// `ready` turns true once it has loaded. A failed load is returned by the join handle.
    pub fn start<B, F>(
        load: F,
        limits: BatchLimits,
        metrics: Metrics,
        ready: watch::Sender<bool>,
    ) -> (Batcher, JoinHandle<Result<(), String>>)
    where
        B: EncoderBackend,
        F: FnOnce() -> Result<B, String> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let gate = Gate::new(limits.admission, limits.max_batch_tokens);
        let model_gate = gate.clone();
        let thread = std::thread::Builder::new()
            .name("model".to_owned())
            .spawn(move || {
                let backend = load()?;
                let _ = ready.send(true);
                run_batches(backend, receiver, limits, &model_gate, &metrics);
                Ok(())
            })
            .expect("spawning the model thread");
        (Batcher { jobs, gate, limits }, thread)
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// Admits a request, or refuses it at once (429) when the count limit is reached.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        self.gate.admit()
    }

    /// Runs an admitted request's `sequences` in the next batches; one output per sequence, in
    /// order. Refused at once (429) when the queue would make it too slow.
    pub async fn submit(
        &self,
        admission: Admission,
        sequences: Vec<Sequence>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let longest = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let queued = self.gate.queue(sequences.len() * longest)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            sequences,
            reply,
            enqueued: Instant::now(),
            admission,
            queued: Some(queued),
        };
        self.jobs.send(job).map_err(|_| ApiError::ShuttingDown)?;
        match answer.await {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(message)) => Err(ApiError::Inference(message)),
            Err(_) => Err(ApiError::ShuttingDown),
        }
    }
}

/// The model thread's loop: take the oldest job, fill the batch with waiting jobs largest
/// first while they fit, run it, answer. Jobs whose client went away are dropped unrun.
fn run_batches<B: EncoderBackend>(
    mut backend: B,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    limits: BatchLimits,
    gate: &Gate,
    metrics: &Metrics,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match receiver.blocking_recv() {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        while let Ok(job) = receiver.try_recv() {
            waiting.push_back(job);
        }
        waiting.retain(|job| {
            let gone = job.reply.is_closed();
            if gone {
                metrics.dropped.inc();
            }
            !gone
        });
        let Some(oldest) = waiting.pop_front() else {
            continue;
        };

        let mut rows = oldest.sequences.len();
        let mut width = oldest.longest();
        let mut order: Vec<usize> = (0..waiting.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(waiting[i].padded_tokens()));
        let mut chosen = Vec::new();
        for i in order {
            let candidate = &waiting[i];
            let (new_rows, new_width) = (
                rows + candidate.sequences.len(),
                width.max(candidate.longest()),
            );
            if new_rows <= limits.max_batch_sequences
                && new_rows * new_width <= limits.max_batch_tokens
            {
                (rows, width) = (new_rows, new_width);
                chosen.push(i);
            }
        }
        // Remove from the back so that the remaining indices stay valid.
        chosen.sort_unstable_by(|a, b| b.cmp(a));
        let mut batch = vec![oldest];
        batch.extend(chosen.into_iter().filter_map(|i| waiting.remove(i)));
        run_one(&mut backend, batch, gate, metrics);
    }
}

fn run_one<B: EncoderBackend>(backend: &mut B, mut jobs: Vec<Job>, gate: &Gate, metrics: &Metrics) {
    let now = Instant::now();
    for job in &mut jobs {
        metrics
            .queue_seconds
            .observe(now.duration_since(job.enqueued).as_secs_f64());
        // Its tokens now count as the running pass, not as queued.
        job.queued = None;
    }
    let padded = PaddedBatch::new(
        jobs.iter().flat_map(|j| j.sequences.iter()),
        backend.pad_id(),
    );
    metrics.batch_sequences.observe(padded.rows as f64);
    metrics
        .batch_tokens
        .observe((padded.rows * padded.width) as f64);
    let started = Instant::now();
    let result = gate.timed_pass(padded.rows * padded.width, || backend.run(&padded));
    metrics
        .inference_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(outputs) => {
            let mut outputs = outputs.into_iter();
            for job in jobs {
                let mine: Vec<Vec<f32>> = outputs.by_ref().take(job.sequences.len()).collect();
                drop(job.admission);
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(message) => {
            for job in jobs {
                drop(job.admission);
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
}
