//! Prometheus metrics. Names carry the `mull_` prefix; labels come from small
//! fixed sets (configured model names, endpoint, status class, finish
//! reason) so that clients cannot grow the series count.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label used for requests naming a model that is not served.
pub const UNKNOWN_MODEL: &str = "unknown";

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub finished_choices: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub request_latency: HistogramVec,
    pub queue_time: HistogramVec,
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub strategy_requests: IntCounterVec,
    pub strategy_engine_tokens: IntCounterVec,
    pub strategy_returned_tokens: IntCounterVec,
    pub cautious_branch_points: IntCounter,
    pub cautious_trials: IntCounter,
    pub self_consistency_agreement: Histogram,
    pub self_consistency_early_stops: IntCounter,
    pub introspection_turns: Histogram,
    pub handbook_behaviors_retrieved: IntCounter,
    pub traces_written: IntCounter,
    pub traces_dropped: IntCounter,
    pub trace_write_errors: IntCounter,
    pub traces_pruned: IntCounter,
    pub handbook_traces_examined: IntCounter,
    pub handbook_behaviors_extracted: IntCounter,
    pub prefix_cache_hits: IntCounterVec,
    pub engine_sequences: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric names and labels are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let requests = counter(
            "mull_requests_total",
            "HTTP requests to the generation and model routes, by status class",
            &["model", "endpoint", "status"],
        );
        let prompt_tokens = counter(
            "mull_prompt_tokens_total",
            "Prompt tokens of finished requests, as reported in usage",
            &["model"],
        );
        let generation_tokens = counter(
            "mull_generation_tokens_total",
            "Generated tokens of finished requests, as reported in usage",
            &["model"],
        );
        let finished_choices = counter(
            "mull_finished_choices_total",
            "Choices that ended, by finish reason",
            &["model", "finish_reason"],
        );
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("metric names and labels are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let seconds = || exponential_buckets(0.001, 2.0, 18).expect("valid bucket layout");
        let time_to_first_token = histogram(
            "mull_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            &["model"],
            seconds(),
        );
        let inter_token_latency = histogram(
            "mull_inter_token_latency_seconds",
            "Time between consecutive tokens of one choice",
            &["model"],
            seconds(),
        );
        let request_latency = histogram(
            "mull_request_latency_seconds",
            "End-to-end time of generation requests",
            &["model", "endpoint"],
            seconds(),
        );
        let queue_time = histogram(
            "mull_queue_time_seconds",
            "Time requests waited for a generation slot",
            &["model"],
            seconds(),
        );
        let gauge = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &["model"])
                .expect("metric names and labels are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let running = gauge(
            "mull_requests_running",
            "Requests holding a generation slot",
        );
        let waiting = gauge(
            "mull_requests_waiting",
            "Requests queued for a generation slot",
        );
        let strategy_requests = counter(
            "mull_strategy_requests_total",
            "Requests decoded with each strategy (the outermost one)",
            &["strategy"],
        );
        let strategy_engine_tokens = counter(
            "mull_strategy_engine_tokens_total",
            "Engine tokens spent by each strategy, discarded work included",
            &["strategy", "kind"],
        );
        let strategy_returned_tokens = counter(
            "mull_strategy_returned_tokens_total",
            "Tokens each strategy returned to clients",
            &["strategy"],
        );
        let plain_counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("metric names are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let cautious_branch_points = plain_counter(
            "mull_cautious_branch_points_total",
            "Positions where cautious decoding branched into trials",
        );
        let cautious_trials = plain_counter(
            "mull_cautious_trials_total",
            "Trials sampled by cautious decoding",
        );
        let self_consistency_early_stops = plain_counter(
            "mull_self_consistency_early_stops_total",
            "Self-consistency requests that stopped sampling once the vote was decided",
        );
        let handbook_behaviors_retrieved = plain_counter(
            "mull_handbook_behaviors_retrieved_total",
            "Behaviors put into prompts by the handbook strategy",
        );
        let traces_written = plain_counter(
            "mull_traces_written_total",
            "Traces written to the trace store",
        );
        let traces_dropped = plain_counter(
            "mull_traces_dropped_total",
            "Traces dropped because the writer's queue was full or the writer had stopped",
        );
        let trace_write_errors = plain_counter(
            "mull_trace_write_errors_total",
            "Failed writes to the trace store (traces, retrieval counts, retention)",
        );
        let traces_pruned = plain_counter(
            "mull_traces_pruned_total",
            "Traces deleted by the retention limits",
        );
        let handbook_traces_examined = plain_counter(
            "mull_handbook_traces_examined_total",
            "Solved traces shown to the model to extract behaviors",
        );
        let handbook_behaviors_extracted = plain_counter(
            "mull_handbook_behaviors_extracted_total",
            "New behaviors stored by extraction",
        );
        let plain_histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("metric names are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let self_consistency_agreement = plain_histogram(
            "mull_self_consistency_agreement_ratio",
            "Share of self-consistency samples that voted for the returned answer",
            vec![0.2, 0.4, 0.5, 0.6, 0.8, 1.0],
        );
        let introspection_turns = plain_histogram(
            "mull_introspection_turns",
            "Turns taken by introspection requests",
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
        );
        let prefix_cache_hits = counter(
            "mull_engine_prefix_cache_hits_total",
            "Engine sequences that started from a cached prompt prefix",
            &["model"],
        );
        let engine_sequences = counter(
            "mull_engine_sequences_total",
            "Sequences the engine started",
            &["model"],
        );
        Self {
            prefix_cache_hits,
            engine_sequences,
            strategy_requests,
            strategy_engine_tokens,
            strategy_returned_tokens,
            cautious_branch_points,
            cautious_trials,
            self_consistency_agreement,
            self_consistency_early_stops,
            introspection_turns,
            handbook_behaviors_retrieved,
            traces_written,
            traces_dropped,
            trace_write_errors,
            traces_pruned,
            handbook_traces_examined,
            handbook_behaviors_extracted,
            registry,
            requests,
            prompt_tokens,
            generation_tokens,
            finished_choices,
            time_to_first_token,
            inter_token_latency,
            request_latency,
            queue_time,
            running,
            waiting,
        }
    }

    /// Renders the registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Status label of requests whose client disconnected before a whole
/// response was sent.
pub const DISCONNECTED: &str = "disconnected";

/// `2xx`, `4xx` or `5xx` (and so on) for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
