//! The bounded queue between handlers and the store, and the thread that
//! drains it.
//!
//! Handlers never wait: [`Recorder::record`] puts a trace in the queue or,
//! when the queue is full, drops it and counts it in
//! `mull_traces_dropped_total`. The writer thread owns the blocking store
//! calls, counts each failed write in `mull_trace_write_errors_total`, and
//! enforces retention between writes.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use super::{now_ms, Trace, TraceConfig, TraceStore};
use crate::metrics::Metrics;

/// Shortest time between two log lines about the same kind of failure, so
/// that a full disk does not write one line per request.
const LOG_INTERVAL_MS: i64 = 10_000;

/// Work for the writer thread.
enum Record {
    Trace(Box<Trace>),
    /// Names of behaviors the handbook strategy put into a prompt.
    Retrievals(Vec<String>),
    /// Ends the thread once everything queued before it is written.
    Stop,
}

/// The handlers' side of the queue.
pub struct Recorder {
    sender: SyncSender<Record>,
    metrics: Arc<Metrics>,
    dropped_log: Throttle,
    /// Receives once the writer thread has ended.
    stopped: Mutex<Option<Receiver<()>>>,
}

impl Recorder {
    /// Starts the writer thread for `store`.
    pub fn start(store: Arc<dyn TraceStore>, config: &TraceConfig, metrics: Arc<Metrics>) -> Self {
        let (sender, receiver) = mpsc::sync_channel(config.queue_capacity);
        let (stopped_sender, stopped) = mpsc::channel();
        let writer = Writer {
            store,
            receiver,
            metrics: metrics.clone(),
            config: config.clone(),
            error_log: Throttle::default(),
        };
        thread::Builder::new()
            .name("mull-trace-writer".into())
            .spawn(move || {
                writer.run();
                let _ = stopped_sender.send(());
            })
            .expect("the OS can start the trace writer thread");
        Self {
            sender,
            metrics,
            dropped_log: Throttle::default(),
            stopped: Mutex::new(Some(stopped)),
        }
    }

    /// Queues `trace` for writing; returns false when it was dropped
    /// because the queue is full or the writer has stopped.
    pub fn record(&self, trace: Trace) -> bool {
        let id = trace.id.clone();
        if self.sender.try_send(Record::Trace(Box::new(trace))).is_ok() {
            return true;
        }
        self.metrics.traces_dropped.inc();
        if self.dropped_log.allow() {
            warn!(
                trace_id = %id,
                dropped_total = self.metrics.traces_dropped.get(),
                "trace queue full or writer stopped; dropped a trace \
                 (raise trace_queue_capacity if this repeats)"
            );
        }
        false
    }

    /// Queues retrieval counts; they are skipped, with a debug line, when
    /// the queue is full, because they are statistics only.
    pub fn count_retrievals(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        if self.sender.try_send(Record::Retrievals(names)).is_err() {
            debug!("trace queue full; skipped counting behavior retrievals");
        }
    }

    /// Writes what is queued and stops the writer, waiting at most
    /// `timeout`. Blocks, so async callers use `spawn_blocking`.
    pub fn close(&self, timeout: Duration) {
        let Some(stopped) = self
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let deadline = Instant::now() + timeout;
        let mut stop = Record::Stop;
        loop {
            match self.sender.try_send(stop) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(record)) if Instant::now() < deadline => {
                    stop = record;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => {
                    warn!("trace writer did not drain its queue in time; queued traces are lost");
                    return;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if stopped.recv_timeout(left).is_err() {
            warn!("trace writer did not finish in time; queued traces may be lost");
        }
    }
}

struct Writer {
    store: Arc<dyn TraceStore>,
    receiver: Receiver<Record>,
    metrics: Arc<Metrics>,
    config: TraceConfig,
    error_log: Throttle,
}

impl Writer {
    fn run(self) {
        self.prune();
        let mut next_prune = Instant::now() + self.config.retention_interval;
        loop {
            let wait = next_prune.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(wait) {
                Ok(Record::Trace(trace)) => self.write(&trace),
                Ok(Record::Retrievals(names)) => {
                    if let Err(e) = self.store.count_retrievals(&names) {
                        self.metrics.trace_write_errors.inc();
                        self.log_error("failed to count behavior retrievals", &e);
                    }
                }
                Ok(Record::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_prune {
                self.prune();
                next_prune = Instant::now() + self.config.retention_interval;
            }
        }
        debug!("trace writer stopped");
    }

    fn write(&self, trace: &Trace) {
        match self.store.insert(trace) {
            Ok(()) => self.metrics.traces_written.inc(),
            Err(e) => {
                self.metrics.trace_write_errors.inc();
                self.log_error(&format!("failed to write trace {}", trace.id), &e);
            }
        }
    }

    fn prune(&self) {
        let retention = &self.config.retention;
        if retention.max_age.is_none() && retention.max_bytes.is_none() {
            return;
        }
        match self.store.prune(retention, now_ms()) {
            Ok(0) => {}
            Ok(deleted) => {
                self.metrics.traces_pruned.inc_by(deleted as u64);
                info!(deleted, "deleted traces past the retention limits");
            }
            Err(e) => {
                self.metrics.trace_write_errors.inc();
                self.log_error("failed to enforce trace retention", &e);
            }
        }
    }

    fn log_error(&self, message: &str, cause: &super::StoreError) {
        if self.error_log.allow() {
            error!(
                cause = %cause,
                errors_total = self.metrics.trace_write_errors.get(),
                "{message}; later failures within 10 s are counted but not logged"
            );
        }
    }
}

/// Allows one event per [`LOG_INTERVAL_MS`].
#[derive(Default)]
struct Throttle {
    last_ms: AtomicI64,
}

impl Throttle {
    fn allow(&self) -> bool {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        now - last >= LOG_INTERVAL_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::traces::{sqlite::SqliteStore, Retention};

    fn config(capacity: usize) -> TraceConfig {
        TraceConfig {
            path: PathBuf::new(),
            postgres_url: None,
            queue_capacity: capacity,
            retention: Retention {
                max_age: None,
                max_bytes: None,
            },
            retention_interval: Duration::from_secs(60),
        }
    }

    fn trace(id: &str) -> Trace {
        serde_json::from_value(serde_json::json!({
            "id": id, "created_ms": 1, "model": "m", "adapter": null, "endpoint": "chat",
            "strategy": "plain", "params": {}, "messages": [], "prompt": null, "choices": [],
            "decoding": null, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
            "engine_prompt_tokens": 1, "engine_generated_tokens": 1},
            "latency": {"queue_ms": 0, "first_token_ms": null, "total_ms": 1},
            "stream": false, "user": null, "metadata": {}
        }))
        .unwrap()
    }

    #[test]
    fn queued_traces_written_before_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let metrics = Arc::new(Metrics::new());
        let recorder = Recorder::start(store.clone(), &config(8), metrics.clone());
        assert!(recorder.record(trace("a")));
        assert!(recorder.record(trace("b")));
        recorder.close(Duration::from_secs(10));
        assert!(store.get("a").unwrap().is_some());
        assert!(store.get("b").unwrap().is_some());
        assert_eq!(metrics.traces_written.get(), 2);
        assert_eq!(metrics.traces_dropped.get(), 0);
    }

    #[test]
    fn closed_writer_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let metrics = Arc::new(Metrics::new());
        let recorder = Recorder::start(store, &config(1), metrics.clone());
        recorder.close(Duration::from_secs(10));
        assert!(!recorder.record(trace("late")));
        assert_eq!(metrics.traces_dropped.get(), 1);
    }
}
