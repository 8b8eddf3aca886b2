//! What the inference thread and the HTTP side share (readiness, requests in flight), and the
//! drain on SIGTERM.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{info, warn};

use crate::oip::ModelMetadata;

/// What the inference thread and the HTTP side share.
#[derive(Default)]
pub(super) struct State {
    /// Set once the models are mapped.
    pub(super) metadata: OnceLock<ModelMetadata>,
    /// Cleared if the inference thread ends: the replica is no longer ready.
    pub(super) inferring: AtomicBool,
    /// Set if the inference thread ends (however it ends): the replica is no longer live.
    pub(super) ended: AtomicBool,
    /// Set on SIGTERM.
    draining: AtomicBool,
    /// Inference requests being read, run or answered.
    pub(super) in_flight: AtomicUsize,
}

impl State {
    pub(super) fn ready(&self) -> bool {
        self.metadata.get().is_some()
            && self.inferring.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// Marks the inference thread ended when it ends, a panic included.
pub(super) struct Ended<'a>(pub(super) &'a State);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.inferring.store(false, Ordering::Relaxed);
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

/// Counts a request in flight for as long as it lives.
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    pub(super) fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for SIGTERM or SIGINT, then drains: not ready at once, and done once nothing has
/// been in flight for a second, or after `longest`.
pub(super) async fn drain_on_terminate(state: &State, longest: Duration) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    state.draining.store(true, Ordering::Relaxed);
    info!(
        in_flight = state.in_flight.load(Ordering::SeqCst),
        "draining"
    );
    let started = Instant::now();
    let mut idle_since = Instant::now();
    while started.elapsed() < longest {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if state.in_flight.load(Ordering::SeqCst) > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= Duration::from_secs(1) {
            info!("drained");
            return Ok(());
        }
    }
    warn!(
        in_flight = state.in_flight.load(Ordering::SeqCst),
        "the drain time is up"
    );
    Ok(())
}
