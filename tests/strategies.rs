//! Decoding strategies end to end: HTTP on a loopback port, the real default
//! model, small budgets.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{shared, sse_data, start, MODEL};
use serde_json::{json, Value};

const QUESTION: &str = "Tom has 3 apples and buys 4 more. How many apples does he have?";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

async fn chat(url: &str, decoding: Value, extra: Value) -> (u16, Value) {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16,
        "seed": 5,
        "decoding": decoding,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let response = client().post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    if body["stream"] == true && status == 200 {
        let events = sse_data(&response.text().await.unwrap());
        return (status, json!(events));
    }
    (status, response.json().await.unwrap())
}

fn url() -> String {
    shared().url("/v1/chat/completions")
}

fn assert_spent_covers_returned(decoding: &Value) {
    let tokens = &decoding["engine_tokens"];
    assert!(
        tokens["generated"].as_u64().unwrap() >= tokens["returned"].as_u64().unwrap(),
        "{decoding}"
    );
    assert!(tokens["prompt"].as_u64().unwrap() > 0, "{decoding}");
}

#[tokio::test]
async fn self_consistency_reports_votes() {
    let (status, body) = chat(
        &url(),
        json!({"strategy": "self_consistency", "samples": 3}),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let decoding = &body["decoding"];
    assert_eq!(decoding["strategy"], "self_consistency");
    assert_eq!(decoding["params"]["samples"], 3);
    let samples = decoding["samples"].as_array().unwrap();
    assert!((1..=3).contains(&samples.len()));
    assert_eq!(
        samples.len() + decoding["samples_saved"].as_u64().unwrap() as usize,
        3
    );
    assert_spent_covers_returned(decoding);
    assert_eq!(
        decoding["engine_tokens"]["returned"],
        body["usage"]["completion_tokens"]
    );
    assert!(!body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn cautious_branches_and_streams_clauses() {
    let decoding = json!({"strategy": "cautious", "max_trials": 3, "max_clause_tokens": 6});
    let (status, body) = chat(&url(), decoding.clone(), json!({"max_tokens": 10})).await;
    assert_eq!(status, 200, "{body}");
    let report = &body["decoding"];
    let branch_points = report["branch_points"].as_u64().unwrap();
    let trials = report["trials"].as_u64().unwrap();
    assert!(trials >= branch_points, "{report}");
    assert!(trials <= 3 * branch_points, "{report}");
    assert!(report["clauses"].as_u64().unwrap() >= 1);
    assert_spent_covers_returned(report);
    // Every clause after the first extends a prefix the engine has just
    // processed, so its probe starts from the prefix cache (trials do too).
    let hits = report["engine_prefix_cache_hits"].as_u64().unwrap();
    let clauses = report["clauses"].as_u64().unwrap();
    assert!(hits >= clauses - 1, "{report}");
    let whole = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // Streaming sends the same text, clause by clause, and the report last.
    let (status, events) = chat(&url(), decoding, json!({"max_tokens": 10, "stream": true})).await;
    assert_eq!(status, 200);
    let events: Vec<String> = serde_json::from_value(events).unwrap();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole);
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert_eq!(last["decoding"]["strategy"], "cautious");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.get("decoding").is_none()));
}

#[tokio::test]
async fn cautious_inside_self_consistency() {
    let decoding = json!({
        "strategy": "self_consistency",
        "samples": 2,
        "inner": {"strategy": "cautious", "max_trials": 2, "max_clause_tokens": 4},
    });
    let (status, body) = chat(&url(), decoding.clone(), json!({"max_tokens": 8})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decoding"]["params"]["inner"]["strategy"], "cautious");
    assert_eq!(body["decoding"]["params"]["inner"]["max_trials"], 2);
    // The reported parameters are a decoding object in their own right.
    let echoed = body["decoding"]["params"].clone();
    assert_eq!(echoed["strategy"], "self_consistency");
    let (status, again) = chat(&url(), echoed.clone(), json!({"max_tokens": 4})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["decoding"]["params"], echoed);
    assert_spent_covers_returned(&body["decoding"]);

    let (status, events) = chat(&url(), decoding, json!({"max_tokens": 8, "stream": true})).await;
    assert_eq!(status, 200);
    let events: Vec<String> = serde_json::from_value(events).unwrap();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["decoding"]["strategy"], "self_consistency");
}

