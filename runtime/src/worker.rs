//! A model thread for tasks without a token-level batcher: jobs run one at a time, or (with
//! `start_batched`) every job queued while the model was busy runs in one call; the same
//! admission rules as the batcher (`admission`, with a job as the unit of work), and libtorch
//! objects that never leave their thread.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{Admission, AdmissionLimits, Gate, Queued};
use crate::error::ApiError;

type Reply<O> = oneshot::Sender<Result<O, String>>;

/// A job as the model thread receives it: its input, where to answer, its admission slot and
/// its place on the queue.
type Job<I, O> = (I, Reply<O>, Admission, Queued);

/// Sends work to the model thread.
#[derive(Debug)]
pub struct ModelWorker<I, O> {
    jobs: mpsc::UnboundedSender<Job<I, O>>,
    gate: Gate,
}

impl<I, O> Clone for ModelWorker<I, O> {
    fn clone(&self) -> Self {
        ModelWorker {
            jobs: self.jobs.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> ModelWorker<I, O> {
    /// Starts the thread: `load` builds the model there, then `run` serves each job in turn.
    pub fn start<M, L, R>(
        load: L,
        mut run: R,
        limits: AdmissionLimits,
        ready: watch::Sender<bool>,
    ) -> (Self, JoinHandle<Result<(), String>>)
    where
        L: FnOnce() -> Result<M, String> + Send + 'static,
        R: FnMut(&mut M, I) -> Result<O, String> + Send + 'static,
    {
        Self::start_batched(
            load,
            move |model, inputs| inputs.into_iter().map(|input| run(model, input)).collect(),
            1,
            limits,
            ready,
        )
    }

    /// Starts the thread: `load` builds the model there, then `run` serves the jobs queued
    /// meanwhile together (up to `max_jobs`), one answer per job, in order.
    pub fn start_batched<M, L, R>(
        load: L,
        mut run: R,
        max_jobs: usize,
        limits: AdmissionLimits,
        ready: watch::Sender<bool>,
    ) -> (Self, JoinHandle<Result<(), String>>)
    where
        L: FnOnce() -> Result<M, String> + Send + 'static,
        R: FnMut(&mut M, Vec<I>) -> Vec<Result<O, String>> + Send + 'static,
    {
        let (jobs, mut receiver) = mpsc::unbounded_channel::<Job<I, O>>();
        let max_jobs = max_jobs.max(1);
        let gate = Gate::new(limits, max_jobs);
        let model_gate = gate.clone();
        let thread = std::thread::Builder::new()
            .name("model".to_owned())
            .spawn(move || {
                let mut model = load()?;
                let _ = ready.send(true);
                while let Some(first) = receiver.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < max_jobs
                        && let Ok(next) = receiver.try_recv()
                    {
                        batch.push(next);
                    }
                    // A job whose client left is dropped, not computed.
                    batch.retain(|(_, reply, _, _)| !reply.is_closed());
                    if batch.is_empty() {
                        continue;
                    }
                    let jobs = batch.len();
                    // Dropping each `Queued` moves its job from the queue to the running pass.
                    let (inputs, replies): (Vec<I>, Vec<(Reply<O>, Admission)>) = batch
                        .into_iter()
                        .map(|(input, reply, permit, _)| (input, (reply, permit)))
                        .unzip();
                    let outputs = model_gate.timed_pass(jobs, || run(&mut model, inputs));
                    for (output, (reply, permit)) in outputs.into_iter().zip(replies) {
                        // The slot is free before the client hears back, so its next request
                        // finds it free.
                        drop(permit);
                        let _ = reply.send(output);
                    }
                }
                Ok(())
            })
            .expect("spawning the model thread");
        (ModelWorker { jobs, gate }, thread)
    }

    pub async fn submit(&self, input: I) -> Result<O, ApiError> {
        let admission = self.gate.admit()?;
        let queued = self.gate.queue(1)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((input, reply, admission, queued))
            .map_err(|_| ApiError::ShuttingDown)?;
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(message)) => Err(ApiError::Inference(message)),
            Err(_) => Err(ApiError::ShuttingDown),
        }
    }
}
