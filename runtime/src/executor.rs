//! The one executor every task's model runs on. One OS thread owns the model (libtorch objects
//! never leave it) and runs passes over batches of jobs; HTTP handlers submit jobs through an
//! [`Executor`] handle and await their answer.
//!
//! What every task gets from it, written once:
//! - admission (`admission`): a count taken before any work is spent on a request, and the
//!   queue rule checked as the job is queued; each pass is timed into the cost model;
//! - batching: the oldest waiting job, joined by waiting jobs largest first while the pass stays
//!   within `max_batch_requests` rows and `max_batch_tokens` padded units (rows × widest row);
//! - a job whose client left (its handler dropped: the client closed the connection or its
//!   deadline passed, see `server::enforce_deadline`) is dropped before its pass, and a long
//!   pass can ask between its own steps whether each job is still wanted ([`Wanted`]);
//! - a panic in a pass (libtorch turns CUDA out of memory and shape errors into panics) fails
//!   that pass's jobs with a 500 naming it; the thread and the process live on.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{Admission, AdmissionLimits, Gate, Queued as QueuedUnits};
use crate::error::{ApiError, BackendError};
use crate::metrics::Metrics;
use crate::models::LoadError;

/// Where a job sits in a pass: `rows` inputs of at most `width` units (tokens) each. A pass
/// costs its rows times its widest row, as padded inputs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rows: usize,
    pub width: usize,
}

impl Shape {
    pub const ONE: Shape = Shape { rows: 1, width: 1 };

    pub fn units(self) -> usize {
        self.rows * self.width
    }
}

/// A job as handlers build it.
pub trait Work: Send + 'static {
    /// By default one unit: the tasks whose cost is per request.
    fn shape(&self) -> Shape {
        Shape::ONE
    }
}

/// A task's model, as the executor drives it.
pub trait Backend: 'static {
    type Job: Work;
    type Output: Send + 'static;

    /// Runs one pass over `jobs`: one result per job, in order. A long pass should stop work
    /// on jobs `wanted` no longer wants and answer them `BackendError::Abandoned`.
    fn run_batch(
        &mut self,
        jobs: Vec<Self::Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Self::Output, BackendError>>;
}

/// Bounds of a pass and of admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    /// Padded units (rows × widest row) in one pass.
    pub max_batch_tokens: usize,
    /// Rows in one pass.
    pub max_batch_requests: usize,
    pub admission: AdmissionLimits,
}

impl BatchLimits {
    /// For jobs whose rows are one unit each (`width` 1): a pass holds `max_batch_requests`
    /// rows.
    pub fn per_row(self) -> BatchLimits {
        BatchLimits {
            max_batch_tokens: self.max_batch_requests,
            ..self
        }
    }

    /// For models that take one job per pass.
    pub fn one_at_a_time(self) -> BatchLimits {
        BatchLimits {
            max_batch_tokens: 1,
            max_batch_requests: 1,
            ..self
        }
    }
}

/// Whether each job of a running pass is still wanted: its client has not left.
pub struct Wanted<'a> {
    closed: Vec<Box<dyn Fn() -> bool + 'a>>,
}

impl std::fmt::Debug for Wanted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wanted")
            .field("jobs", &self.closed.len())
            .finish()
    }
}

impl Wanted<'_> {
    /// Whether job `index` of the pass still has a client waiting for it.
    pub fn still(&self, index: usize) -> bool {
        self.closed.get(index).is_some_and(|closed| !closed())
    }
}

/// A job of a stepping backend, as the executor holds it before it starts: it answers its
/// client itself (one-shot jobs through a reply channel, sequences through their token stream).
pub trait Queued: Work {
    /// Whether its client is gone: the job is dropped unrun.
    fn abandoned(&self) -> bool;
    /// The instant past which it must not start.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Answers a job whose deadline passed before it started.
    fn expire(self);
}

