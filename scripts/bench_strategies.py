"""GSM8K accuracy and cost of each decoding strategy against greedy decoding.

Starts a release mull server on the given GGUF file, runs the first N
questions of GSM8K dev through greedy decoding, each strategy and cautious
decoding inside self-consistency, and writes a table of accuracy, engine
tokens per question and wall time, each also as a ratio to greedy, into
BENCHMARKS.md. Configurations alternate per question, so machine noise hits
them alike. Progress goes to stderr.

Usage: bench_strategies.py MODEL.gguf LABEL [N] [MAX_TOKENS]

The server runs on the default engine (llama) unless MULL_ENGINE names
another. BENCH_MINUTES, when set, ends the run after the first question
that finishes past that many minutes; the table then covers the questions
done. BENCH_CONFIGS, a comma-separated list, runs only those decodings
(greedy is always run, as the baseline). Each question's results are
appended to
target/bench-strategies-LABEL.jsonl as they come.
"""

import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

from mull_server import start_server

ROOT = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("GSM8K_DEV", ROOT.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"))
INSTRUCTION = "Solve the problem step by step, then end with \"The answer is\" and the number."

CONFIGS = {
    "greedy": {"temperature": 0},
    "self_consistency": {"decoding": {"strategy": "self_consistency", "samples": 5}},
    "cautious": {"temperature": 0.7, "decoding": {"strategy": "cautious"}},
    "introspection": {"temperature": 0, "decoding": {"strategy": "introspection", "turns": 3}},
    "self_consistency+cautious": {
        "decoding": {"strategy": "self_consistency", "samples": 5, "inner": {"strategy": "cautious"}}
    },
}


def number(text):
    marked = re.search(r"answer is\s*\$?(-?[\d,]*\.?\d+)", text, re.IGNORECASE)
    found = [marked.group(1)] if marked else re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def ask(url, model, question, config, max_tokens):
    body = {
        "model": model,
        "messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "seed": 1,
        **config,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    begin = time.perf_counter()
    reply = json.load(urllib.request.urlopen(request))
    elapsed = time.perf_counter() - begin
    usage = reply["usage"]
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    if "decoding" in reply:
        spent = reply["decoding"]["engine_tokens"]
        tokens = spent["prompt"] - spent.get("prompt_cached", 0) + spent["generated"]
    return reply["choices"][0]["message"]["content"], tokens, elapsed


def main():
    model, label = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 160
    rows = [json.loads(line) for line in DEV.open()][:count]
    budget = float(os.environ["BENCH_MINUTES"]) * 60 if "BENCH_MINUTES" in os.environ else None
    chosen = os.environ.get("BENCH_CONFIGS")
    configs = {name: config for name, config in CONFIGS.items()
               if chosen is None or name == "greedy" or name in chosen.split(",")}
    results = {name: {"correct": 0, "tokens": 0, "seconds": 0.0} for name in configs}
    log = ROOT / "target" / f"bench-strategies-{label}.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    begin = time.perf_counter()
    done = 0
    server, url = start_server(model, "--request-timeout-secs", "3600", "--model-name", label)
    try:
        for i, row in enumerate(rows):
            gold = row["answer"].split("####")[-1].strip().replace(",", "")
            for name, config in configs.items():
                text, tokens, seconds = ask(url, label, row["question"], config, max_tokens)
                right = number(text) == gold
                result = results[name]
                result["correct"] += right
                result["tokens"] += tokens
                result["seconds"] += seconds
                with log.open("a") as out:
                    record = {"question": i, "decoding": name, "right": right,
                              "tokens": tokens, "seconds": seconds, "text": text}
                    out.write(json.dumps(record) + "\n")
                print(f"bench-strategies: {label} question {i + 1}/{count} {name}: "
                      f"{seconds:.1f} s, {'right' if right else 'wrong'}",
                      file=sys.stderr)
            done = i + 1
            if budget is not None and time.perf_counter() - begin > budget:
                print(f"bench-strategies: {label}: time budget spent after {done} questions",
                      file=sys.stderr)
                break
    finally:
        server.terminate()
        server.wait()
    write(label, done, max_tokens, results)


def write(label, count, max_tokens, results):
    greedy = results["greedy"]
    lines = [
        f"### {label}: first {count} GSM8K dev questions, max_tokens {max_tokens}, "
        f"{os.environ.get('MULL_ENGINE', 'llama')} engine",
        "",
        f"![engine tokens and wall time as ratios to greedy](docs/strategies-{label}.png)",
        "",
        "| decoding | accuracy | ratio | engine tokens per question | ratio | seconds per question | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        accuracy = r["correct"] / count
        ratio = f"{accuracy / (greedy['correct'] / count):.2f}x" if greedy["correct"] else "n/a"
        lines.append(
            f"| {name} | {accuracy:.2f} | {ratio} | {r['tokens'] / count:.0f} "
            f"| {r['tokens'] / greedy['tokens']:.2f}x | {r['seconds'] / count:.1f} "
            f"| {r['seconds'] / greedy['seconds']:.2f}x |"
        )
    write_section(f"strategies:{label}", lines)
    print("\n".join(lines))


def write_section(key, lines):
    """Replaces the BENCHMARKS.md section between `<!-- KEY:begin -->` and
    `<!-- KEY:end -->` with `lines`, or appends it when it is missing."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = "\n".join([begin, *lines, end])
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
