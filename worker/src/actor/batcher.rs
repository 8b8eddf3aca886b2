//! The inference thread's side: requests queued as jobs, merged into forward passes (dynamic
//! batching), and each answered with its own rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tch::Tensor;
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::metrics::ActorMetrics;
use super::{Batching, Refusal};
use crate::model::Pipeline;
use crate::nn::WrongInput;

/// A request on its way to the inference thread, and where its output goes.
pub(super) struct Job {
    pub(super) input: Tensor,
    pub(super) reply: oneshot::Sender<Result<Tensor, Refusal>>,
}

impl Job {
    /// Rows, if the request can be merged with others along its first dimension.
    fn rows(&self) -> Option<i64> {
        self.input.size().first().copied()
    }

    /// Whether `other` can join this job's pass: both have rows, of one datatype and shape.
    pub(super) fn fits_with(&self, other: &Job) -> bool {
        let (a, b) = (self.input.size(), other.input.size());
        let rows_of_one_shape = matches!(
            (a.split_first(), b.split_first()),
            (Some((_, a)), Some((_, b))) if a == b
        );
        self.input.kind() == other.input.kind() && rows_of_one_shape
    }
}

/// One forward pass. Errors are the client's (422) or the worker's (500).
fn forward(pipeline: &Pipeline, input: &Tensor) -> Result<Tensor, Refusal> {
    let forward =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.forward(input)));
    match forward {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), shape = ?input.size(), "the models refused a batch");
            // Our own checks word the reason for the client; libtorch's words stay in the log.
            let reason = e
                .chain()
                .find_map(|c| c.downcast_ref::<WrongInput>())
                .map_or_else(
                    || {
                        format!(
                            "the models cannot run a batch of shape {:?} and dtype {:?}",
                            input.size(),
                            input.kind()
                        )
                    },
                    WrongInput::to_string,
                );
            Err(Refusal::ModelRefused(reason))
        }
        Err(panic) => {
            error!(panic = panic_message(&*panic), shape = ?input.size(), "a batch panicked inside the models");
            Err(Refusal::Internal)
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// Runs `group` as one forward pass and answers each job with its own rows; if the pass fails
/// or its output does not keep the rows apart, each job runs alone, so that only a bad request
/// gets its refusal.
fn run_group(pipeline: &Pipeline, group: Vec<Job>, metrics: &ActorMetrics) {
    if let [_] = &group[..] {
        let job = group.into_iter().next().expect("one job");
        metrics.executions.inc();
        let _ = job.reply.send(forward(pipeline, &job.input));
        return;
    }
    let rows: Vec<i64> = group.iter().filter_map(Job::rows).collect();
    let total: i64 = rows.iter().sum();
    let inputs: Vec<&Tensor> = group.iter().map(|j| &j.input).collect();
    metrics.executions.inc();
    let merged = Tensor::f_cat(&inputs, 0)
        .map_err(|_| Refusal::Internal)
        .and_then(|merged| forward(pipeline, &merged));
    match merged {
        Ok(output) if output.size().first() == Some(&total) => {
            let mut start = 0;
            for (job, n) in group.into_iter().zip(rows) {
                let _ = job.reply.send(Ok(output.narrow(0, start, n)));
                start += n;
            }
        }
        _ => {
            debug!(
                requests = group.len(),
                "a merged batch failed; running its requests one by one"
            );
            for job in group {
                metrics.executions.inc();
                let _ = job.reply.send(forward(pipeline, &job.input));
            }
        }
    }
}

/// Runs the requests in arrival order, merging them with `batching`; ends with the server. A
/// pass waits for more requests only while others are on their way (`in_flight`, requests
/// being read or run, counts more than it holds): a lone client never waits the delay.
pub(super) fn run_jobs(
    pipeline: &Pipeline,
    queue: Receiver<Job>,
    batching: Option<Batching>,
    in_flight: &AtomicUsize,
    metrics: &ActorMetrics,
) {
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        // A panic while merging or answering fails the requests of this pass alone (their
        // replies are dropped: 500), never the thread that serves every other request.
        let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let group = gather(first, &queue, &mut next, batching, in_flight);
            run_group(pipeline, group, metrics);
        }));
        if let Err(panic) = pass {
            error!(
                panic = panic_message(&*panic),
                "a pass panicked; its requests were failed"
            );
        }
    }
}

/// The requests of one pass: `first`, then as many that fit as arrive within the delay while
/// others are on their way. One that does not fit is left in `next` for the next pass.
fn gather(
    first: Job,
    queue: &Receiver<Job>,
    next: &mut Option<Job>,
    batching: Option<Batching>,
    in_flight: &AtomicUsize,
) -> Vec<Job> {
    let mut group = vec![first];
    if let (Some(batching), Some(mut rows)) = (batching, group[0].rows()) {
        let deadline = Instant::now() + batching.max_delay;
        while rows < batching.max_rows && in_flight.load(Ordering::SeqCst) > group.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match queue.recv_timeout(left) {
                Ok(job)
                    if group[0].fits_with(&job)
                        && job.rows().is_some_and(|n| rows + n <= batching.max_rows) =>
                {
                    rows += job.rows().unwrap_or(0);
                    group.push(job);
                }
                Ok(job) => {
                    *next = Some(job);
                    break;
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    group
}
