//! Server configuration: command-line flags, each with an environment
//! variable, over an optional TOML file that fills the same struct, over
//! built-in defaults. [`ServeArgs::resolve`] validates everything once.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::Args;
use serde::Deserialize;

use crate::{
    fetch::DefaultFormat,
    traces::{Retention, TraceConfig},
};

/// A secret string whose `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Self(s.to_string()))
    }
}

/// One model entry of the TOML file's `[[models]]` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The id clients send as `model`.
    pub name: String,
    /// Path of the GGUF file.
    pub path: PathBuf,
    pub dtype: Option<String>,
    pub device: Option<String>,
    pub engine: Option<String>,
    pub threads: Option<usize>,
    pub max_batch_size: Option<usize>,
    /// Decoding used when a request names none: a preset name or a
    /// `decoding` table.
    pub default_strategy: Option<serde_json::Value>,
}

/// Options of `mull serve`. Every field is optional here so that the flags,
/// the environment and the file can be layered; defaults apply last.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these options (flags and environment win).
    #[arg(long, env = "MULL_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "MULL_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "MULL_PORT")]
    pub port: Option<u16>,
    /// Id of the model given by --model-path [default: smollm2-135m].
    #[arg(long, env = "MULL_MODEL_NAME")]
    pub model_name: Option<String>,
    /// GGUF file to serve [default: the fetched SmolLM2-135M-Instruct].
    #[arg(long, env = "MULL_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
    /// Folder where `mull fetch` stores the default model [default: models].
    #[arg(long, env = "MULL_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Format the default model is served in: q8_0 (converted once from the
    /// shipped Q4_1, fastest on CPU), q4_1 (as shipped) or q4_0 [default: q8_0].
    #[arg(long, env = "MULL_DEFAULT_FORMAT")]
    pub default_format: Option<String>,
    /// Activation dtype: f32, bf16, f16 or auto [default: f32, fastest on CPU].
    #[arg(long, env = "MULL_DTYPE")]
    pub dtype: Option<String>,
    /// Device: cpu or cuda (needs a build with the `cuda` feature) [default: cpu].
    #[arg(long, env = "MULL_DEVICE")]
    pub device: Option<String>,
    /// Engine: llama (llama.cpp, the faster one on CPU) or mistralrs (needed
    /// for cuda) [default: llama on cpu, mistralrs on cuda].
    #[arg(long, env = "MULL_ENGINE")]
    pub engine: Option<String>,
    /// CPU threads of the llama engine [default: the number of cores].
    #[arg(long, env = "MULL_THREADS")]
    pub threads: Option<usize>,
    /// Tokens per sequence, prompt and output, that the llama engine keeps
    /// KV cache for, in every batch slot [default: 4096, at most the
    /// model's trained context].
    #[arg(long, env = "MULL_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,
    /// Sequences the engine decodes together [default: 16 for llama, 1 for
    /// mistralrs]. On CPU, mistral.rs 0.8.1 garbles sequences of equal
    /// length decoded in one batch, so it runs them one at a time.
    #[arg(long, env = "MULL_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Requests generating at once [default: 16].
    #[arg(long, env = "MULL_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Requests waiting for a slot before new ones get 429 [default: 64].
    #[arg(long, env = "MULL_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Largest accepted request body, in bytes [default: 1048576].
    #[arg(long, env = "MULL_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest `n` a request may ask for [default: 16].
    #[arg(long, env = "MULL_MAX_N")]
    pub max_n: Option<usize>,
    /// Seconds a request may take, queueing included, before it is ended [default: 600].
    #[arg(long, env = "MULL_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C [default: 30].
    #[arg(long, env = "MULL_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// API keys, comma-separated; when set, /v1 routes need `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "MULL_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Option<Vec<Secret>>,
    /// Origins allowed by CORS, comma-separated; `*` allows any [default: none].
    #[arg(long, env = "MULL_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "MULL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter in `tracing` syntax, such as `info` or `mull=debug` [default: info].
    #[arg(long, env = "MULL_LOG")]
    pub log: Option<String>,
    /// JSON file of behaviors for the handbook strategy [default: none].
    #[arg(long, env = "MULL_HANDBOOK_PATH")]
    pub handbook_path: Option<PathBuf>,
    /// Record a trace of every completed request, unless the request sets
    /// `"store": false` [default: true].
    #[arg(long, env = "MULL_TRACES")]
    pub traces: Option<bool>,
    /// SQLite file of the trace store, created when missing [default: mull-traces.db].
    #[arg(long, env = "MULL_TRACES_PATH")]
    pub traces_path: Option<PathBuf>,
    /// PostgreSQL connection string (such as `host=db user=mull dbname=mull`
    /// or a postgres:// URL) of a trace store shared by several servers;
    /// replaces traces_path [default: none].
    #[arg(long, env = "MULL_TRACES_POSTGRES_URL", hide_env_values = true)]
    pub traces_postgres_url: Option<Secret>,
    /// Traces that may wait for the store's writer; more are dropped and
    /// counted in mull_traces_dropped_total [default: 1024].
    #[arg(long, env = "MULL_TRACE_QUEUE_CAPACITY")]
    pub trace_queue_capacity: Option<usize>,
    /// Days a trace is kept; 0 keeps traces forever [default: 30].
    #[arg(long, env = "MULL_TRACE_MAX_AGE_DAYS")]
    pub trace_max_age_days: Option<u64>,
    /// Size in MiB past which the oldest traces are deleted; 0 sets no
    /// bound [default: 1024].
    #[arg(long, env = "MULL_TRACE_MAX_SIZE_MB")]
    pub trace_max_size_mb: Option<u64>,
    /// Key of the admin API (/admin routes), sent as `Authorization: Bearer
    /// KEY`; without it the admin API is off [default: none].
    #[arg(long, env = "MULL_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<Secret>,
    /// Seconds between runs that extract behaviors from solved traces; 0
    /// turns the background runs off [default: 600].
    #[arg(long, env = "MULL_EXTRACTION_INTERVAL_SECS")]
    pub extraction_interval_secs: Option<u64>,
    /// Traces one extraction run shows to the model, at most [default: 4].
    #[arg(long, env = "MULL_EXTRACTION_BATCH")]
    pub extraction_batch: Option<usize>,
    /// Self-consistency agreement from which a trace counts as solved, 0 to
    /// 1 [default: 0.6].
    #[arg(long, env = "MULL_EXTRACTION_MIN_AGREEMENT")]
    pub extraction_min_agreement: Option<f64>,
    /// Models from the TOML file; --model-path replaces them with one.
    #[arg(skip)]
    pub models: Option<Vec<ModelEntry>>,
    /// Named `decoding` objects from the TOML file; each is also served as
    /// the model alias `MODEL:PRESET`.
    #[arg(skip)]
    pub presets: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// llama.cpp through `llama-cpp-2`: continuous batching and a shared
    /// prefix cache, CPU only in this build.
    Llama,
    /// mistral.rs: CPU or CUDA.
    Mistralrs,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistralrs => "mistralrs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    pub dtype: String,
    pub device: DeviceKind,
    pub engine: EngineKind,
    pub threads: usize,
    pub context_length: usize,
    pub max_batch_size: usize,
    /// The `decoding` object applied when a request has none.
    pub default_strategy: Option<serde_json::Value>,
    /// Set for the default model, which is fetched (and converted to this
    /// format) when its file is missing.
    pub fetch_default: Option<DefaultFormat>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub models: Vec<ModelConfig>,
    pub max_concurrent_requests: usize,
    pub max_queued_requests: usize,
    pub max_body_bytes: usize,
    pub max_n: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub api_keys: Vec<Secret>,
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    pub log: String,
    /// Behaviors read from `handbook_path`.
    pub handbook: Vec<crate::decoding::Behavior>,
    /// Validated `decoding` objects by preset name.
    pub presets: std::collections::BTreeMap<String, serde_json::Value>,
    /// The trace store; `None` when recording is off.
    pub traces: Option<TraceConfig>,
    /// Key of the admin API, which is off without one.
    pub admin_key: Option<Secret>,
    pub extraction: ExtractionConfig,
}

