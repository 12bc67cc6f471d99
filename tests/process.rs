//! The `mull` binary as an operator runs it: readiness, signals, config
//! errors.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Kills the server if a test fails before it exits on its own.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mull() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mull"))
}

#[test]
fn bad_config_is_reported_by_name() {
    let output = mull()
        .args([
            "serve",
            "--max-concurrent-requests",
            "0",
            "--log-format",
            "xml",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_concurrent_requests"), "{stderr}");
    assert!(stderr.contains("log_format"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_stream() {
    let model = common::model_path();
    let child = mull()
        .args(["serve", "--port", "0", "--shutdown-grace-secs", "60"])
        .arg("--model-path")
        .arg(&model)
        .arg("--traces-path")
        .arg(common::temporary_trace_path())
        .env("MULL_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let address = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server logs its address");
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on http://".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let client = reqwest::Client::new();
    let ready = format!("http://{address}/ready");
    let first = client.get(&ready).send().await.unwrap().status();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if client.get(&ready).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(first, 503, "ready before the model was loaded");

    let mut stream = client
        .post(format!("http://{address}/v1/completions"))
        .json(&serde_json::json!({"model": "smollm2-135m", "prompt": "Once", "max_tokens": 40, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut body = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "stream cut by shutdown: {body}"
    );
    let events = common::sse_data(&body);
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit}");
    // New connections are refused once the server has stopped.
    assert!(client
        .get(format!("http://{address}/health"))
        .send()
        .await
        .is_err());
}

/// Starts `mull serve` on the default model with `args`, and returns the
/// child and the address it logged.
fn spawn_server(args: &[&str]) -> (KillOnDrop, String) {
    let child = mull()
        .args(["serve", "--port", "0"])
        .arg("--model-path")
        .arg(common::model_path())
        .args(args)
        .env("MULL_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let address = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server logs its address");
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on http://".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    (child, address)
}

async fn wait_ready(client: &reqwest::Client, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client.get(format!("http://{address}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn corrupt_trace_store_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traces.db");
    let garbage = b"not a SQLite file; the server must leave it as it is\n".repeat(200);
    std::fs::write(&path, &garbage).unwrap();
    let output = mull()
        .args(["serve", "--port", "0", "--traces-path"])
        .arg(&path)
        .arg("--model-path")
        .arg(common::model_path())
        .output()
        .unwrap();
    assert!(!output.status.success(), "started on a corrupt store");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trace store"), "{stderr}");
    assert!(stderr.contains("traces.db"), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

/// Traces the writer may hold when the server is killed: a full queue plus
/// the one being written.
const QUEUE_CAPACITY: usize = 4;

#[tokio::test]
async fn sigkill_under_load_keeps_store_sound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traces.db");
    let capacity = QUEUE_CAPACITY.to_string();
    let (child, address) = spawn_server(&[
        "--traces-path",
        path.to_str().unwrap(),
        "--trace-queue-capacity",
        &capacity,
    ]);
    let client = reqwest::Client::new();
    wait_ready(&client, &address).await;

    // Three clients send short requests back to back and keep the trace id
    // of every response they receive in full.
    let completed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for worker in 0..3 {
        let client = client.clone();
        let url = format!("http://{address}/v1/chat/completions");
        let completed = completed.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..200 {
                let body = serde_json::json!({
                    "model": "smollm2-135m",
                    "messages": [{"role": "user", "content": format!("Count to {i}, worker {worker}.")}],
                    "max_tokens": 3,
                });
                let Ok(response) = client.post(&url).json(&body).send().await else {
                    return;
                };
                let id = response.headers().get("x-mull-trace-id").cloned();
                if response.bytes().await.is_err() {
                    return;
                }
                let id = id.expect("recorded responses carry a trace id");
                completed.lock().unwrap().push(id.to_str().unwrap().to_string());
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed.lock().unwrap().len() < 12 {
        assert!(Instant::now() < deadline, "requests did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-KILL", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = child;
    child.0.wait().unwrap();
    for client in clients {
        let _ = client.await;
    }
    let completed = completed.lock().unwrap().clone();

    let connection = rusqlite::Connection::open(&path).unwrap();
    let check: String = connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let mut missing = 0;
    for id in &completed {
        let found: i64 = connection
            .query_row("SELECT count(*) FROM traces WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .unwrap();
        missing += usize::from(found == 0);
    }
    assert!(
        missing <= QUEUE_CAPACITY + 1,
        "{missing} of {} completed requests lost their trace",
        completed.len()
    );
    drop(connection);

    // The server starts again on the same file.
    let (_again, address) = spawn_server(&["--traces-path", path.to_str().unwrap()]);
    let health = client
        .get(format!("http://{address}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