/// A backend whose jobs may span many passes (text generation's continuous batching): each
/// pass starts some waiting jobs, which join those still running. One-shot backends
/// (`Backend`) run on it through `OneShot`, whose jobs all end in the pass they start in.
pub trait StepBackend: 'static {
    type Job: Queued;

    /// What the next pass has room to start: rows and padded units.
    fn room(&self) -> Room;

    /// The waiting jobs to start in the next pass, as ascending indices into `waiting` (oldest
    /// first). By default, `next_pass`'s packing.
    fn select(&self, waiting: &[Shape], room: Room) -> Vec<usize> {
        next_pass(waiting, room)
    }

    /// Whether jobs are still running in it (the executor then goes on stepping rather than
    /// waiting for new jobs).
    fn is_busy(&self) -> bool;

    /// One pass: `starting` join the running jobs, each with the admission slot it holds
    /// until it ends. Jobs must be kept where `fail_running` finds them before any model work.
    fn step(&mut self, starting: Vec<Started<Self::Job>>);

    /// After a pass has been timed: sends what it has to tell clients at the end of a pass.
    /// Answering only now keeps a client's next request from arriving while admission still
    /// counts the pass as running.
    fn answer(&mut self) {}

    /// After `step` panicked: answers every job it holds with `error` and frees what they held.
    fn fail_running(&mut self, error: &BackendError);
}

/// Room in a pass for starting jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub rows: usize,
    pub units: usize,
}

impl From<BatchLimits> for Room {
    fn from(limits: BatchLimits) -> Room {
        Room {
            rows: limits.max_batch_requests,
            units: limits.max_batch_tokens,
        }
    }
}

/// A job starting in a pass, with the admission slot it holds until it is answered.
#[derive(Debug)]
pub struct Started<J> {
    pub job: J,
    pub admission: Admission,
}

struct Entry<J> {
    job: J,
    shape: Shape,
    enqueued: Instant,
    admission: Admission,
    /// Holds its units on the admission queue until it starts (dropped with the entry).
    _queued: QueuedUnits,
}

/// The handle that submits jobs to a stepping backend's model thread.
pub struct Queue<J> {
    jobs: mpsc::UnboundedSender<Entry<J>>,
    gate: Gate,
    metrics: Metrics,
}

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Queue {
            jobs: self.jobs.clone(),
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<J> std::fmt::Debug for Queue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl<J: Queued> Queue<J> {
    /// Starts the model thread. `load` runs on it; `ready` turns true once it has loaded. A
    /// failed load is returned by the join handle.
    pub fn start<S, L>(
        load: L,
        limits: BatchLimits,
        metrics: Metrics,
        ready: watch::Sender<bool>,
    ) -> (Self, JoinHandle<Result<(), LoadError>>)
    where
        S: StepBackend<Job = J>,
        L: FnOnce() -> Result<S, LoadError> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let gate = Gate::new(limits.admission, limits.into());
        let model_gate = gate.clone();
        let model_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("model".to_owned())
            .spawn(move || {
                let backend = load()?;
                let _ = ready.send(true);
                tch::no_grad(|| run_steps(backend, receiver, &model_gate, &model_metrics));
                Ok(())
            })
            .expect("spawning the model thread");
        (
            Queue {
                jobs,
                gate,
                metrics,
            },
            thread,
        )
    }

    /// Admits a request, or refuses it at once (429) when the count limit is reached. Taken
    /// before any work is spent on the request (tokenizing included).
    pub fn admit(&self) -> Result<Admission, ApiError> {
        self.gate
            .admit()
            .inspect_err(|error| self.metrics.refused(error))
    }

    /// Queues an admitted job for the next passes, or refuses it at once (429) when the queue
    /// rule does.
    pub fn enqueue(&self, admission: Admission, job: J) -> Result<(), ApiError> {
        let shape = job.shape();
        let now = Instant::now();
        let queued = self
            .gate
            .queue(shape, job.deadline(), now)
            .inspect_err(|error| self.metrics.refused(error))?;
        let entry = Entry {
            job,
            shape,
            enqueued: now,
            admission,
            _queued: queued,
        };
        self.jobs.send(entry).map_err(|_| ApiError::ShuttingDown)
    }
}

