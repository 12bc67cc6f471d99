//! mull: an OpenAI-compatible inference server for quantized models.
//!
//! - [`api`]: OpenAI request and response types, validated at the edge.
//! - [`server`]: routes, admission, authentication, streaming.
//! - [`engine`]: the engine trait and its mistral.rs implementation.
//! - [`decoding`]: decoding strategies chosen per request.
//! - [`generation`]: engine steps to client text (UTF-8, stop strings).
//! - [`traces`]: the record of completed requests and its SQLite store.
//! - [`handbook`]: the learned behavior handbook and its extraction.
//! - [`metrics`]: Prometheus metrics.
//! - [`config`]: flags, environment and TOML configuration.
//! - [`fetch`]: fetching and requantizing the default model.
//! - [`serve`]: starting, loading and draining a server.
//! - [`speed`]: in-process prefill and decode speed measurement.

pub mod api;
pub mod bench;
pub mod config;
pub mod decoding;
pub mod engine;
pub mod fetch;
pub mod generation;
pub mod handbook;
pub mod metrics;
pub mod serve;
pub mod server;
pub mod speed;
pub mod traces;
