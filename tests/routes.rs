//! Route tests through `tower::ServiceExt::oneshot`, without a socket, on a
//! scripted engine. The end-to-end tests run the same routes on the model.

use std::sync::Arc;

use axum::{
    body::{to_bytes, Body},
    http::{Request, StatusCode},
    Router,
};
use mull::{
    config::ServeArgs,
    engine::{scripted::ScriptedEngine, Engine},
    server::{app, AppState},
};
use serde_json::{json, Value};
use tower::ServiceExt;

fn state(adjust: impl FnOnce(&mut ServeArgs)) -> Arc<AppState> {
    let mut args = ServeArgs {
        model_path: Some(std::env::current_exe().unwrap()),
        model_name: Some("scripted".into()),
        traces: Some(false),
        ..ServeArgs::default()
    };
    adjust(&mut args);
    Arc::new(AppState::new(args.resolve().unwrap()).unwrap())
}

fn ready_app(text: &str, adjust: impl FnOnce(&mut ServeArgs)) -> Router {
    let state = state(adjust);
    let engine: Arc<dyn Engine> = Arc::new(ScriptedEngine::echoing(text));
    state.models[0].install(engine);
    state.models[0].mark_ready();
    app(state)
}

async fn call(app: Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, headers, body.to_vec())
}

fn post_json(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn health_is_always_ok() {
    let app = app(state(|_| {}));
    let (status, headers, _) =
        call(app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 200);
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req-"));
}

#[tokio::test]
async fn ready_is_503_until_model_ready() {
    let state = state(|_| {});
    let (status, headers, body) = call(
        app(state.clone()),
        Request::get("/ready").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("scripted"));

    state.models[0].install(Arc::new(ScriptedEngine::echoing("x")));
    let (status, _, _) = call(
        app(state.clone()),
        Request::get("/ready").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 503, "loaded but not yet generated");
    state.models[0].mark_ready();
    let (status, _, _) = call(
        app(state),
        Request::get("/ready").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn chat_while_loading_is_503() {
    let app = app(state(|_| {}));
    let (status, _, body) = call(app, post_json("/v1/chat/completions", chat(json!({})))).await;
    assert_eq!(status, 503);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test]
async fn chat_returns_scripted_text() {
    let app = ready_app("Paris.", |_| {});
    let (status, _, body) = call(app, post_json("/v1/chat/completions", chat(json!({})))).await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // Six bytes of text plus the end-of-sequence token.
    assert_eq!(body["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn stop_string_cuts_scripted_text() {
    let app = ready_app("one, two, three", |_| {});
    let (_, _, body) = call(
        app,
        post_json("/v1/chat/completions", chat(json!({"stop": ", th"}))),
    )
    .await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "one, two");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn max_tokens_cuts_scripted_text() {
    let app = ready_app("abcdefgh", |_| {});
    let (_, _, body) = call(
        app,
        post_json("/v1/chat/completions", chat(json!({"max_tokens": 3}))),
    )
    .await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "abc");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn unknown_route_gets_envelope() {
    let app = ready_app("x", |_| {});
    let (status, _, body) = call(
        app,
        Request::get("/v2/nothing").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "unknown_url");
}

#[tokio::test]
async fn wrong_method_gets_405() {
    let app = ready_app("x", |_| {});
    let (status, _, body) = call(
        app,
        Request::get("/v1/chat/completions")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn auth_applies_to_v1_only() {
    let keyed = |_: ()| {
        ready_app("x", |args| {
            args.api_keys = Some(vec!["k1".parse().unwrap()])
        })
    };
    let (status, _, _) = call(
        keyed(()),
        post_json("/v1/chat/completions", chat(json!({}))),
    )
    .await;
    assert_eq!(status, 401);
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer k1")
        .body(Body::from(chat(json!({})).to_string()))
        .unwrap();
    let (status, _, _) = call(keyed(()), request).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(
        keyed(()),
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn cors_preflight_when_configured() {
    let app = ready_app("x", |args| {
        args.cors_origins = Some(vec!["https://app.example".into()])
    });
    let request = Request::options("/v1/chat/completions")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = call(app, request).await;
    assert!(status.is_success());
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
}

#[tokio::test]
async fn scripted_stream_ends_with_done() {
    let app = ready_app("hey", |_| {});
    let (status, _, body) = call(
        app,
        post_json(
            "/v1/completions",
            json!({"model": "scripted", "prompt": "a", "stream": true}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"text\":\"h\""));
}
