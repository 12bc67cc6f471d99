"""GSM8K accuracy with and without a handbook learned from GSM8K train traces.

Starts a release mull server with a fresh trace store and then:

1. answers the first TRAIN questions of GSM8K train with greedy decoding,
   and posts feedback on each trace: +1 when the final number matches the
   reference, -1 otherwise, as a client marking answers would;
2. runs behavior extraction through the admin API until no solved trace is
   left, which fills the handbook from the traces marked right;
3. answers the first DEV questions of GSM8K dev with greedy decoding and
   with the handbook strategy in front of greedy decoding, alternating per
   question, and writes accuracy, generated tokens and wall time, with
   ratios, and the learned behaviors into BENCHMARKS.md.

Progress goes to stderr. Each reply is appended to
target/bench-handbook-LABEL.jsonl as it comes.

Usage: bench_handbook.py MODEL.gguf LABEL [TRAIN] [DEV] [MAX_TOKENS]
"""

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_strategies import INSTRUCTION, number, write_section
from mull_server import start_server

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
ADMIN_KEY = "bench-handbook-admin"
CONFIGS = {
    "greedy": {},
    "handbook": {"decoding": {"strategy": "handbook", "behaviors": 3}},
}


def call(url, path, body=None, admin=False, method=None):
    headers = {"content-type": "application/json"}
    if admin:
        headers["authorization"] = f"Bearer {ADMIN_KEY}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data, headers, method=method)
    with urllib.request.urlopen(request) as response:
        return json.load(response), response.headers


def ask(url, model, question, config, max_tokens):
    body = {
        "model": model,
        "messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **config,
    }
    begin = time.perf_counter()
    reply, headers = call(url, "/v1/chat/completions", body)
    seconds = time.perf_counter() - begin
    text = reply["choices"][0]["message"]["content"]
    return text, reply["usage"]["completion_tokens"], seconds, headers["x-mull-trace-id"]


def gold(row):
    return row["answer"].split("####")[-1].strip().replace(",", "")


def learn(url, label, rows, max_tokens):
    solved = 0
    for i, row in enumerate(rows):
        text, _, seconds, trace = ask(url, label, row["question"], {}, max_tokens)
        right = number(text) == gold(row)
        solved += right
        call(url, f"/admin/traces/{trace}/feedback", {"score": 1 if right else -1}, admin=True)
        print(f"bench-handbook: {label} train {i + 1}/{len(rows)}: {seconds:.1f} s, "
              f"{'right' if right else 'wrong'}", file=sys.stderr)
    rounds = 0
    while True:
        report, _ = call(url, "/admin/extraction", {}, admin=True, method="POST")
        rounds += 1
        print(f"bench-handbook: {label} extraction run {rounds}: examined {report['examined']}, "
              f"added {len(report['added'])}", file=sys.stderr)
        if report["examined"] == 0:
            break
    behaviors, _ = call(url, "/admin/behaviors", admin=True)
    return solved, behaviors["data"] if isinstance(behaviors, dict) else behaviors


def evaluate(url, label, rows, max_tokens, log):
    results = {name: {"correct": 0, "tokens": 0, "seconds": 0.0} for name in CONFIGS}
    for i, row in enumerate(rows):
        for name, config in CONFIGS.items():
            text, tokens, seconds, _ = ask(url, label, row["question"], config, max_tokens)
            right = number(text) == gold(row)
            result = results[name]
            result["correct"] += right
            result["tokens"] += tokens
            result["seconds"] += seconds
            with log.open("a") as out:
                record = {"question": i, "decoding": name, "right": right,
                          "tokens": tokens, "seconds": seconds, "text": text}
                out.write(json.dumps(record) + "\n")
            print(f"bench-handbook: {label} dev {i + 1}/{len(rows)} {name}: {seconds:.1f} s, "
                  f"{'right' if right else 'wrong'}", file=sys.stderr)
    return results


def main():
    model, label = sys.argv[1], sys.argv[2]
    train_count = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    dev_count = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    max_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 320
    train = [json.loads(line) for line in (DATA / "train.jsonl").open()][:train_count]
    dev = [json.loads(line) for line in (DATA / "dev.jsonl").open()][:dev_count]
    log = ROOT / "target" / f"bench-handbook-{label}.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    with tempfile.TemporaryDirectory() as store:
        server, url = start_server(
            model, "--model-name", label, "--request-timeout-secs", "3600",
            "--traces-path", str(Path(store) / "traces.db"), "--admin-key", ADMIN_KEY,
            "--extraction-interval-secs", "0",
        )
        try:
            solved, behaviors = learn(url, label, train, max_tokens)
            results = evaluate(url, label, dev, max_tokens, log)
        finally:
            server.terminate()
            server.wait()
    write(label, train_count, solved, dev_count, max_tokens, behaviors, results)


def write(label, train_count, solved, dev_count, max_tokens, behaviors, results):
    greedy = results["greedy"]
    lines = [
        f"### {label}: handbook from the first {train_count} GSM8K train questions, "
        f"first {dev_count} dev questions, max_tokens {max_tokens}",
        "",
        f"Greedy decoding solved {solved} of the {train_count} train questions; "
        f"extraction from those traces stored {len(behaviors)} behaviors.",
        "",
        "| decoding | accuracy | ratio | generated tokens per question | ratio "
        "| seconds per question | ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    for name, r in results.items():
        accuracy = r["correct"] / dev_count
        ratio = f"{r['correct'] / greedy['correct']:.2f}x" if greedy["correct"] else "n/a"
        lines.append(
            f"| {name} | {accuracy:.2f} | {ratio} | {r['tokens'] / dev_count:.0f} "
            f"| {r['tokens'] / greedy['tokens']:.2f}x | {r['seconds'] / dev_count:.1f} "
            f"| {r['seconds'] / greedy['seconds']:.2f}x |"
        )

    lines += ["", "The learned behaviors:", ""]
    lines += [f"- `{b['name']}`: {b['instruction']}" for b in behaviors] or ["- (none)"]

    write_section(f"handbook:{label}", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