#[tokio::test]
async fn introspection_takes_turns() {
    let (status, body) = chat(
        &url(),
        json!({"strategy": "introspection", "turns": 2}),
        json!({"max_tokens": 12}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let turns = body["decoding"]["turns"].as_array().unwrap();
    assert!((1..=2).contains(&turns.len()), "{body}");
    let chosen = body["decoding"]["chosen_turn"].as_u64().unwrap() as usize;
    assert!((1..=turns.len()).contains(&chosen));
    assert_spent_covers_returned(&body["decoding"]);
}

#[tokio::test]
async fn handbook_puts_behaviors_in_prompt() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        json!([
            {"name": "add_quantities", "instruction": "Add the apples bought to the apples owned.", "tags": ["apples"]},
            {"name": "check_units", "instruction": "State the unit of the result.", "tags": []}
        ])
        .to_string(),
    )
    .unwrap();
    let path = file.path().to_path_buf();
    let server = start(move |args| args.handbook_path = Some(path));
    let (status, body) = chat(
        &server.url("/v1/chat/completions"),
        json!({"strategy": "handbook", "behaviors": 1}),
        json!({"max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decoding"]["behaviors"], json!(["add_quantities"]));
    // The engine saw a longer prompt than the bare question's.
    let (_, plain) = chat(
        &server.url("/v1/chat/completions"),
        json!({"strategy": "plain"}),
        json!({"max_tokens": 1}),
    )
    .await;
    let with_behaviors = body["decoding"]["engine_tokens"]["prompt"]
        .as_u64()
        .unwrap();
    let bare = plain["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(with_behaviors > bare, "{with_behaviors} <= {bare}");
    // Usage reports the prompt the client sent.
    assert_eq!(
        body["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
}

#[tokio::test]
async fn preset_alias_selects_strategy() {
    let mut presets = BTreeMap::new();
    presets.insert(
        "consistent".to_string(),
        json!({"strategy": "self_consistency", "samples": 2}),
    );
    let server = start(move |args| args.presets = Some(presets));
    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"smollm2-135m:consistent"), "{ids:?}");
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "smollm2-135m:consistent", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["decoding"]["strategy"], "self_consistency", "{body}");
    assert_eq!(body["decoding"]["params"]["samples"], 2);
}

#[tokio::test]
async fn bad_strategy_parameters_are_named() {
    let cases = [
        (json!({"strategy": "beam"}), json!({}), "decoding.strategy"),
        (
            json!({"strategy": "self_consistency", "smaples": 3}),
            json!({}),
            "decoding.smaples",
        ),
        (
            json!({"strategy": "self_consistency", "samples": 100}),
            json!({}),
            "decoding.samples",
        ),
        (
            json!({"strategy": "cautious", "max_trials": 0}),
            json!({}),
            "decoding.max_trials",
        ),
        (
            json!({"strategy": "introspection", "turns": "3"}),
            json!({}),
            "decoding.turns",
        ),
        (json!("self_consistency"), json!({}), "decoding"),
        (
            json!({"strategy": "self_consistency"}),
            json!({"n": 2}),
            "n",
        ),
        (
            json!({"strategy": "cautious"}),
            json!({"logprobs": true}),
            "logprobs",
        ),
        // The shared server has no handbook file.
        (
            json!({"strategy": "handbook"}),
            json!({}),
            "decoding.strategy",
        ),
    ];
    for (decoding, extra, param) in cases {
        let (status, body) = chat(&url(), decoding.clone(), extra).await;
        assert_eq!(status, 400, "{decoding} -> {body}");
        assert_eq!(body["error"]["param"], param, "{decoding} -> {body}");
    }
    let response = client()
        .post(shared().url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "x", "decoding": {"strategy": "introspection"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn plain_opts_out_of_default_strategy() {
    let server = start(|args| {
        args.models = Some(vec![mull::config::ModelEntry {
            name: MODEL.into(),
            path: common::model_path(),
            dtype: None,
            device: None,
            engine: None,
            threads: None,
            max_batch_size: None,
            default_strategy: Some(json!({"strategy": "self_consistency", "samples": 2})),
        }]);
        args.model_path = None;
    });
    let url = server.url("/v1/chat/completions");
    let (status, body) = chat(&url, Value::Null, json!({"max_tokens": 4})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decoding"]["strategy"], "self_consistency");
    let extra = json!({"max_tokens": 4, "n": 2, "logprobs": true});
    let (status, body) = chat(&url, json!({"strategy": "plain"}), extra).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert!(body.get("decoding").is_none());
}

#[tokio::test]
async fn disconnect_cancels_strategy_stream() {
    let server = start(|args| {
        args.max_concurrent_requests = Some(1);
        args.max_queued_requests = Some(0);
    });
    let url = server.url("/v1/chat/completions");
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 64,
        "stream": true,
        "decoding": {"strategy": "self_consistency", "samples": 16, "early_stop": false},
    });
    let mut response = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The role chunk arrives at once; the answer would take many seconds.
    response.chunk().await.unwrap().expect("a first chunk");
    drop(response);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = chat(&url, json!({"strategy": "plain"}), json!({"max_tokens": 2})).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            std::time::Instant::now() < deadline,
            "slot not freed after disconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
