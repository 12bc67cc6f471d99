//! Bounded concurrency with a bounded queue. The decision to admit, queue or
//! reject is made before any response byte is sent, so an overloaded server
//! answers 429 rather than opening a stream it cannot serve.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::ApiError;

pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    running_gauge: IntGauge,
    waiting_gauge: IntGauge,
}

/// A generation slot; dropping it frees the slot.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    running_gauge: IntGauge,
    pub queued_for: Duration,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.running_gauge.dec();
    }
}

struct WaitingGuard<'a>(&'a Admission);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.waiting_gauge.dec();
    }
}

impl Admission {
    pub fn new(
        max_running: usize,
        max_waiting: usize,
        running_gauge: IntGauge,
        waiting_gauge: IntGauge,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_running)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            running_gauge,
            waiting_gauge,
        }
    }

    /// Takes a free slot, or waits in the queue for one, or rejects with 429
    /// when the queue is full.
    pub async fn admit(&self) -> Result<Permit, ApiError> {
        let start = Instant::now();
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(self.permit(permit, start));
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        self.waiting_gauge.inc();
        let guard = WaitingGuard(self);
        if queued >= self.max_waiting {
            return Err(ApiError::overloaded(1));
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        drop(guard);
        Ok(self.permit(permit, start))
    }

    /// Takes a free slot only when no request is waiting for one, for
    /// background work that must not delay requests; never queues.
    pub fn try_admit_idle(&self) -> Option<Permit> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.permit(permit, Instant::now()))
    }

    fn permit(&self, permit: OwnedSemaphorePermit, start: Instant) -> Permit {
        self.running_gauge.inc();
        Permit {
            _permit: permit,
            running_gauge: self.running_gauge.clone(),
            queued_for: start.elapsed(),
        }
    }

    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(running: usize, waiting: usize) -> Admission {
        let gauge = || IntGauge::new("g", "g").unwrap();
        Admission::new(running, waiting, gauge(), gauge())
    }

    #[tokio::test]
    async fn full_queue_rejects_with_429() {
        let admission = Arc::new(admission(1, 1));
        let first = admission.admit().await.unwrap();
        let queued = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        while admission.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let error = admission.admit().await.err().expect("queue is full");
        assert_eq!(error.status, 429);
        assert_eq!(error.retry_after, Some(1));
        drop(first);
        queued.await.unwrap().unwrap();
        assert_eq!(admission.available(), 1);
    }
}
