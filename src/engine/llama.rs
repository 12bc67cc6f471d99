//! [`Engine`] on llama.cpp, through the `llama-cpp-2` crate.
//!
//! One thread owns the llama.cpp context and runs a continuous-batching
//! loop: every running sequence contributes its next token (or a chunk of
//! its prompt) to one decode call per step, and each sequence samples from
//! its own row of logits with this crate's [`Sampler`]. Each sequence runs
//! in a slot, a llama.cpp sequence id with a KV buffer of its own.
//!
//! A slot keeps its KV entries after its sequence ends, which makes every
//! slot a prefix cache entry. A new sequence starts from the longest prefix
//! of its prompt found in any slot, running or idle, by copying that slot's
//! buffer, which costs a memory copy instead of a forward pass over the
//! prefix. That is what lets the samples of one request, and the trials of
//! cautious decoding, all start from a prompt computed once.
//!
//! Slots have separate buffers rather than one shared cache. In a shared
//! cache a sequence's entries land wherever other sequences left room, so
//! the attention sums round differently from run to run, and seeded
//! requests did not repeat under concurrent load.

use std::{
    collections::{HashSet, VecDeque},
    num::NonZeroU32,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc, Arc, OnceLock,
    },
};

use async_trait::async_trait;
use llama_cpp_2::{
    context::{params::LlamaContextParams, LlamaContext},
    llama_backend::LlamaBackend,
    llama_batch::LlamaBatch,
    model::{params::LlamaModelParams, LlamaModel},
    token::LlamaToken,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    sampler::Sampler, template::ChatTemplate, vocab::GgufVocab, ChatTurn, Continuation, Engine,
    EngineError, FinishReason, GenerateRequest, ModelInfo, StepEvent,
};

/// How to load one GGUF model into llama.cpp.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub path: PathBuf,
    /// Threads for decoding and prompt processing.
    pub threads: usize,
    /// Sequences decoded together; more wait for a free slot.
    pub slots: usize,
    /// KV cache size of each slot in tokens, which bounds the context.
    pub slot_tokens: usize,
    /// Most tokens handed to llama.cpp in one decode call; long prompts are
    /// processed in chunks of this size between decoding steps.
    pub batch_tokens: usize,
    /// Layers offloaded to a GPU (needs a build with GPU support).
    pub gpu_layers: u32,
}

impl LlamaConfig {
    pub fn cpu(path: PathBuf) -> Self {
        Self {
            path,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            slots: 16,
            slot_tokens: 4096,
            batch_tokens: 512,
            gpu_layers: 0,
        }
    }
}

/// llama.cpp's global state may be initialized once per process.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every tensor it loads; route that to tracing,
            // where the log filter decides.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

pub struct LlamaEngine {
    model: Arc<LlamaModel>,
    info: ModelInfo,
    vocab: GgufVocab,
    template: Option<ChatTemplate>,
    commands: std_mpsc::Sender<Command>,
    stats: Arc<CacheStats>,
}

#[derive(Default)]
struct CacheStats {
    hits: AtomicUsize,
    sequences: AtomicUsize,
}

/// A sequence handed to the decoding thread.
struct NewSequence {
    prompt: Vec<u32>,
    sampler: Sampler,
    max_tokens: usize,
    stop_tokens: Arc<HashSet<u32>>,
    events: mpsc::UnboundedSender<StepEvent>,
    cancel: CancellationToken,
    /// Sequences of one request share a group, so that siblings wait for
    /// the first one's prompt instead of each computing it.
    group: u64,
    cached_prompt_tokens: Arc<AtomicUsize>,
}

enum Command {
    Start(Vec<NewSequence>),
}