/// The model thread's loop: take every job that arrived, drop those nobody waits for or whose
/// deadline passed, start what the next pass has room for, run the pass.
fn run_steps<S: StepBackend>(
    mut backend: S,
    mut receiver: mpsc::UnboundedReceiver<Entry<S::Job>>,
    gate: &Gate,
    metrics: &Metrics,
) {
    let mut waiting: VecDeque<Entry<S::Job>> = VecDeque::new();
    loop {
        if waiting.is_empty() && !backend.is_busy() {
            match receiver.blocking_recv() {
                Some(entry) => waiting.push_back(entry),
                None => return,
            }
        }
        while let Ok(entry) = receiver.try_recv() {
            waiting.push_back(entry);
        }
        let now = Instant::now();
        for entry in std::mem::take(&mut waiting) {
            if entry.job.abandoned() {
                metrics.dropped.inc();
            } else if entry.job.deadline().is_some_and(|deadline| deadline <= now) {
                entry.job.expire();
            } else {
                waiting.push_back(entry);
            }
        }
        let shapes: Vec<Shape> = waiting.iter().map(|entry| entry.shape).collect();
        let chosen = backend.select(&shapes, backend.room());
        if chosen.is_empty() && !backend.is_busy() {
            continue;
        }
        // Take from the back so that the remaining indices stay valid; then oldest first.
        let mut starting: Vec<Entry<S::Job>> = chosen
            .iter()
            .rev()
            .filter_map(|&index| waiting.remove(index))
            .collect();
        starting.reverse();
        metrics.waiting.set(waiting.len() as i64);
        let (mut rows, mut width) = (0, 0);
        for entry in &starting {
            metrics
                .queue_seconds
                .observe(now.duration_since(entry.enqueued).as_secs_f64());
            rows += entry.shape.rows;
            width = usize::max(width, entry.shape.width);
        }
        let starting: Vec<Started<S::Job>> = starting
            .into_iter()
            // Dropping `queued` moves the job's units from the queue to the running pass.
            .map(|entry| Started {
                job: entry.job,
                admission: entry.admission,
            })
            .collect();
        let started = Instant::now();
        gate.pass_started(rows * width, started);
        let stepped = catch_unwind(AssertUnwindSafe(|| backend.step(starting)));
        let ended = Instant::now();
        gate.pass_ended(ended);
        metrics
            .inference_seconds
            .observe(ended.duration_since(started).as_secs_f64());
        match stepped {
            Ok(()) => backend.answer(),
            Err(panic) => {
                let error = BackendError::from_panic(panic_message(panic.as_ref()));
                tracing::error!(%error, "a model pass panicked; its jobs fail, the model thread goes on");
                metrics.panics.inc();
                backend.fail_running(&error);
            }
        }
    }
}

/// The jobs of the next pass, as indices into `waiting` (oldest first) in ascending order: the
/// oldest, then the others largest first while the pass stays within `room`. The oldest always
/// runs when there is a row for it, even alone over the units, so no job waits forever.
pub fn next_pass(waiting: &[Shape], room: Room) -> Vec<usize> {
    let Some(oldest) = waiting.first() else {
        return Vec::new();
    };
    if room.rows == 0 {
        return Vec::new();
    }
    let (mut rows, mut width) = (oldest.rows, oldest.width);
    let mut order: Vec<usize> = (1..waiting.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(waiting[index].units()));
    let mut chosen = vec![0];
    for index in order {
        let candidate = waiting[index];
        let (new_rows, new_width) = (rows + candidate.rows, width.max(candidate.width));
        if new_rows <= room.rows && new_rows * new_width <= room.units {
            (rows, width) = (new_rows, new_width);
            chosen.push(index);
        }
    }
    chosen.sort_unstable();
    chosen
}

type Reply<O> = oneshot::Sender<Result<O, BackendError>>;

/// A one-shot job with where to answer it, and its request's deadline.
pub struct Answered<J, O> {
    job: J,
    reply: Reply<O>,
    deadline: Option<Instant>,
}

impl<J: Work, O: Send + 'static> Work for Answered<J, O> {
    fn shape(&self) -> Shape {
        self.job.shape()
    }
}

impl<J: Work, O: Send + 'static> Queued for Answered<J, O> {
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn expire(self) {
        let _ = self.reply.send(Err(BackendError::Abandoned));
    }
}

impl<J, O> std::fmt::Debug for Answered<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answered").finish_non_exhaustive()
    }
}

/// Runs a one-shot `Backend` on the executor: every job of a pass ends in it.
pub struct OneShot<B: Backend> {
    backend: B,
    limits: BatchLimits,
    metrics: Metrics,
    /// Where to answer the jobs of the running pass; what `fail_running` answers after a panic.
    replies: Vec<(Reply<B::Output>, Admission)>,
    /// The pass's results, until `answer` sends them.
    results: Vec<Result<B::Output, BackendError>>,
}

