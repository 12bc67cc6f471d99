//! Running a server: load the configured models in the background, serve
//! HTTP at once (so `/health` answers while loading), drain on shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{Config, DeviceKind, EngineKind, ModelConfig},
    engine::{
        llama::{LlamaConfig, LlamaEngine},
        mistral::{MistralConfig, MistralEngine},
        Engine, GenerateRequest, SamplingParams, StepEvent,
    },
    fetch,
    server::{app, extraction, AppState, ModelSlot},
};

/// Prompts kept in each engine's prefix cache.
const PREFIX_CACHE_ENTRIES: usize = 16;

/// Time the trace writer gets at shutdown to write what is queued.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `state` on `listener` until `shutdown` resolves, then gives
/// in-flight requests up to the configured grace period.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_grace;
    let stopping = CancellationToken::new();
    let signal = stopping.clone();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        info!(
            grace_secs = grace.as_secs(),
            "shutting down; draining in-flight requests"
        );
        signal.cancel();
    });
    let deadline = async {
        stopping.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            warn!("grace period over; closing the remaining connections");
            Ok(())
        }
    }
}

/// Loads every configured model into its slot, one after another.
pub async fn load_models(state: Arc<AppState>) {
    for (config, slot) in state.config.models.iter().zip(&state.models) {
        match load_model(config).await {
            Ok(engine) => {
                slot.install(engine.clone());
                warm_up(slot, engine.as_ref()).await;
            }
            Err(e) => error!(model = %config.name, cause = %e, "failed to load model"),
        }
    }
}

async fn load_model(config: &ModelConfig) -> anyhow::Result<Arc<dyn Engine>> {
    if let Some(format) = config.fetch_default.filter(|_| !config.path.is_file()) {
        let dir = config
            .path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        tokio::task::spawn_blocking(move || fetch::ensure_default_model(&dir, format)).await??;
    }
    info!(
        model = %config.name,
        path = %config.path.display(),
        engine = config.engine.name(),
        "loading model"
    );
    let engine: Arc<dyn Engine> = match config.engine {
        EngineKind::Llama => Arc::new(
            LlamaEngine::load(LlamaConfig {
                threads: config.threads,
                slots: config.max_batch_size,
                slot_tokens: config.context_length,
                ..LlamaConfig::cpu(config.path.clone())
            })
            .await?,
        ),
        EngineKind::Mistralrs => Arc::new(
            MistralEngine::load(MistralConfig {
                path: config.path.clone(),
                dtype: config.dtype.clone(),
                cuda: config.device == DeviceKind::Cuda,
                max_batch_size: config.max_batch_size,
                prefix_cache_entries: PREFIX_CACHE_ENTRIES,
            })
            .await?,
        ),
    };
    Ok(engine)
}

/// Generates one token, so that readiness means the model really generates.
async fn warm_up(slot: &ModelSlot, engine: &dyn Engine) {
    let prompt = match engine.tokenize("Hello").await {
        Ok(tokens) => tokens,
        Err(e) => return error!(model = %slot.name, cause = %e, "warm-up failed"),
    };
    let request = GenerateRequest {
        prompt,
        n: 1,
        sampling: SamplingParams::greedy(),
        seed: Some(0),
        max_tokens: 1,
        stop_tokens: Default::default(),
        top_logprobs: 0,
        keep_distribution: false,
        cancel: CancellationToken::new(),
        cached_prompt_tokens: Default::default(),
    };
    let mut continuation = match engine.generate(request) {
        Ok(mut c) => c.remove(0),
        Err(e) => return error!(model = %slot.name, cause = %e, "warm-up failed"),
    };
    while let Some(event) = continuation.events.recv().await {
        match event {
            StepEvent::Finished(_) => {
                slot.mark_ready();
                info!(model = %slot.name, "model ready");
                return;
            }
            StepEvent::Error(e) => return error!(model = %slot.name, cause = %e, "warm-up failed"),
            StepEvent::Token(_) => {}
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Binds, starts loading and serves until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // The trace store is opened first, so that a damaged one stops the
    // server before it listens.
    let state = Arc::new(AppState::new(config)?);
    let listener = TcpListener::bind(state.config.listen).await?;
    let address = listener.local_addr()?;
    // Tests and scripts read this line to find a port chosen by the OS.
    info!(address = %address, "listening on http://{address}");
    tokio::spawn(load_models(state.clone()));
    let stop_extraction = CancellationToken::new();
    if let (Some(interval), Some(_)) = (state.config.extraction.interval, &state.traces) {
        tokio::spawn(extraction::run_periodically(
            state.clone(),
            interval,
            stop_extraction.clone(),
        ));
    }
    run(listener, state.clone(), shutdown_signal()).await?;
    stop_extraction.cancel();
    // Leave time for streams that finished during the drain to flush.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(traces) = &state.traces {
        let recorder = traces.recorder.clone();
        tokio::task::spawn_blocking(move || recorder.close(TRACE_FLUSH_TIMEOUT)).await?;
    }
    info!("stopped");
    Ok(())
}