impl LlamaEngine {
    pub async fn load(config: LlamaConfig) -> Result<Self, EngineError> {
        let load_error = |message: String| EngineError::Load {
            path: config.path.display().to_string(),
            message,
        };
        let vocab = GgufVocab::read(&config.path).map_err(load_error)?;
        let template = match &vocab.chat_template {
            Some(source) => Some(
                ChatTemplate::new(
                    source,
                    &vocab.token_text(vocab.bos_token),
                    &vocab.token_text(vocab.eos_token),
                )
                .map_err(load_error)?,
            ),
            None => None,
        };
        let path = config.path.clone();
        let gpu_layers = config.gpu_layers;
        let model = tokio::task::spawn_blocking(move || {
            let backend = backend()?;
            let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
            LlamaModel::load_from_file(backend, &path, &params).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| load_error(e.to_string()))?
        .map_err(load_error)?;
        let model = Arc::new(model);

        let eos_tokens = vocab.end_tokens();
        if eos_tokens.is_empty() {
            return Err(load_error(
                "GGUF metadata names no end-of-sequence token".into(),
            ));
        }
        let slots = config.slots.max(1);
        let trained = model.n_ctx_train() as usize;
        // llama.cpp rounds each slot's cache up to a multiple of 256.
        let slot_tokens = config.slot_tokens.min(trained).max(256).div_ceil(256) * 256;
        let info = ModelInfo {
            context_length: slot_tokens.min(trained),
            eos_tokens,
            vocab_size: model.n_vocab().max(0) as usize,
        };

        let (commands, receiver) = std_mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(CacheStats::default());
        let thread_model = model.clone();
        let thread_stats = stats.clone();
        let eos = info.eos_tokens.clone();
        let context_length = info.context_length;
        std::thread::Builder::new()
            .name("llama-decode".into())
            .spawn(move || {
                let params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new((slot_tokens * slots) as u32))
                    .with_n_batch(config.batch_tokens.max(slots) as u32)
                    .with_n_ubatch(config.batch_tokens.max(slots) as u32)
                    .with_n_seq_max(slots as u32)
                    .with_kv_unified(false)
                    .with_n_threads(config.threads as i32)
                    .with_n_threads_batch(config.threads as i32);
                let backend = match backend() {
                    Ok(backend) => backend,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let context = match thread_model.new_context(backend, params) {
                    Ok(context) => context,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut scheduler = Scheduler {
                    context,
                    batch: LlamaBatch::new(config.batch_tokens.max(slots), 1),
                    batch_tokens: config.batch_tokens.max(slots),
                    slots: (0..slots).map(|_| Slot::default()).collect(),
                    queue: VecDeque::new(),
                    eos,
                    context_length,
                    stats: thread_stats,
                    clock: 0,
                    costs: Costs::default(),
                };
                if slots > 1 {
                    scheduler.measure_copy();
                }
                let _ = ready_tx.send(Ok(()));
                scheduler.run(receiver);
            })
            .map_err(|e| load_error(e.to_string()))?;
        ready_rx
            .await
            .map_err(|_| load_error("the decoding thread stopped while starting".into()))?
            .map_err(load_error)?;

        Ok(Self {
            model,
            info,
            vocab,
            template,
            commands,
            stats,
        })
    }

    /// Tokenizes with llama.cpp's tokenizer; `add_special` adds the
    /// beginning-of-sequence token where the model expects one. Control
    /// tokens written out in the text become those tokens, as in Hugging
    /// Face's tokenizers.
    fn tokenize_text(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }
}

#[async_trait]
impl Engine for LlamaEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    async fn tokenize_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::Tokenize("the model has no chat template".into()))?;
        let text = template
            .render(messages, true)
            .map_err(EngineError::Tokenize)?;
        // The template writes the beginning-of-sequence token itself where
        // the model wants one, as Hugging Face's tokenizers expect.
        Ok(self.tokenize_text(&text, false))
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenize_text(text, true))
    }

    fn token_bytes(&self, token: u32) -> &[u8] {
        self.vocab
            .token_bytes
            .get(token as usize)
            .map_or(&[], Vec::as_slice)
    }

    fn control_tokens(&self) -> &[String] {
        &self.vocab.control_tokens
    }

    fn prefix_cache_stats(&self) -> Option<(usize, usize)> {
        Some((
            self.stats.hits.load(Ordering::Relaxed),
            self.stats.sequences.load(Ordering::Relaxed),
        ))
    }

    fn generate(&self, request: GenerateRequest) -> Result<Vec<Continuation>, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::Internal("empty prompt".into()));
        }
        let base_seed = request.seed.unwrap_or_else(rand::random);
        let group = rand::random();
        let stop_tokens = Arc::new(request.stop_tokens.clone());
        let mut continuations = Vec::with_capacity(request.n);
        let mut sequences = Vec::with_capacity(request.n);
        for i in 0..request.n {
            let (events_tx, events) = mpsc::unbounded_channel();
            let cancel = request.cancel.child_token();
            let sampler = Sampler::new(
                request.sampling.clone(),
                base_seed.wrapping_add(i as u64),
                request.top_logprobs,
            )
            .keep_distribution(request.keep_distribution);
            sequences.push(NewSequence {
                prompt: request.prompt.clone(),
                sampler,
                max_tokens: request.max_tokens,
                stop_tokens: stop_tokens.clone(),
                events: events_tx,
                cancel: cancel.clone(),
                group,
                cached_prompt_tokens: request.cached_prompt_tokens.clone(),
            });
            continuations.push(Continuation { events, cancel });
        }
        self.commands
            .send(Command::Start(sequences))
            .map_err(|_| EngineError::Internal("the decoding thread has stopped".into()))?;
        Ok(continuations)
    }
}