impl<B: Backend> std::fmt::Debug for OneShot<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneShot")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> StepBackend for OneShot<B> {
    type Job = Answered<B::Job, B::Output>;

    fn room(&self) -> Room {
        self.limits.into()
    }

    fn is_busy(&self) -> bool {
        false
    }

    fn step(&mut self, starting: Vec<Started<Self::Job>>) {
        let (mut rows, mut width) = (0, 0);
        let mut jobs = Vec::with_capacity(starting.len());
        for Started { job, admission } in starting {
            let shape = job.job.shape();
            (rows, width) = (rows + shape.rows, width.max(shape.width));
            jobs.push(job.job);
            self.replies.push((job.reply, admission));
        }
        self.metrics.batch_sequences.observe(rows as f64);
        self.metrics.batch_tokens.observe((rows * width) as f64);
        let count = jobs.len();
        let results = {
            let wanted = Wanted {
                closed: self
                    .replies
                    .iter()
                    .map(|(reply, _)| Box::new(|| reply.is_closed()) as Box<dyn Fn() -> bool + '_>)
                    .collect(),
            };
            self.backend.run_batch(jobs, &wanted)
        };
        let results = if results.len() == count {
            results
        } else {
            let error = BackendError::WrongOutputCount {
                expected: count,
                got: results.len(),
            };
            tracing::error!(%error, "a model pass failed");
            failed(&error, count)
        };
        self.results = results;
    }

    fn answer(&mut self) {
        for (result, (reply, admission)) in self.results.drain(..).zip(self.replies.drain(..)) {
            // The slot is free before the client hears back, so its next request finds it free.
            drop(admission);
            let _ = reply.send(result);
        }
    }

    fn fail_running(&mut self, error: &BackendError) {
        self.results.clear();
        for (reply, admission) in self.replies.drain(..) {
            drop(admission);
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// The handle handlers submit one-shot jobs through.
pub struct Executor<J, O> {
    queue: Queue<Answered<J, O>>,
}

impl<J, O> Clone for Executor<J, O> {
    fn clone(&self) -> Self {
        Executor {
            queue: self.queue.clone(),
        }
    }
}

impl<J, O> std::fmt::Debug for Executor<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl<J: Work, O: Send + 'static> Executor<J, O> {
    /// Starts the model thread of a one-shot backend. `load` runs on it; `ready` turns true
    /// once it has loaded. A failed load is returned by the join handle.
    pub fn start<B, L>(
        load: L,
        limits: BatchLimits,
        metrics: Metrics,
        ready: watch::Sender<bool>,
    ) -> (Self, JoinHandle<Result<(), LoadError>>)
    where
        B: Backend<Job = J, Output = O>,
        L: FnOnce() -> Result<B, LoadError> + Send + 'static,
    {
        let pass_metrics = metrics.clone();
        let load = move || {
            load().map(|backend| OneShot {
                backend,
                limits,
                metrics: pass_metrics,
                replies: Vec::new(),
                results: Vec::new(),
            })
        };
        let (queue, thread) = Queue::start(load, limits, metrics, ready);
        (Executor { queue }, thread)
    }

    /// Admits a request, or refuses it at once (429) when the count limit is reached. Taken
    /// before any work is spent on the request (tokenizing included).
    pub fn admit(&self) -> Result<Admission, ApiError> {
        self.queue.admit()
    }

    /// Runs an admitted job in the next passes, or refuses it at once (429) when the queue
    /// rule does.
    pub async fn submit(&self, admission: Admission, job: J) -> Result<O, ApiError> {
        let (reply, answer) = oneshot::channel();
        let deadline = crate::server::request_deadline();
        self.queue.enqueue(
            admission,
            Answered {
                job,
                reply,
                deadline,
            },
        )?;
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(error)) => Err(ApiError::Backend(error)),
            Err(_) => Err(ApiError::ShuttingDown),
        }
    }

    /// `admit` and `submit` in one, for handlers with no work between them.
    pub async fn run(&self, job: J) -> Result<O, ApiError> {
        let admission = self.admit()?;
        self.submit(admission, job).await
    }
}

