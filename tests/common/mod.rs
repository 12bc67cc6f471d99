//! A real server on a loopback port, backed by the real default model. The
//! model is loaded once per test binary and shared by every server started
//! here; each server has its own limits and metrics.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use mull::{
    config::{Config, ServeArgs},
    engine::{
        llama::{LlamaConfig, LlamaEngine},
        mistral::{MistralConfig, MistralEngine},
        Engine,
    },
    fetch,
    server::AppState,
};
use tokio::{net::TcpListener, runtime::Runtime};

/// Returns the runtime that owns the engine and the servers, so that they
/// outlive each test's own runtime.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the test runtime starts")
    })
}

/// Runs `future` to completion on the shared runtime from a thread of its
/// own, so that it can be called from inside a test's runtime.
fn block<T: Send + 'static>(future: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || runtime().block_on(future))
        .join()
        .expect("setup thread does not panic")
}

/// Path of the default model as the server runs it by default (Q8_0),
/// fetched and converted on first use; `MULL_TEST_MODEL` overrides it.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("MULL_TEST_MODEL") {
            return PathBuf::from(path);
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
        std::thread::spawn(move || fetch::ensure_default_model(&dir, fetch::DefaultFormat::Q8_0))
            .join()
            .expect("fetch thread does not panic")
            .expect("the default model can be fetched")
    })
    .clone()
}

/// Returns the engine under test, named by `MULL_TEST_ENGINE` (llama, the
/// default, or mistralrs), so that the same tests run on both.
pub fn engine_kind() -> String {
    std::env::var("MULL_TEST_ENGINE").unwrap_or_else(|_| "llama".into())
}

pub fn engine() -> Arc<dyn Engine> {
    static ENGINE: OnceLock<Arc<dyn Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| match engine_kind().as_str() {
            "mistralrs" => {
                let config = MistralConfig {
                    path: model_path(),
                    dtype: "f32".into(),
                    cuda: false,
                    max_batch_size: 1,
                    prefix_cache_entries: 16,
                };
                Arc::new(block(MistralEngine::load(config)).expect("the default model loads"))
            }
            "llama" => {
                let config = LlamaConfig::cpu(model_path());
                Arc::new(block(LlamaEngine::load(config)).expect("the default model loads"))
            }
            other => panic!("MULL_TEST_ENGINE is `{other}`, not llama or mistralrs"),
        })
        .clone()
}

pub const MODEL: &str = "smollm2-135m";

/// Configuration for a test server; `adjust` changes the defaults.
pub fn config(adjust: impl FnOnce(&mut ServeArgs)) -> Config {
    let mut args = ServeArgs {
        port: Some(0),
        model_path: Some(model_path()),
        model_name: Some(MODEL.into()),
        engine: Some(engine_kind()),
        traces_path: Some(temporary_trace_path()),
        extraction_interval_secs: Some(0),
        ..ServeArgs::default()
    };
    adjust(&mut args);
    args.resolve().expect("test configuration is valid")
}

/// Returns a trace store path in a folder that lives as long as the test
/// binary, so that servers never share a store by accident.
pub fn temporary_trace_path() -> PathBuf {
    static FOLDER: OnceLock<tempfile::TempDir> = OnceLock::new();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let folder = FOLDER.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    folder.path().join(format!("traces-{n}.db"))
}

pub struct TestServer {
    pub address: SocketAddr,
    pub state: Arc<AppState>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

/// Starts a server with the shared engine installed and ready.
pub fn start(adjust: impl FnOnce(&mut ServeArgs)) -> TestServer {
    let config = config(adjust);
    let engine = engine();
    let state = Arc::new(AppState::new(config).expect("the trace store opens"));
    for slot in &state.models {
        slot.install(engine.clone());
        slot.mark_ready();
    }
    let listener = block(TcpListener::bind("127.0.0.1:0")).expect("a loopback port is free");
    let address = listener
        .local_addr()
        .expect("bound sockets have an address");
    let serving = state.clone();
    runtime()
        .spawn(async move { mull::serve::run(listener, serving, std::future::pending()).await });
    TestServer { address, state }
}

/// Returns the default server, shared by tests that do not depend on limits.
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|_| {}))
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Reads one value of a metric with the given label fragment from the
/// Prometheus text format.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter(|line| line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