/// One llama.cpp sequence id and what its KV entries hold.
#[derive(Default)]
struct Slot {
    /// Tokens whose KV entries this slot holds, position by position.
    cached: Vec<u32>,
    /// The running sequence, if any.
    running: Option<Running>,
    /// When the slot was last used, for choosing which idle slot to reuse.
    last_used: u64,
}

struct Running {
    seq: NewSequence,
    /// Prompt and generated tokens; `tokens[..slot.cached.len()]` are in the
    /// KV cache and the rest go into the next decode calls.
    tokens: Vec<u32>,
    generated: usize,
}

struct Scheduler<'a> {
    context: LlamaContext<'a>,
    batch: LlamaBatch<'static>,
    batch_tokens: usize,
    slots: Vec<Slot>,
    queue: VecDeque<NewSequence>,
    eos: HashSet<u32>,
    context_length: usize,
    stats: Arc<CacheStats>,
    clock: u64,
    costs: Costs,
}

/// Measured costs that decide whether a slot copies another slot's KV
/// buffer or computes the shared prefix again.
#[derive(Default)]
struct Costs {
    /// Milliseconds one cross-slot copy adds to the next decode call.
    copy_ms: Option<f64>,
    /// Milliseconds per token of a decode call with many tokens, a moving
    /// average over recent prompt-heavy steps.
    token_ms: Option<f64>,
}

impl Costs {
    /// Returns whether copying beats computing `tokens` more prefix tokens.
    fn copy_pays(&self, tokens: usize) -> bool {
        match (self.copy_ms, self.token_ms) {
            (Some(copy), Some(token)) => tokens as f64 * token > copy,
            _ => tokens > RECOMPUTE_RATHER_THAN_COPY,
        }
    }

    fn record_step(&mut self, tokens: usize, elapsed: std::time::Duration) {
        if tokens < PROMPT_HEAVY_STEP {
            return;
        }
        let per_token = elapsed.as_secs_f64() * 1000.0 / tokens as f64;
        self.token_ms = Some(match self.token_ms {
            Some(average) => 0.8 * average + 0.2 * per_token,
            None => per_token,
        });
    }
}

