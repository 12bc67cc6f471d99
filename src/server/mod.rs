//! HTTP layer: routing, request admission, authentication, observability and
//! the OpenAI-compatible handlers.

mod admin;
mod admission;
mod auth;
pub mod extraction;
mod generate;
mod observe;
mod routes;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::DefaultBodyLimit,
    http::{header, HeaderValue, Method},
    middleware,
    routing::{get, post},
    Router,
};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use admission::{Admission, Permit};
pub use generate::TRACE_ID_HEADER;

use crate::{
    api::params::Limits,
    config::Config,
    decoding::{self, handbook::StaticHandbook, BehaviorSource, Strategy},
    engine::Engine,
    handbook::StoredHandbook,
    metrics::Metrics,
    traces::{postgres::PostgresStore, sqlite::SqliteStore, Recorder, StoreError, TraceStore},
};

/// One configured model and, once loaded, its engine.
pub struct ModelSlot {
    pub name: String,
    pub created: u64,
    engine: OnceLock<Arc<dyn Engine>>,
    /// Set once the engine has generated its first token.
    ready: AtomicBool,
    pub admission: Admission,
    /// Decoding applied when a request names none.
    pub default_strategy: Option<Arc<dyn Strategy>>,
}

impl ModelSlot {
    pub fn engine(&self) -> Option<Arc<dyn Engine>> {
        self.engine.get().cloned()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Installs the loaded engine; the model is served from then on.
    pub fn install(&self, engine: Arc<dyn Engine>) {
        let _ = self.engine.set(engine);
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
}

/// State shared by every handler.
pub struct AppState {
    pub config: Config,
    pub models: Vec<Arc<ModelSlot>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Presets by name; `MODEL:PRESET` selects one as a model alias.
    pub presets: BTreeMap<String, Arc<dyn Strategy>>,
    pub behaviors: Arc<dyn BehaviorSource>,
    /// The trace store; `None` when recording is off.
    pub traces: Option<Traces>,
    /// Held by the extraction run in progress, so that runs never overlap.
    pub extraction: tokio::sync::Mutex<()>,
}

/// The trace store, the queue in front of it and the handbook kept in it.
pub struct Traces {
    pub store: Arc<dyn TraceStore>,
    pub recorder: Arc<Recorder>,
    pub handbook: Arc<StoredHandbook>,
}

impl Traces {
    /// Opens the store and starts its writer. Runs on a thread of its own,
    /// because the PostgreSQL client must not block an async thread.
    fn open(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Self>, StoreError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| Self::open_here(config, metrics))
                .join()
                .expect("opening the trace store does not panic")
        })
    }

    fn open_here(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Self>, StoreError> {
        let Some(trace_config) = &config.traces else {
            return Ok(None);
        };
        let store: Arc<dyn TraceStore> = match &trace_config.postgres_url {
            Some(url) => Arc::new(PostgresStore::connect(
                url.expose(),
                "the PostgreSQL store of traces_postgres_url",
            )?),
            None => Arc::new(SqliteStore::open(&trace_config.path)?),
        };
        let recorder = Arc::new(Recorder::start(
            store.clone(),
            trace_config,
            metrics.clone(),
        ));
        let handbook = Arc::new(StoredHandbook::open(
            store.clone(),
            recorder.clone(),
            &config.handbook,
        )?);
        Ok(Some(Self {
            store,
            recorder,
            handbook,
        }))
    }
}

impl AppState {
    /// State with one empty slot per configured model. Fails when the
    /// trace store cannot be opened.
    pub fn new(config: Config) -> Result<Self, StoreError> {
        let metrics = Arc::new(Metrics::new());
        let strategy = |value: &serde_json::Value| {
            decoding::parse(value, "decoding").expect("configured strategies are validated")
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let models = config
            .models
            .iter()
            .map(|model| {
                let gauge = |g: &prometheus::IntGaugeVec| g.with_label_values(&[&model.name]);
                Arc::new(ModelSlot {
                    name: model.name.clone(),
                    created,
                    engine: OnceLock::new(),
                    ready: AtomicBool::new(false),
                    admission: Admission::new(
                        config.max_concurrent_requests,
                        config.max_queued_requests,
                        gauge(&metrics.running),
                        gauge(&metrics.waiting),
                    ),
                    default_strategy: model.default_strategy.as_ref().map(strategy),
                })
            })
            .collect();
        let limits = Limits {
            max_n: config.max_n,
            ..Limits::default()
        };
        let presets = config
            .presets
            .iter()
            .map(|(name, value)| (name.clone(), strategy(value)))
            .collect();
        let traces = Traces::open(&config, &metrics)?;
        let behaviors: Arc<dyn BehaviorSource> = match &traces {
            Some(traces) => traces.handbook.clone(),
            None => Arc::new(StaticHandbook::new(config.handbook.clone())),
        };
        Ok(Self {
            config,
            models,
            metrics,
            limits,
            presets,
            behaviors,
            traces,
            extraction: tokio::sync::Mutex::new(()),
        })
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Resolves a requested model id: a model name, or `MODEL:PRESET`.
    pub fn resolve(&self, id: &str) -> Option<(&Arc<ModelSlot>, Option<Arc<dyn Strategy>>)> {
        if let Some(slot) = self.model(id) {
            return Some((slot, None));
        }
        let (model, preset) = id.rsplit_once(':')?;
        Some((self.model(model)?, Some(self.presets.get(preset)?.clone())))
    }
}

/// Builds the whole HTTP application, which tests can drive without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(routes::list_models))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/completions", post(generate::completions))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let mut router = Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .merge(v1);
    // Without a key (or without a store) the admin routes do not exist.
    if state.config.admin_key.is_some() && state.traces.is_some() {
        router = router.merge(admin::routes(state.clone()));
    }
    let mut router = router
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Handlers read the body themselves, with the configured limit, so
        // that an oversized body gets the OpenAI error envelope.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ));
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        router = router.layer(cors);
    }
    router.with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::HeaderName::from_static(observe::REQUEST_ID_HEADER),
                header::HeaderName::from_static(TRACE_ID_HEADER),
            ]),
    )
}
