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