/// Runs a pass's jobs one after another, for backends that take one job at a time: a job no
/// longer wanted when its turn comes is answered `Abandoned` unrun; `run` gets a check it can
/// call between its own steps.
pub fn one_at_a_time<J, O>(
    jobs: Vec<J>,
    wanted: &Wanted<'_>,
    mut run: impl FnMut(J, &dyn Fn() -> bool) -> Result<O, BackendError>,
) -> Vec<Result<O, BackendError>> {
    jobs.into_iter()
        .enumerate()
        .map(|(index, job)| {
            if !wanted.still(index) {
                return Err(BackendError::Abandoned);
            }
            run(job, &|| wanted.still(index))
        })
        .collect()
}

/// `count` answers of `error`.
pub fn failed<O>(error: &BackendError, count: usize) -> Vec<Result<O, BackendError>> {
    (0..count).map(|_| Err(error.clone())).collect()
}

/// The text of a panic's payload (`panic!` with a message gives a `String` or a `&str`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rows: usize, units: usize) -> BatchLimits {
        BatchLimits {
            max_batch_tokens: units,
            max_batch_requests: rows,
            admission: AdmissionLimits::default(),
        }
    }

    fn room(rows: usize, units: usize) -> Room {
        Room { rows, units }
    }

    fn shape(rows: usize, width: usize) -> Shape {
        Shape { rows, width }
    }

    #[test]
    fn the_oldest_job_runs_first_joined_by_the_largest_that_fit() {
        let waiting = [shape(1, 10), shape(1, 4), shape(2, 30), shape(1, 20)];
        // 10 + the 60-unit job = 3 rows × 30 = 90 ≤ 100; then 4 rows × 30 = 120 > 100 twice.
        assert_eq!(next_pass(&waiting, room(64, 100)), [0, 2]);
        assert_eq!(next_pass(&waiting, room(3, 1000)), [0, 2]);
        assert_eq!(next_pass(&waiting, room(64, 1000)), [0, 1, 2, 3]);
    }

    #[test]
    fn the_oldest_job_runs_even_when_alone_it_breaks_the_limits() {
        assert_eq!(next_pass(&[shape(8, 100), shape(1, 1)], room(4, 64)), [0]);
        assert!(next_pass(&[], room(4, 64)).is_empty());
    }

    struct Echo;

    impl Work for i64 {
        fn shape(&self) -> Shape {
            Shape::ONE
        }
    }

    impl Backend for Echo {
        type Job = i64;
        type Output = i64;

        fn run_batch(&mut self, jobs: Vec<i64>, _: &Wanted<'_>) -> Vec<Result<i64, BackendError>> {
            assert!(!jobs.contains(&-1), "the marked input -1");
            jobs.into_iter().map(Ok).collect()
        }
    }

    fn started() -> Executor<i64, i64> {
        let (ready, _) = watch::channel(false);
        let (executor, _thread) = Executor::start(|| Ok(Echo), limits(8, 8), Metrics::new(), ready);
        executor
    }

    #[tokio::test]
    async fn a_pass_that_panics_fails_its_jobs_and_the_next_pass_runs() {
        let executor = started();
        let error = executor.run(-1).await.unwrap_err();
        assert_eq!(
            error.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert!(
            error.to_string().contains("the marked input -1"),
            "names the failure: {error}"
        );
        assert_eq!(executor.run(7).await.unwrap(), 7);
    }

    #[test]
    fn clients_hear_back_only_once_the_pass_is_timed() {
        // A client answered inside the pass could send its next request while admission still
        // counts the pass as running, and have it refused on an idle model.
        let gate = Gate::new(AdmissionLimits::default(), room(8, 8));
        let mut one_shot = OneShot {
            backend: Echo,
            limits: limits(8, 8),
            metrics: Metrics::new(),
            replies: Vec::new(),
            results: Vec::new(),
        };
        let (reply, mut answer) = oneshot::channel();
        one_shot.step(vec![Started {
            job: Answered {
                job: 7,
                reply,
                deadline: None,
            },
            admission: gate.admit().unwrap(),
        }]);
        assert!(answer.try_recv().is_err(), "answered inside the pass");
        one_shot.answer();
        assert_eq!(answer.try_recv().unwrap(), Ok(7));
    }
}
