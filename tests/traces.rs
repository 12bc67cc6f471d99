//! End-to-end tests of the trace store and the learned handbook: requests
//! on the real model leave traces, which the admin API lists, annotates,
//! exports and learns behaviors from.

mod common;

use std::time::{Duration, Instant};

use common::{metric_value, sse_data, start, TestServer, MODEL};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "admin-test-key";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client builds")
}

/// Starts a server with the admin API on and `adjust` applied.
fn admin_server(adjust: impl FnOnce(&mut mull::config::ServeArgs)) -> TestServer {
    start(|args| {
        args.admin_key = Some(ADMIN_KEY.parse().unwrap());
        adjust(args);
    })
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Sends a whole chat request; returns the trace id header and the body.
async fn chat(server: &TestServer, body: Value) -> (Option<String>, Value) {
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response
        .headers()
        .get("x-mull-trace-id")
        .map(|v| v.to_str().unwrap().to_string());
    (id, response.json().await.unwrap())
}

async fn admin(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = client()
        .request(method, server.url(path))
        .bearer_auth(ADMIN_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn admin_json(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, text) = admin(server, reqwest::Method::GET, path, None).await;
    (status, serde_json::from_str(&text).expect("JSON body"))
}

/// Waits until the writer has stored trace `id`, and returns it.
async fn stored_trace(server: &TestServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = admin_json(server, &format!("/admin/traces/{id}")).await;
        if status == 200 {
            return body;
        }
        assert_eq!(status, 404, "{body}");
        assert!(Instant::now() < deadline, "trace {id} was never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_error(status: u16, text: &str, expected_status: u16, param: Option<&str>) {
    assert_eq!(status, expected_status, "{text}");
    let body: Value = serde_json::from_str(text).expect("error body is JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if let Some(param) = param {
        assert_eq!(body["error"]["param"], param, "{body}");
    }
}

async fn metrics(server: &TestServer) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn chat_trace_has_request_and_output() {
    let server = admin_server(|_| {});
    let body = chat_body(
        "What is the capital of France?",
        json!({"metadata": {"team": "geo"}, "user": "u-1"}),
    );
    let (header, response) = chat(&server, body).await;
    let id = header.expect("the response names its trace");
    assert_eq!(response["id"], id.as_str());
    let trace = stored_trace(&server, &id).await;
    assert_eq!(trace["model"], MODEL);
    assert_eq!(trace["adapter"], Value::Null);
    assert_eq!(trace["endpoint"], "chat");
    assert_eq!(trace["strategy"], "plain");
    assert_eq!(trace["stream"], false);
    assert_eq!(trace["user"], "u-1");
    assert_eq!(trace["metadata"], json!({"team": "geo"}));
    assert_eq!(trace["params"]["temperature"], 0.0);
    assert_eq!(trace["params"]["max_tokens"], 8);
    assert_eq!(
        trace["messages"],
        json!([{"role": "user", "content": "What is the capital of France?"}])
    );
    let choice = &trace["choices"][0];
    assert_eq!(choice["text"], response["choices"][0]["message"]["content"]);
    assert_eq!(
        choice["finish_reason"],
        response["choices"][0]["finish_reason"]
    );
    assert_eq!(choice["tokens"], response["usage"]["completion_tokens"]);
    assert!(
        choice["entropy"]["mean"].as_f64().unwrap() >= 0.0,
        "{trace}"
    );
    assert!(
        choice["entropy"]["max"].as_f64().unwrap() >= choice["entropy"]["mean"].as_f64().unwrap()
    );
    assert_eq!(
        trace["usage"]["prompt_tokens"],
        response["usage"]["prompt_tokens"]
    );
    assert!(trace["latency"]["total_ms"].as_u64().unwrap() > 0);
    assert!(trace["latency"]["first_token_ms"].as_u64().is_some());
    assert!(trace["created_ms"].as_i64().unwrap() > 1_700_000_000_000);
}

#[tokio::test]
async fn streamed_strategy_trace_has_samples() {
    let server = admin_server(|_| {});
    let body = chat_body(
        "What is 3 plus 4? Answer with a number.",
        json!({
            "stream": true,
            "temperature": 0.8,
            "seed": 5,
            "decoding": {"strategy": "self_consistency", "samples": 3, "early_stop": false},
        }),
    );
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-mull-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let events = sse_data(&response.text().await.unwrap());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let report = chunks
        .iter()
        .find_map(|c| c.get("decoding"))
        .expect("the last choice chunk carries the decoding object");
    assert_eq!(report["trace_id"], id.as_str());

    let trace = stored_trace(&server, &id).await;
    assert_eq!(trace["strategy"], "self_consistency");
    assert_eq!(trace["stream"], true);
    assert_eq!(trace["choices"][0]["text"], text.as_str());
    assert_eq!(trace["params"]["decoding"]["samples"], 3);
    let samples = trace["decoding"]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "{trace}");
    assert!(samples.iter().all(|s| s.get("answer").is_some()), "{trace}");
    assert!(trace["decoding"]["votes"].is_array(), "{trace}");
    assert!(trace["decoding"]["agreement"].is_number(), "{trace}");
    assert_eq!(trace["decoding"]["trace_id"], id.as_str());
    let generated = trace["usage"]["engine_generated_tokens"].as_u64().unwrap();
    assert!(generated >= trace["usage"]["completion_tokens"].as_u64().unwrap());
}

#[tokio::test]
async fn completion_trace_keeps_prompt() {
    let server = admin_server(|_| {});
    let response = client()
        .post(server.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 4, "stream": true}))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-mull-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let events = sse_data(&response.text().await.unwrap());
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let trace = stored_trace(&server, &id).await;
    assert_eq!(trace["endpoint"], "completion");
    assert_eq!(trace["prompt"], "The sky is");
    assert_eq!(trace["messages"], Value::Null);
    assert_eq!(trace["choices"][0]["text"], text.as_str());
}