/// When and how much the background task extracts behaviors.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractionConfig {
    /// Time between background runs; `None` runs only when the admin API
    /// asks.
    pub interval: Option<Duration>,
    /// Traces shown to the model per run.
    pub batch: usize,
    /// Self-consistency agreement from which a trace counts as solved.
    pub min_agreement: f64,
}

/// How often the trace writer enforces the retention limits.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Every invalid option, each named.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

const DTYPES: &[&str] = &["f32", "bf16", "f16", "auto"];

impl ServeArgs {
    /// Layers flags over the TOML file named by `--config`, then validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(vec![format!("config: cannot read {}: {e}", path.display())])
                })?;
                toml::from_str::<ServeArgs>(&text).map_err(|e| {
                    ConfigError(vec![format!(
                        "config: {} is not valid: {e}",
                        path.display()
                    )])
                })?
            }
            None => ServeArgs::default(),
        };
        self.over(file).validate()
    }

    /// Takes each option from `self` where set, else from `file`.
    fn over(self, file: ServeArgs) -> ServeArgs {
        macro_rules! layer {
            ($($field:ident),*) => {
                ServeArgs { config: self.config, $($field: self.$field.or(file.$field)),* }
            };
        }
        layer!(
            host,
            port,
            model_name,
            model_path,
            models_dir,
            default_format,
            dtype,
            device,
            engine,
            threads,
            context_length,
            max_batch_size,
            max_concurrent_requests,
            max_queued_requests,
            max_body_bytes,
            max_n,
            request_timeout_secs,
            shutdown_grace_secs,
            api_keys,
            cors_origins,
            log_format,
            log,
            handbook_path,
            traces,
            traces_path,
            traces_postgres_url,
            trace_queue_capacity,
            trace_max_age_days,
            trace_max_size_mb,
            admin_key,
            extraction_interval_secs,
            extraction_batch,
            extraction_min_agreement,
            models,
            presets
        )
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let host = self.host.unwrap_or_else(|| "127.0.0.1".into());
        let port = self.port.unwrap_or(8080);
        let listen = match format!("{host}:{port}").parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match format!("[{host}]:{port}").parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    errors.push(format!("host: `{host}` is not an IP address"));
                    SocketAddr::from(([127, 0, 0, 1], port))
                }
            },
        };

        let default_dtype = self.dtype.unwrap_or_else(|| "f32".into());
        let default_device = self.device.unwrap_or_else(|| "cpu".into());
        let default_engine = self.engine.clone();
        let default_threads = self.threads;
        let default_batch = self.max_batch_size;
        let entries = match (self.model_path, self.models) {
            (Some(path), _) => vec![ModelEntry {
                name: self
                    .model_name
                    .clone()
                    .unwrap_or_else(|| "smollm2-135m".into()),
                path,
                dtype: None,
                device: None,
                engine: None,
                threads: None,
                max_batch_size: None,
                default_strategy: None,
            }],
            (None, Some(models)) if !models.is_empty() => models,
            _ => Vec::new(),
        };
        let format = match self.default_format.as_deref().unwrap_or("q8_0").parse() {
            Ok(format) => format,
            Err(e) => {
                errors.push(format!("default_format: {e}"));
                DefaultFormat::Q8_0
            }
        };
        let fetch_default = entries.is_empty().then_some(format);
        let entries = if fetch_default.is_some() {
            let dir = self.models_dir.unwrap_or_else(|| "models".into());
            vec![ModelEntry {
                name: self.model_name.unwrap_or_else(|| "smollm2-135m".into()),
                path: dir.join(format.file_name()),
                dtype: None,
                device: None,
                engine: None,
                threads: None,
                max_batch_size: None,
                default_strategy: None,
            }]
        } else {
            entries
        };

        let presets = self.presets.unwrap_or_default();
        for (name, value) in &presets {
            if name.is_empty() || name.contains(':') {
                errors.push(format!(
                    "presets.{name}: a preset name must be non-empty and without `:`"
                ));
            }
            if let Err(e) = crate::decoding::parse(value, &format!("presets.{name}")) {
                errors.push(config_error(e));
            }
        }
        let mut models = Vec::new();
        let context_length = self.context_length.unwrap_or(4096);
        if context_length < 256 {
            errors.push(format!(
                "context_length: {context_length} is too small, use at least 256"
            ));
        }
        for (i, entry) in entries.into_iter().enumerate() {
            let field = |name: &str| format!("models[{i}].{name}");
            let dtype = entry.dtype.unwrap_or_else(|| default_dtype.clone());
            if !DTYPES.contains(&dtype.as_str()) {
                errors.push(format!(
                    "{}: `{dtype}` is not one of {}",
                    field("dtype"),
                    DTYPES.join(", ")
                ));
            }
            let device = match entry.device.as_deref().unwrap_or(&default_device) {
                "cpu" => DeviceKind::Cpu,
                "cuda" => DeviceKind::Cuda,
                other => {
                    errors.push(format!("{}: `{other}` is not cpu or cuda", field("device")));
                    DeviceKind::Cpu
                }
            };
            if device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
                errors.push(format!(
                    "{}: cuda needs a build with `--features cuda`",
                    field("device")
                ));
            }
            if entry.name.is_empty() {
                errors.push(format!("{}: must not be empty", field("name")));
            }
            if models.iter().any(|m: &ModelConfig| m.name == entry.name) {
                errors.push(format!(
                    "{}: `{}` is configured twice",
                    field("name"),
                    entry.name
                ));
            }
            if fetch_default.is_none() && !entry.path.is_file() {
                errors.push(format!(
                    "{}: {} is not a file",
                    field("path"),
                    entry.path.display()
                ));
            }
            let default_strategy = match entry.default_strategy {
                Some(serde_json::Value::String(preset)) => match presets.get(&preset) {
                    Some(value) => Some(value.clone()),
                    None => {
                        errors.push(format!(
                            "{}: no preset named `{preset}`",
                            field("default_strategy")
                        ));
                        None
                    }
                },
                Some(value) => {
                    if let Err(e) = crate::decoding::parse(&value, &field("default_strategy")) {
                        errors.push(config_error(e));
                    }
                    Some(value)
                }
                None => None,
            };
            let engine = match entry.engine.as_deref().or(default_engine.as_deref()) {
                Some("llama") => EngineKind::Llama,
                Some("mistralrs") => EngineKind::Mistralrs,
                None if device == DeviceKind::Cuda => EngineKind::Mistralrs,
                None => EngineKind::Llama,
                Some(other) => {
                    errors.push(format!(
                        "{}: `{other}` is not llama or mistralrs",
                        field("engine")
                    ));
                    EngineKind::Llama
                }
            };
            if engine == EngineKind::Llama && device == DeviceKind::Cuda {
                errors.push(format!(
                    "{}: the llama engine runs on cpu in this build; use mistralrs for cuda",
                    field("engine")
                ));
            }
            let threads = entry
                .threads
                .or(default_threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            if threads == 0 {
                errors.push(format!("{}: must be at least 1", field("threads")));
            }
            let max_batch_size = entry
                .max_batch_size
                .or(default_batch)
                .unwrap_or(match engine {
                    EngineKind::Llama => 16,
                    EngineKind::Mistralrs => 1,
                });
            if max_batch_size == 0 {
                errors.push(format!("{}: must be at least 1", field("max_batch_size")));
            }
            models.push(ModelConfig {
                name: entry.name,
                path: entry.path,
                dtype,
                device,
                engine,
                threads,
                context_length,
                max_batch_size,
                default_strategy,
                fetch_default,
            });
        }

        let mut at_least_one = |name: &str, value: Option<usize>, default: usize| {
            let value = value.unwrap_or(default);
            if value == 0 {
                errors.push(format!("{name}: must be at least 1"));
            }
            value
        };
        let max_concurrent_requests =
            at_least_one("max_concurrent_requests", self.max_concurrent_requests, 16);
        let max_body_bytes = at_least_one("max_body_bytes", self.max_body_bytes, 1 << 20);
        let max_n = at_least_one("max_n", self.max_n, 16);
        let extraction_batch = at_least_one("extraction_batch", self.extraction_batch, 4);
        let request_timeout_secs = self.request_timeout_secs.unwrap_or(600);
        if request_timeout_secs == 0 {
            errors.push("request_timeout_secs: must be at least 1".into());
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                errors.push(format!("log_format: `{other}` is not text or json"));
                LogFormat::Text
            }
        };
        let api_keys = self.api_keys.unwrap_or_default();
        if api_keys.iter().any(|k| k.expose().trim().is_empty()) {
            errors.push("api_keys: keys must not be empty".into());
        }
        let handbook = match &self.handbook_path {
            Some(path) => match crate::decoding::handbook::read_behaviors(path) {
                Ok(behaviors) => behaviors,
                Err(e) => {
                    errors.push(format!("handbook_path: {e}"));
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let traces = self.traces.unwrap_or(true).then(|| {
            let days = self.trace_max_age_days.unwrap_or(30);
            let megabytes = self.trace_max_size_mb.unwrap_or(1024);
            TraceConfig {
                path: self.traces_path.unwrap_or_else(|| "mull-traces.db".into()),
                postgres_url: self.traces_postgres_url,
                queue_capacity: self.trace_queue_capacity.unwrap_or(1024),
                retention: Retention {
                    max_age: (days > 0).then(|| Duration::from_secs(days.saturating_mul(86_400))),
                    max_bytes: (megabytes > 0).then(|| megabytes.saturating_mul(1 << 20)),
                },
                retention_interval: RETENTION_INTERVAL,
            }
        });
        let admin_key = self.admin_key;
        if admin_key
            .as_ref()
            .is_some_and(|k| k.expose().trim().is_empty())
        {
            errors.push("admin_key: must not be empty".into());
        }
        if admin_key.is_some() && traces.is_none() {
            errors.push(
                "admin_key: the admin API serves the trace store, which `traces = false` turns off"
                    .into(),
            );
        }
        let min_agreement = self.extraction_min_agreement.unwrap_or(0.6);
        if !(0.0..=1.0).contains(&min_agreement) {
            errors.push(format!(
                "extraction_min_agreement: must be from 0 to 1, got {min_agreement}"
            ));
        }
        let extraction = ExtractionConfig {
            interval: match self.extraction_interval_secs.unwrap_or(600) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            batch: extraction_batch,
            min_agreement,
        };
        // With a trace store, behaviors can also come from the store.
        if handbook.is_empty() && traces.is_none() {
            let defaults = models.iter().filter_map(|m| m.default_strategy.as_ref());
            if presets.values().chain(defaults).any(uses_handbook) {
                errors.push(
                    "handbook_path: a preset or default strategy uses the handbook strategy, \
                     which needs a handbook file or the trace store"
                        .into(),
                );
            }
        }
        let log = self.log.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
            errors.push(format!("log: `{log}` is not a valid filter"));
        }
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(Config {
            listen,
            models,
            max_concurrent_requests,
            max_queued_requests: self.max_queued_requests.unwrap_or(64),
            max_body_bytes,
            max_n,
            request_timeout: Duration::from_secs(request_timeout_secs),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs.unwrap_or(30)),
            api_keys,
            cors_origins: self.cors_origins.unwrap_or_default(),
            log_format,
            log,
            handbook,
            presets,
            traces,
            admin_key,
            extraction,
        })
    }
}

