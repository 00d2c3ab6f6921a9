//! A model thread for tasks without a token-level batcher: jobs run one at a time, or (with
//! `start_batched`) every job queued while the model was busy runs in one call; the same
//! admission rule as the batcher (429 beyond `max_concurrent_requests`), and libtorch objects
//! that never leave their thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::error::ApiError;

type Reply<O> = oneshot::Sender<Result<O, String>>;

/// Sends work to the model thread.
#[derive(Debug)]
pub struct ModelWorker<I, O> {
    jobs: mpsc::UnboundedSender<(I, Reply<O>, tokio::sync::OwnedSemaphorePermit)>,
    admission: Arc<Semaphore>,
}

impl<I, O> Clone for ModelWorker<I, O> {
    fn clone(&self) -> Self {
        ModelWorker {
            jobs: self.jobs.clone(),
            admission: self.admission.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> ModelWorker<I, O> {
    /// Starts the thread: `load` builds the model there, then `run` serves each job in turn.
    pub fn start<M, L, R>(
        load: L,
        mut run: R,
        max_concurrent_requests: usize,
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
            max_concurrent_requests,
            ready,
        )
    }

    /// Starts the thread: `load` builds the model there, then `run` serves the jobs queued
    /// meanwhile together (up to `max_jobs`), one answer per job, in order.
    pub fn start_batched<M, L, R>(
        load: L,
        mut run: R,
        max_jobs: usize,
        max_concurrent_requests: usize,
        ready: watch::Sender<bool>,
    ) -> (Self, JoinHandle<Result<(), String>>)
    where
        L: FnOnce() -> Result<M, String> + Send + 'static,
        R: FnMut(&mut M, Vec<I>) -> Vec<Result<O, String>> + Send + 'static,
    {
        let (jobs, mut receiver) =
            mpsc::unbounded_channel::<(I, Reply<O>, tokio::sync::OwnedSemaphorePermit)>();
        let thread = std::thread::Builder::new()
            .name("model".to_owned())
            .spawn(move || {
                let mut model = load()?;
                let _ = ready.send(true);
                while let Some(first) = receiver.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < max_jobs.max(1)
                        && let Ok(next) = receiver.try_recv()
                    {
                        batch.push(next);
                    }
                    // A job whose client left is dropped, not computed.
                    batch.retain(|(_, reply, _)| !reply.is_closed());
                    if batch.is_empty() {
                        continue;
                    }
                    let (inputs, replies): (Vec<I>, Vec<(Reply<O>, _)>) = batch
                        .into_iter()
                        .map(|(input, reply, permit)| (input, (reply, permit)))
                        .unzip();
                    for (output, (reply, permit)) in
                        run(&mut model, inputs).into_iter().zip(replies)
                    {
                        // The slot is free before the client hears back, so its next request
                        // finds it free.
                        drop(permit);
                        let _ = reply.send(output);
                    }
                }
                Ok(())
            })
            .expect("spawning the model thread");
        (
            ModelWorker {
                jobs,
                admission: Arc::new(Semaphore::new(max_concurrent_requests)),
            },
            thread,
        )
    }

    pub async fn submit(&self, input: I) -> Result<O, ApiError> {
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((input, reply, permit))
            .map_err(|_| ApiError::ShuttingDown)?;
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(message)) => Err(ApiError::Inference(message)),
            Err(_) => Err(ApiError::ShuttingDown),
        }
    }
}