#[tokio::test]
async fn store_false_leaves_no_trace() {
    let server = admin_server(|_| {});
    let (header, skipped) = chat(&server, chat_body("Say hi.", json!({"store": false}))).await;
    assert_eq!(header, None);
    let (header, _) = chat(&server, chat_body("Say hello.", json!({}))).await;
    // The writer keeps order, so once the later trace is stored the
    // earlier one would have been too.
    stored_trace(&server, &header.unwrap()).await;
    let skipped_id = skipped["id"].as_str().unwrap();
    let (status, _) = admin_json(&server, &format!("/admin/traces/{skipped_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn recording_off_by_config() {
    let server = start(|args| args.traces = Some(false));
    let (header, _) = chat(&server, chat_body("Say hi.", json!({}))).await;
    assert_eq!(header, None);
    // Without a store the admin routes do not exist.
    let response = client()
        .get(server.url("/admin/traces"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn feedback_attaches_and_filters() {
    let server = admin_server(|_| {});
    let (id, _) = chat(&server, chat_body("Name a fruit.", json!({}))).await;
    let id = id.unwrap();
    stored_trace(&server, &id).await;
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/admin/traces/{id}/feedback"),
        Some(json!({"score": 1, "label": "correct"})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let trace: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(trace["feedback"]["score"], 1.0);
    assert_eq!(trace["feedback"]["label"], "correct");

    let (_, positive) = admin_json(&server, "/admin/traces?feedback=positive").await;
    let ids: Vec<&str> = positive["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let (_, none) = admin_json(&server, "/admin/traces?feedback=negative").await;
    assert!(none["data"].as_array().unwrap().is_empty());

    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/admin/traces/{id}/feedback"),
        Some(json!({"score": 5})),
    )
    .await;
    assert_error(status, &text, 400, Some("score"));
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/traces/chatcmpl-unknown/feedback",
        Some(json!({"label": "bad"})),
    )
    .await;
    assert_error(status, &text, 404, Some("id"));
}

#[tokio::test]
async fn admin_key_required() {
    let server = admin_server(|args| args.api_keys = Some(vec!["sk-user".parse().unwrap()]));
    let url = server.url("/admin/traces");
    let missing = client().get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = client()
        .get(&url)
        .bearer_auth("sk-user")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    // Nor does the admin key open the generation routes.
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(ADMIN_KEY)
        .json(&chat_body("hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn bad_filters_named() {
    let server = admin_server(|_| {});
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("feedback=maybe", "feedback"),
        ("since=yesterday", "since"),
        ("since=20&until=10", "until"),
        ("endpoint=embeddings", "endpoint"),
        ("colour=red", "colour"),
    ] {
        let (status, text) = admin(
            &server,
            reqwest::Method::GET,
            &format!("/admin/traces?{query}"),
            None,
        )
        .await;
        assert_error(status, &text, 400, Some(param));
    }
}

#[tokio::test]
async fn list_filters_pages_and_deletes() {
    let server = admin_server(|_| {});
    let mut ids = Vec::new();
    for question in ["One?", "Two?", "Three?"] {
        let (id, _) = chat(&server, chat_body(question, json!({"max_tokens": 2}))).await;
        ids.push(id.unwrap());
    }
    stored_trace(&server, ids.last().unwrap()).await;
    let (_, first) = admin_json(&server, "/admin/traces?limit=2&model=smollm2-135m").await;
    let page: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = first["next_cursor"].as_i64().expect("a next page");
    let (_, second) = admin_json(&server, &format!("/admin/traces?limit=2&cursor={cursor}")).await;
    assert_eq!(second["data"][0]["id"], ids[0].as_str());
    assert_eq!(second["next_cursor"], Value::Null);
    let (_, other) = admin_json(&server, "/admin/traces?model=another").await;
    assert!(other["data"].as_array().unwrap().is_empty());
    let (_, future) = admin_json(&server, "/admin/traces?since=4000000000").await;
    assert!(future["data"].as_array().unwrap().is_empty());

    let path = format!("/admin/traces/{}", ids[0]);
    let (status, _) = admin(&server, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    let (status, text) = admin(&server, reqwest::Method::GET, &path, None).await;
    assert_error(status, &text, 404, Some("id"));
    let (status, text) = admin(&server, reqwest::Method::DELETE, &path, None).await;
    assert_error(status, &text, 404, Some("id"));
}

#[tokio::test]
async fn export_is_fine_tuning_jsonl() {
    let server = admin_server(|_| {});
    let (first, first_body) = chat(&server, chat_body("Name a color.", json!({}))).await;
    let (second, second_body) = chat(
        &server,
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name an animal."}
            ],
            "max_tokens": 8,
            "temperature": 0,
        }),
    )
    .await;
    let response = client()
        .post(server.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let completion_id = response.headers()["x-mull-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    stored_trace(&server, &completion_id).await;

    let (status, text) = admin(&server, reqwest::Method::GET, "/admin/traces/export", None).await;
    assert_eq!(status, 200, "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    // Newest first; the completion trace has no messages and is left out.
    assert_eq!(lines.len(), 2, "{text}");
    let expected = [(&second, &second_body, 3), (&first, &first_body, 2)];
    for (line, (_, body, turns)) in lines.iter().zip(expected) {
        let object = line.as_object().unwrap();
        assert_eq!(object.keys().collect::<Vec<_>>(), ["messages"]);
        let messages = line["messages"].as_array().unwrap();
        assert_eq!(messages.len(), turns);
        for message in messages {
            assert!(["system", "user", "assistant"].contains(&message["role"].as_str().unwrap()));
            assert!(message["content"].is_string());
        }
        let last = messages.last().unwrap();
        assert_eq!(last["role"], "assistant");
        assert_eq!(last["content"], body["choices"][0]["message"]["content"]);
    }
    assert!(first.is_some());
    assert!(second.is_some());
    let (status, text) = admin(
        &server,
        reqwest::Method::GET,
        "/admin/traces/export?endpoint=completion",
        None,
    )
    .await;
    assert_error(status, &text, 400, Some("endpoint"));
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let server = admin_server(|args| args.trace_queue_capacity = Some(1));
    let path = server.state.config.traces.as_ref().unwrap().path.clone();
    // Another connection holds the write lock, so the writer blocks on its
    // first trace as it would on a stalled disk.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    const REQUESTS: u64 = 5;
    for i in 0..REQUESTS {
        chat(
            &server,
            chat_body(&format!("Say {i}."), json!({"max_tokens": 1})),
        )
        .await;
    }
    let text = metrics(&server).await;
    let dropped = metric_value(&text, "mull_traces_dropped_total", "");
    assert!(dropped >= 1.0, "{text}");
    blocker.execute_batch("ROLLBACK").unwrap();

    // Every request is accounted for: written, failed to write, or dropped.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(&server).await;
        let written = metric_value(&text, "mull_traces_written_total", "");
        let failed = metric_value(&text, "mull_trace_write_errors_total", "");
        let dropped = metric_value(&text, "mull_traces_dropped_total", "");
        if written + failed + dropped == REQUESTS as f64 {
            let (_, listed) = admin_json(&server, "/admin/traces").await;
            assert_eq!(listed["data"].as_array().unwrap().len() as f64, written);
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TRAIN_QUESTION: &str =
    "A train travels at a speed of 60 km per hour for 3 hours. How many km does it travel?";

#[tokio::test]
async fn handbook_learns_from_traces() {
    let server = admin_server(|args| args.extraction_batch = Some(2));
    // Solved traces: replies that a client marked as good.
    let mut sources = Vec::new();
    for question in [
        TRAIN_QUESTION,
        "A car drives at a speed of 50 km per hour for 2 hours. How far does it go?",
    ] {
        let (id, _) = chat(&server, chat_body(question, json!({"max_tokens": 48}))).await;
        let id = id.unwrap();
        stored_trace(&server, &id).await;
        let (status, _) = admin(
            &server,
            reqwest::Method::POST,
            &format!("/admin/traces/{id}/feedback"),
            Some(json!({"score": 1})),
        )
        .await;
        assert_eq!(status, 200);
        sources.push(id);
    }

    // Extraction shows both to the model; whatever it states is stored
    // with its source trace, and a second run finds nothing new.
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/extraction",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    eprintln!("extraction: {report}");
    assert_eq!(report["examined"], 2, "{report}");
    assert_eq!(report["yielded"], false);
    let (_, behaviors) = admin_json(&server, "/admin/behaviors").await;
    for behavior in behaviors["data"].as_array().unwrap() {
        let from = behavior["source_traces"].as_array().unwrap();
        assert!(!from.is_empty(), "{behavior}");
        // Tagged with the topic words of the problem it came from.
        let tags = behavior["tags"].as_array().unwrap();
        assert!(!tags.is_empty(), "{behavior}");
        assert!(from
            .iter()
            .all(|t| sources.contains(&t.as_str().unwrap().to_string())));
    }
    let (_, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/extraction",
        Some(json!({})),
    )
    .await;
    let again: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(again["examined"], 0, "{again}");

    // A behavior an operator distilled from the same traces.
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/behaviors",
        Some(json!({
            "name": "distance_from_speed",
            "instruction": "Multiply the speed by the travel time to get the distance.",
            "tags": ["train", "speed", "distance"],
            "source_traces": sources,
        })),
    )
    .await;
    assert_eq!(status, 201, "{text}");

    // A later request retrieves it into its prompt, and its trace records that.
    let (id, response) = chat(
        &server,
        chat_body(
            "A train goes at a speed of 90 km per hour for 2 hours. How far does it travel?",
            json!({"decoding": {"strategy": "handbook", "behaviors": 16}}),
        ),
    )
    .await;
    // Extracted behaviors may rank too, so the operator's is looked up
    // among all retrieved ones.
    let retrieved = &response["decoding"]["behaviors"];
    let names: Vec<&str> = retrieved
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert!(names.contains(&"distance_from_speed"), "{response}");
    let trace = stored_trace(&server, &id.unwrap()).await;
    assert_eq!(trace["strategy"], "handbook");
    assert_eq!(trace["decoding"]["behaviors"], *retrieved);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, behavior) = admin_json(&server, "/admin/behaviors/distance_from_speed").await;
        if behavior["times_retrieved"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{behavior}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn behaviors_edit_import_export() {
    let server = admin_server(|_| {});
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/behaviors",
        Some(json!({"name": "Bad Name", "instruction": "Do it."})),
    )
    .await;
    assert_error(status, &text, 400, Some("name"));
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/behaviors/import",
        Some(json!([
            {"name": "check_units", "instruction": "State the unit of the result."},
            {"name": "draw_table", "instruction": "Put the quantities in a table.", "tags": ["table"]}
        ])),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let imported: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(imported["added"], json!(["check_units", "draw_table"]));
    let (status, text) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/behaviors",
        Some(json!({"name": "check_units", "instruction": "Again."})),
    )
    .await;
    assert_error(status, &text, 409, Some("name"));
    let (status, text) = admin(
        &server,
        reqwest::Method::PATCH,
        "/admin/behaviors/check_units",
        Some(json!({"instruction": "Say which unit the result is in.", "effect": {"accuracy_delta": 0.01}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = admin(
        &server,
        reqwest::Method::PATCH,
        "/admin/behaviors/unknown",
        Some(json!({"instruction": "x y z"})),
    )
    .await;
    assert_error(status, &text, 404, Some("name"));

    let (status, exported) = admin_json(&server, "/admin/behaviors/export").await;
    assert_eq!(status, 200);
    let exported = exported.as_array().unwrap().clone();
    assert_eq!(exported.len(), 2);
    assert_eq!(
        exported[0]["instruction"],
        "Say which unit the result is in."
    );
    assert_eq!(exported[0]["effect"]["accuracy_delta"], 0.01);

    // The export imports into another server as it is.
    let other = admin_server(|_| {});
    let (status, text) = admin(
        &other,
        reqwest::Method::POST,
        "/admin/behaviors/import",
        Some(Value::Array(exported.clone())),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (_, copied) = admin_json(&other, "/admin/behaviors/export").await;
    assert_eq!(copied, Value::Array(exported));

    let (status, _) = admin(
        &server,
        reqwest::Method::DELETE,
        "/admin/behaviors/draw_table",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, listed) = admin_json(&server, "/admin/behaviors").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
}

/// Returns a connection string for a new database on the PostgreSQL test
/// server that `MULL_TEST_POSTGRES_URL` names, or `None` when it is unset.
fn new_postgres_database() -> Option<String> {
    let url = std::env::var("MULL_TEST_POSTGRES_URL").ok()?;
    let name = format!("mull_e2e_{}", uuid::Uuid::new_v4().simple());
    // The blocking client must not run on the test's async thread.
    let created = std::thread::spawn({
        let url = url.clone();
        let name = name.clone();
        move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
            client.batch_execute(&format!("CREATE DATABASE {name}"))
        }
    })
    .join()
    .unwrap();
    created.expect("the PostgreSQL test server creates a database");
    Some(format!("{url} dbname={name}"))
}

#[tokio::test]
async fn postgres_store_records_and_retrieves() {
    let Some(url) = new_postgres_database() else {
        eprintln!("skipped: MULL_TEST_POSTGRES_URL is not set");
        return;
    };
    let server = admin_server(|args| args.traces_postgres_url = Some(url.parse().unwrap()));
    let (id, response) = chat(
        &server,
        chat_body(TRAIN_QUESTION, json!({"metadata": {"run": "pg"}})),
    )
    .await;
    let id = id.unwrap();
    let trace = stored_trace(&server, &id).await;
    assert_eq!(trace["metadata"]["run"], "pg");
    assert_eq!(
        trace["choices"][0]["text"],
        response["choices"][0]["message"]["content"]
    );

    let (status, _) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/admin/traces/{id}/feedback"),
        Some(json!({"score": -0.5, "label": "wrong"})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, negative) = admin_json(&server, "/admin/traces?feedback=negative").await;
    assert_eq!(negative["data"][0]["id"], id.as_str());
    let (status, text) = admin(&server, reqwest::Method::GET, "/admin/traces/export", None).await;
    assert_eq!(status, 200);
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["messages"][1]["role"], "assistant");

    let (status, _) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/behaviors",
        Some(json!({
            "name": "distance_from_speed",
            "instruction": "Multiply the speed by the travel time to get the distance.",
            "source_traces": [id],
        })),
    )
    .await;
    assert_eq!(status, 201);
    let (_, response) = chat(
        &server,
        chat_body(
            TRAIN_QUESTION,
            json!({"decoding": {"strategy": "handbook", "behaviors": 1}}),
        ),
    )
    .await;
    assert_eq!(
        response["decoding"]["behaviors"],
        json!(["distance_from_speed"])
    );
}

#[tokio::test]
async fn write_failure_counted_not_returned() {
    let server = admin_server(|_| {});
    let path = server.state.config.traces.as_ref().unwrap().path.clone();
    // Holding the write lock past the writer's 5 s busy timeout makes its
    // write fail, as a full or read-only disk would.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (lost, response) = chat(&server, chat_body("Say one.", json!({"max_tokens": 1}))).await;
    assert_eq!(response["object"], "chat.completion");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics(&server).await;
        if metric_value(&text, "mull_trace_write_errors_total", "") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    let (status, _) = admin_json(&server, &format!("/admin/traces/{}", lost.unwrap())).await;
    assert_eq!(status, 404);
    // The writer goes on once the disk recovers.
    let (kept, _) = chat(&server, chat_body("Say two.", json!({"max_tokens": 1}))).await;
    stored_trace(&server, &kept.unwrap()).await;
}
