//! Dynamic batching on the one thread that owns the GPU and the model. HTTP handlers send
//! jobs over a bounded channel (full: the caller answers 503); the thread takes the oldest
//! job, waits up to `max_wait` after its arrival for more jobs of the same work (same task,
//! or same encoder and pooling) until `max_batch` inputs are there, runs them as one GPU
//! batch and answers each job. Different tasks never share a batch: each runs its own
//! task modules and head over the shared encoder.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tokio::sync::oneshot;

use super::infer::{Infer, ModelInfo};
use super::metrics::Metrics;
use crate::data::tokenizer::Encoded;
use crate::encode::Pooling;
use crate::gpu::{AdapterChoice, Gpu};

/// What a job asks of the model; jobs batch together only when this is equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    Predict { task: usize },
    Encode { encoder: usize, pooling: Pooling },
}

/// One request's inputs and where its answer goes: per input the model's outputs, or the
/// error that failed its batch.
pub struct Job {
    pub work: Work,
    pub inputs: Vec<Encoded>,
    pub queued: Instant,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Inputs per GPU batch (a request with more runs alone, in chunks of this size).
    pub max_batch: usize,
    /// How long the oldest job waits for company.
    pub max_wait: Duration,
    /// Jobs waiting at most; one more is refused.
    pub queue: usize,
}

pub enum SubmitError {
    Full,
    Stopped,
}

/// The handlers' end of the channel.
#[derive(Clone)]
pub struct Queue {
    sender: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Enqueues without waiting: a full queue is refused at once.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        // Counted before sending so the thread never sees the depth go below zero.
        self.metrics.queued(1);
        let sent = self.sender.try_send(job);
        if sent.is_err() {
            self.metrics.dequeued(1);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// Makes the model on the GPU thread, from the GPU that thread opened.
pub type Loader = Box<dyn for<'g> FnOnce(&'g Gpu) -> Result<Box<dyn Infer + 'g>> + Send>;

/// Starts the GPU thread: it opens `adapter`, and `load` makes the model there. Returns once
/// the model is loaded (or failed to). The thread ends when every [`Queue`] clone is
/// dropped and the jobs already queued are answered.
pub fn spawn(
    adapter: AdapterChoice,
    load: Loader,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> Result<(Queue, ModelInfo, JoinHandle<()>)> {
    let (sender, jobs) = sync_channel::<Job>(limits.queue.max(1));
    let (loaded_tx, loaded_rx) = sync_channel::<Result<ModelInfo>>(1);
    let thread_metrics = metrics.clone();
    let thread = std::thread::Builder::new().name("pals-gpu".into()).spawn(move || {
        let gpu = match Gpu::new(&adapter) {
            Ok(gpu) => gpu,
            Err(error) => {
                let _ = loaded_tx.send(Err(error.into()));
                return;
            }
        };
        let mut model = match load(&gpu) {
            Ok(model) => model,
            Err(error) => {
                let _ = loaded_tx.send(Err(error));
                return;
            }
        };
        let _ = loaded_tx.send(Ok(model.info()));
        serve_jobs(model.as_mut(), &jobs, limits, &thread_metrics);
    })?;
    let info = match loaded_rx.recv() {
        Ok(loaded) => loaded?,
        Err(_) => return Err(anyhow!("the GPU thread stopped while loading the model")),
    };
    Ok((Queue { sender, metrics }, info, thread))
}

fn serve_jobs(model: &mut dyn Infer, jobs: &Receiver<Job>, limits: Limits, metrics: &Metrics) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                // Every sender is gone and nothing waits: shut down.
                Err(_) => return,
            }
        }
        let batch = gather(jobs, &mut waiting, limits);
        metrics.dequeued(batch.len());
        run_batch(model, batch, metrics);
    }
}

/// Waits until the oldest job has waited `max_wait` or its work has `max_batch` inputs,
/// then takes that work's jobs in arrival order while they fit (the oldest always).
fn gather(jobs: &Receiver<Job>, waiting: &mut VecDeque<Job>, limits: Limits) -> Vec<Job> {
    let work = waiting[0].work;
    let deadline = waiting[0].queued + limits.max_wait;
    let rows = |waiting: &VecDeque<Job>| -> usize {
        waiting.iter().filter(|j| j.work == work).map(|j| j.inputs.len()).sum()
    };
    // Bounded: jobs of other work are held here only up to the queue's size.
    while rows(waiting) < limits.max_batch && waiting.len() < limits.queue.max(1) {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = match jobs.try_recv() {
            Ok(job) => Ok(job),
            Err(_) if left.is_zero() => break,
            Err(_) => jobs.recv_timeout(left),
        };
        match next {
            Ok(job) => waiting.push_back(job),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    let (mut batch, mut rest, mut taken, mut full) = (Vec::new(), VecDeque::new(), 0, false);
    for job in waiting.drain(..) {
        let fits = batch.is_empty() || taken + job.inputs.len() <= limits.max_batch;
        if job.work == work && fits && !full {
            taken += job.inputs.len();
            batch.push(job);
        } else {
            // Later jobs of this work wait for the next batch, keeping their order.
            full |= job.work == work;
            rest.push_back(job);
        }
    }
    *waiting = rest;
    batch
}

/// Runs one batch and answers its jobs; an error (or a panic) fails this batch only.
fn run_batch(model: &mut dyn Infer, batch: Vec<Job>, metrics: &Metrics) {
    let work = batch[0].work;
    let inputs: Vec<Encoded> = batch.iter().flat_map(|j| j.inputs.iter().cloned()).collect();
    metrics.batch(inputs.len());
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| match work {
        Work::Predict { task } => model.predict(task, &inputs),
        Work::Encode { encoder, pooling } => model.encode(encoder, &inputs, pooling),
    }));
    let outputs = match result {
        Ok(Ok(outputs)) if outputs.len() == inputs.len() => Ok(outputs),
        Ok(Ok(outputs)) => Err(format!("the model answered {} of {} inputs", outputs.len(), inputs.len())),
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(_) => Err("the model panicked on this batch".to_string()),
    };
    if let Err(error) = &outputs {
        eprintln!("batch of {} inputs failed: {error}", inputs.len());
        metrics.failed_batch();
    }
    let mut outputs = outputs.map(Vec::into_iter);
    for job in batch {
        let answer = match &mut outputs {
            Ok(rows) => Ok(rows.by_ref().take(job.inputs.len()).collect()),
            Err(error) => Err(error.clone()),
        };
        // The client may have gone away; nothing to do then.
        let _ = job.reply.send(answer);
    }
}