impl Scheduler<'_> {
    /// Measures what a cross-slot copy costs. llama.cpp can defer the copy
    /// to the start of the next decode call, so the cost is the copy call
    /// plus that decode call, minus the same decode call without a copy
    /// (median of three).
    fn measure_copy(&mut self) {
        let decode_at = |scheduler: &mut Self, position: i32| {
            scheduler.batch.clear();
            scheduler
                .batch
                .add(LlamaToken(0), position, &[0], true)
                .map_err(|e| e.to_string())?;
            let begin = std::time::Instant::now();
            scheduler
                .context
                .decode(&mut scheduler.batch)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(begin.elapsed().as_secs_f64() * 1000.0)
        };
        let mut measure = || -> Result<f64, String> {
            decode_at(self, 0)?;
            let mut extra = Vec::new();
            for round in 0..3 {
                let plain = decode_at(self, 1 + 2 * round)?;
                let _ = self.context.clear_kv_cache_seq(Some(1), None, None);
                let begin = std::time::Instant::now();
                self.context
                    .copy_kv_cache_seq(0, 1, None, None)
                    .map_err(|e| e.to_string())?;
                let call = begin.elapsed().as_secs_f64() * 1000.0;
                let copied = decode_at(self, 2 + 2 * round)?;
                extra.push(call + (copied - plain).max(0.0));
            }
            extra.sort_by(f64::total_cmp);
            Ok(extra[1])
        };
        match measure() {
            Ok(copy_ms) => {
                debug!(copy_ms, "measured the cost of a KV copy between slots");
                self.costs.copy_ms = Some(copy_ms);
            }
            Err(error) => {
                warn!(%error, "measuring the KV copy cost failed, so a fixed threshold decides copies")
            }
        }
        for slot in [0, 1] {
            let _ = self.context.clear_kv_cache_seq(Some(slot), None, None);
        }
    }

    fn run(mut self, commands: std_mpsc::Receiver<Command>) {
        loop {
            let idle = self.queue.is_empty() && self.slots.iter().all(|s| s.running.is_none());
            if idle {
                match commands.recv() {
                    Ok(command) => self.accept(command),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.accept(command),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        if self.queue.is_empty() && self.slots.iter().all(|s| s.running.is_none()) {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            self.step();
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Start(sequences) => self.queue.extend(sequences),
        }
    }

    /// Ends cancelled sequences, running or queued.
    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot
                .running
                .as_ref()
                .is_some_and(|r| r.seq.cancel.is_cancelled())
            {
                let running = slot.running.take().expect("checked above");
                let _ = running
                    .seq
                    .events
                    .send(StepEvent::Finished(FinishReason::Cancelled));
            }
        }
        self.queue.retain(|seq| {
            let cancelled = seq.cancel.is_cancelled();
            if cancelled {
                let _ = seq
                    .events
                    .send(StepEvent::Finished(FinishReason::Cancelled));
            }
            !cancelled
        });
    }

    /// Moves queued sequences into free slots, oldest first. A sequence
    /// whose sibling is still computing the shared prompt waits for it, and
    /// then starts from the sibling's KV entries.
    fn admit(&mut self) {
        let mut index = 0;
        while index < self.queue.len() {
            let Some(free) = self.free_slot() else {
                return;
            };
            let group = self.queue[index].group;
            let sibling_busy = self.slots.iter().any(|slot| {
                slot.running
                    .as_ref()
                    .is_some_and(|r| r.seq.group == group && slot.cached.len() < r.seq.prompt.len())
            });
            if sibling_busy {
                index += 1;
                continue;
            }
            let seq = self.queue.remove(index).expect("index is in range");
            if seq.max_tokens == 0 || seq.prompt.len() >= self.context_length {
                let _ = seq.events.send(StepEvent::Finished(FinishReason::Length));
                continue;
            }
            self.start(free, seq);
        }
    }

    /// Picks the lowest idle slot id. llama.cpp decodes sequences with
    /// separate KV buffers in one pass only when their ids are consecutive,
    /// so busy slots are kept together at the low ids, and [`Self::start`]
    /// copies a cached prefix from another slot when that pays.
    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|slot| slot.running.is_none())
    }

    fn start(&mut self, slot_index: usize, seq: NewSequence) {
        let prompt = &seq.prompt;
        // At least the last prompt token is decoded again, for its logits.
        let limit = prompt.len() - 1;
        let own = common_prefix(&self.slots[slot_index].cached, prompt).min(limit);
        let (source, shared) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != slot_index)
            .map(|(i, slot)| (i, common_prefix(&slot.cached, prompt).min(limit)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > own && self.costs.copy_pays(n - own))
            .unwrap_or((slot_index, own));

        if source == slot_index {
            self.remove_from(slot_index, shared);
        } else {
            // Each slot has a KV buffer of its own, so sharing a prefix
            // copies the source's whole buffer (llama.cpp copies only whole
            // buffers across slots) and then drops what follows the prefix.
            self.remove_from(slot_index, 0);
            match self
                .context
                .copy_kv_cache_seq(source as i32, slot_index as i32, None, None)
            {
                Ok(()) => {
                    self.slots[slot_index].cached = self.slots[source].cached.clone();
                    self.remove_from(slot_index, shared);
                }
                Err(e) => {
                    warn!(error = %e, "copying a cached prefix failed; computing it again");
                }
            }
        }
        let reused = self.slots[slot_index].cached.len();
        self.stats.sequences.fetch_add(1, Ordering::Relaxed);
        if reused > 0 {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            seq.cached_prompt_tokens
                .fetch_add(reused, Ordering::Relaxed);
        }
        debug!(
            slot = slot_index,
            reused,
            prompt = prompt.len(),
            "sequence started"
        );
        self.clock += 1;
        let slot = &mut self.slots[slot_index];
        slot.last_used = self.clock;
        slot.running = Some(Running {
            tokens: seq.prompt.clone(),
            seq,
            generated: 0,
        });
    }

    /// Drops a slot's KV entries from position `keep` on.
    fn remove_from(&mut self, slot_index: usize, keep: usize) {
        let slot = &mut self.slots[slot_index];
        if slot.cached.len() > keep {
            let removed =
                self.context
                    .clear_kv_cache_seq(Some(slot_index as u32), Some(keep as u32), None);
            if !matches!(removed, Ok(true)) {
                // A partial removal can fail; dropping the whole sequence
                // cannot.
                let _ = self
                    .context
                    .clear_kv_cache_seq(Some(slot_index as u32), None, None);
                slot.cached.clear();
                return;
            }
            slot.cached.truncate(keep);
        }
    }

    /// Runs one decode call over every running sequence, then samples one
    /// token for each sequence whose pending tokens are all in the cache.
    fn step(&mut self) {
        self.batch.clear();
        // (slot, tokens added, batch index of the logits row)
        let mut plan: Vec<(usize, usize, Option<i32>)> = Vec::new();
        let mut budget = self.batch_tokens;
        // Decoding sequences get the budget first (one token each), then
        // prompt chunks.
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].running.is_some())
            .collect();
        order.sort_by_key(|&i| {
            let slot = &self.slots[i];
            let pending = slot.running.as_ref().map_or(0, |r| r.tokens.len()) - slot.cached.len();
            (pending > 1, slot.last_used)
        });
        let mut takes = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            let slot = &self.slots[i];
            let running = slot.running.as_ref().expect("filtered above");
            let take = (running.tokens.len() - slot.cached.len()).min(budget);
            takes.push((i, take));
            budget -= take;
        }
        // The batch lists sequences by increasing id: llama.cpp splits a
        // batch wherever the ids of separate KV buffers stop being
        // consecutive.
        takes.sort_unstable();
        for (i, take) in takes {
            let slot = &self.slots[i];
            let running = slot.running.as_ref().expect("filtered above");
            let start = slot.cached.len();
            let pending = &running.tokens[start..];
            for (offset, &token) in pending[..take].iter().enumerate() {
                let last = offset + 1 == pending.len();
                let added = self.batch.add(
                    LlamaToken(token as i32),
                    (start + offset) as i32,
                    &[i as i32],
                    last,
                );
                debug_assert!(added.is_ok(), "the batch holds batch_tokens tokens");
            }
            let logits = (take == pending.len()).then(|| self.batch.n_tokens() - 1);
            plan.push((i, take, logits));
        }
        if plan.is_empty() {
            return;
        }

        let decode_start = std::time::Instant::now();
        if let Err(e) = self.context.decode(&mut self.batch) {
            self.recover(e.to_string(), &plan);
            return;
        }
        let decode_time = decode_start.elapsed();
        self.costs
            .record_step(self.batch.n_tokens() as usize, decode_time);
        let sample_start = std::time::Instant::now();

        for (i, take, logits) in plan {
            let slot = &mut self.slots[i];
            let running = slot.running.as_mut().expect("planned slots are running");
            let start = slot.cached.len();
            slot.cached
                .extend_from_slice(&running.tokens[start..start + take]);
            let Some(row) = logits else { continue };
            let step = running.seq.sampler.sample(self.context.get_logits_ith(row));
            let token = step.token;
            running.generated += 1;
            running.tokens.push(token);
            let _ = running.seq.events.send(StepEvent::Token(step));
            let reason = if self.eos.contains(&token) {
                Some(FinishReason::Eos)
            } else if running.seq.stop_tokens.contains(&token) {
                Some(FinishReason::StopToken)
            } else if running.generated >= running.seq.max_tokens
                || running.tokens.len() >= self.context_length
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let running = slot.running.take().expect("checked above");
                let _ = running.seq.events.send(StepEvent::Finished(reason));
            }
        }
        debug!(
            tokens = self.batch.n_tokens(),
            decode_ms = decode_time.as_secs_f64() * 1000.0,
            sample_ms = sample_start.elapsed().as_secs_f64() * 1000.0,
            "step"
        );
    }

    /// Recovers from a failed decode call. Idle slots give up their cache
    /// first; if none contains any, the sequence that started last fails so
    /// that the others can go on.
    fn recover(&mut self, error: String, plan: &[(usize, usize, Option<i32>)]) {
        let idle: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].running.is_none() && !self.slots[i].cached.is_empty())
            .collect();
        if !idle.is_empty() {
            warn!(%error, idle = idle.len(), "decode failed; freeing the cache of idle slots");
            for i in idle {
                self.remove_from(i, 0);
            }
            return;
        }
        let victim = plan
            .iter()
            .map(|&(i, _, _)| i)
            .max_by_key(|&i| self.slots[i].last_used)
            .expect("the plan is not empty");
        warn!(%error, slot = victim, "decode failed; ending the newest sequence");
        if let Some(running) = self.slots[victim].running.take() {
            let _ = running.seq.events.send(StepEvent::Error(format!(
                "the engine could not decode this sequence: {error}"
            )));
        }
        self.remove_from(victim, 0);
    }
}

/// Prefix tokens a slot computes again rather than copying another slot's
/// whole KV buffer (94 MB for SmolLM2-135M at 4096 tokens) to get them,
/// until [`Costs`] has measured both sides.
/// NOTE: an estimate, used only before the first prompt-heavy step.
const RECOMPUTE_RATHER_THAN_COPY: usize = 64;

/// Tokens a decode call needs before its time per token counts as the cost
/// of computing a prefix. Smaller calls are dominated by fixed costs.
const PROMPT_HEAVY_STEP: usize = 32;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