/// Turns a strategy's validation error into a configuration error naming
/// the key.
fn config_error(error: crate::api::ApiError) -> String {
    let param = error.param.unwrap_or_default();
    if error.message.contains(&param) {
        error.message
    } else {
        format!("{param}: {}", error.message)
    }
}

/// Returns whether a `decoding` object uses the handbook, at the top or
/// inside.
fn uses_handbook(value: &serde_json::Value) -> bool {
    value["strategy"] == crate::decoding::handbook::NAME
        || value.get("inner").is_some_and(uses_handbook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let config = ServeArgs::default().resolve().unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.models.len(), 1);
        assert_eq!(config.models[0].fetch_default, Some(DefaultFormat::Q8_0));
        assert_eq!(config.models[0].dtype, "f32");
    }

    #[test]
    fn every_bad_value_is_named() {
        let args = ServeArgs {
            max_concurrent_requests: Some(0),
            log_format: Some("xml".into()),
            dtype: Some("f8".into()),
            ..ServeArgs::default()
        };
        let ConfigError(errors) = args.resolve().unwrap_err();
        let all = errors.join("\n");
        assert!(all.contains("max_concurrent_requests"), "{all}");
        assert!(all.contains("log_format"), "{all}");
        assert!(all.contains("models[0].dtype"), "{all}");
    }

    #[test]
    fn flags_win_over_file() {
        let file: ServeArgs = toml::from_str("port = 9000\nmax_n = 3").unwrap();
        let flags = ServeArgs {
            port: Some(9100),
            ..ServeArgs::default()
        };
        let config = flags.over(file).validate().unwrap();
        assert_eq!(config.listen.port(), 9100);
        assert_eq!(config.max_n, 3);
    }

    #[test]
    fn api_keys_redacted_in_debug() {
        let args = ServeArgs {
            api_keys: Some(vec![Secret("sk-very-secret".into())]),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert!(!format!("{config:?}").contains("sk-very-secret"));
    }

    #[test]
    fn presets_validated_and_resolved() {
        let file: ServeArgs = toml::from_str(
            r#"
            [presets.consistent]
            strategy = "self_consistency"
            samples = 3

            [presets.broken]
            strategy = "self_consistency"
            samples = 0

            [[models]]
            name = "m"
            path = "Cargo.toml"
            default_strategy = "consistent"
            "#,
        )
        .unwrap();
        let ConfigError(errors) = ServeArgs::default().over(file).validate().unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("presets.broken.samples"), "{errors:?}");
    }

    #[test]
    fn handbook_preset_needs_handbook_file() {
        let file: ServeArgs = toml::from_str(
            r#"
            traces = false

            [presets.guided]
            strategy = "self_consistency"
            inner = { strategy = "handbook" }
            "#,
        )
        .unwrap();
        let ConfigError(errors) = ServeArgs::default().over(file).validate().unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("handbook_path")),
            "{errors:?}"
        );
    }

    #[test]
    fn documented_config_file_is_valid() {
        let text = include_str!("../config/mull.toml");
        let file: ServeArgs = toml::from_str(text).unwrap();
        let config = ServeArgs::default().over(file).validate().unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.max_concurrent_requests, 16);
    }

    #[test]
    fn admin_key_needs_trace_store() {
        let args = ServeArgs {
            traces: Some(false),
            admin_key: Some(Secret("admin-secret".into())),
            ..ServeArgs::default()
        };
        let ConfigError(errors) = args.resolve().unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("admin_key")),
            "{errors:?}"
        );
    }

    #[test]
    fn trace_retention_defaults_and_zero() {
        let config = ServeArgs::default().resolve().unwrap();
        let traces = config.traces.expect("recording is on by default");
        assert_eq!(
            traces.retention.max_age,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(traces.retention.max_bytes, Some(1024 << 20));
        let args = ServeArgs {
            trace_max_age_days: Some(0),
            trace_max_size_mb: Some(0),
            ..ServeArgs::default()
        };
        let traces = args.resolve().unwrap().traces.unwrap();
        assert_eq!(traces.retention.max_age, None);
        assert_eq!(traces.retention.max_bytes, None);
    }

    #[test]
    fn admin_key_redacted_in_debug() {
        let args = ServeArgs {
            admin_key: Some(Secret("admin-very-secret".into())),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert!(!format!("{config:?}").contains("admin-very-secret"));
    }

    #[test]
    fn unknown_file_key_rejected() {
        assert!(toml::from_str::<ServeArgs>("prot = 1").is_err());
    }
}
