//! The engine contract on the real model, below HTTP: batching, prefix
//! sharing, seeds under concurrent load, cancellation and queueing past the
//! batch slots. Runs on the engine `MULL_TEST_ENGINE` names.

mod common;

use std::collections::HashSet;

use futures::future::join_all;
use mull::engine::{
    Continuation, Engine, FinishReason, GenerateRequest, SamplingParams, StepEvent,
};
use tokio_util::sync::CancellationToken;

fn request(prompt: Vec<u32>, n: usize, seed: u64, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        n,
        sampling: SamplingParams {
            temperature: 0.9,
            ..SamplingParams::default()
        },
        seed: Some(seed),
        max_tokens,
        stop_tokens: HashSet::new(),
        top_logprobs: 0,
        keep_distribution: false,
        cancel: CancellationToken::new(),
        cached_prompt_tokens: Default::default(),
    }
}

/// Collects a continuation's tokens and how it ended.
async fn drain(mut continuation: Continuation) -> (Vec<u32>, FinishReason) {
    let mut tokens = Vec::new();
    while let Some(event) = continuation.events.recv().await {
        match event {
            StepEvent::Token(step) => tokens.push(step.token),
            StepEvent::Finished(reason) => return (tokens, reason),
            StepEvent::Error(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the continuation ended without a finish event");
}

async fn run(engine: &dyn Engine, request: GenerateRequest) -> Vec<(Vec<u32>, FinishReason)> {
    let continuations = engine.generate(request).expect("generation starts");
    join_all(continuations.into_iter().map(drain)).await
}

async fn prompt(engine: &dyn Engine, text: &str) -> Vec<u32> {
    engine.tokenize(text).await.expect("text tokenizes")
}

#[tokio::test]
async fn seeded_output_ignores_concurrent_load() {
    let engine = common::engine();
    let engine = engine.as_ref();
    let story = prompt(engine, "Once upon a time, a fox").await;
    let alone = run(engine, request(story.clone(), 1, 7, 24)).await;

    let others = [
        "The recipe for bread needs",
        "In the year 1850, the railway",
        "Rain forms when",
    ];
    let mut loads = Vec::new();
    for (i, text) in others.iter().enumerate() {
        loads.push(request(prompt(engine, text).await, 2, i as u64, 40));
    }
    let (loaded, _) = tokio::join!(
        run(engine, request(story, 1, 7, 24)),
        join_all(loads.into_iter().map(|r| run(engine, r)))
    );
    assert_eq!(alone[0].0, loaded[0].0);
    assert_eq!(alone[0].1, loaded[0].1);
}

#[tokio::test]
async fn choices_reuse_the_computed_prompt() {
    // The mistralrs engine counted no cache hits for choices started
    // together, so only the llama engine is held to this.
    if common::engine_kind() != "llama" {
        return;
    }
    let engine = common::engine();
    let (hits_before, sequences_before) = engine
        .prefix_cache_stats()
        .expect("the llama engine counts cache hits");
    // Longer than the prefix below which the engine computes a prompt again
    // rather than copying another slot's cache.
    let text = "The rivers of Europe, listed from the longest to the shortest, with the \
        countries each one flows through, the cities on its banks, the sea it \
        reaches, and a short note on its history, its bridges, its floods and the \
        trade that moved along it over the centuries, starting with the longest \
        river of all, which flows through Russia into the Caspian Sea: the Volga, the";
    let prompt = prompt(engine.as_ref(), text).await;
    assert!(prompt.len() > 70, "{} tokens", prompt.len());
    let four = request(prompt.clone(), 4, 11, 8);
    let cached = four.cached_prompt_tokens.clone();
    let results = run(engine.as_ref(), four).await;
    assert_eq!(results.len(), 4);
    for (tokens, _) in &results {
        assert!(!tokens.is_empty());
    }
    let (hits, sequences) = engine
        .prefix_cache_stats()
        .expect("stats were there before");
    assert!(sequences >= sequences_before + 4);
    // The three siblings of the first sequence start from its prompt, all
    // but the last token, which is decoded again for its logits.
    assert!(hits >= hits_before + 3, "{hits} hits, {hits_before} before");
    let cached = cached.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        cached >= 3 * (prompt.len() - 1),
        "{cached} cached prompt tokens for a {}-token prompt",
        prompt.len()
    );
}

#[tokio::test]
async fn more_sequences_than_slots_all_finish() {
    let engine = common::engine();
    let prompt = prompt(engine.as_ref(), "Numbers:").await;
    let results = run(engine.as_ref(), request(prompt, 20, 3, 6)).await;
    assert_eq!(results.len(), 20);
    for (tokens, reason) in &results {
        assert!(tokens.len() <= 6);
        assert!(
            matches!(reason, FinishReason::Length | FinishReason::Eos),
            "{reason:?}"
        );
    }
    let distinct: HashSet<&Vec<u32>> = results.iter().map(|(t, _)| t).collect();
    assert!(
        distinct.len() > 1,
        "20 samples at temperature 0.9 all equal"
    );
}

#[tokio::test]
async fn stopping_one_choice_spares_the_others() {
    let engine = common::engine();
    let prompt = prompt(engine.as_ref(), "Write a long story about the sea.").await;
    let mut continuations = engine
        .generate(request(prompt, 2, 5, 48))
        .expect("generation starts");
    let second = continuations.pop().expect("two continuations");
    let first = continuations.pop().expect("two continuations");
    // Stopped before its prompt is computed, so the second choice, which
    // waits to share that prompt, has to go on without it.
    first.stop();
    let (_, reason) = drain(first).await;
    assert_eq!(reason, FinishReason::Cancelled);
    let (tokens, reason) = drain(second).await;
    assert!(!tokens.is_empty());
    assert_ne!(reason, FinishReason::Cancelled);
}
