"""Serving speed of mull side by side with llama.cpp's llama-server.

Starts mull on each engine and llama-server on the same GGUF file with the
same thread count. Then runs `mull bench` against them in turn, A B C A B C,
for several rounds, so that machine noise hits every server alike. Writes
the serving section of BENCHMARKS.md (medians over rounds and ratios to
llama-server) and the raw results to target/bench-serving.json.

It then measures, one round each, the llama engine against llama-server
with the other quantization formats of the default model (Q4_0 and Q8_0
files next to MODEL) and with one thread, and in-process, per format, how
much a decode step of 5 and 16 sequences costs against a step of one.

    python3 scripts/bench_serving.py LLAMA_SERVER MODEL ROUNDS THREADS MAX_TOKENS
"""

import json
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mull_server import ROOT, start_server  # noqa: E402

BEGIN = "<!-- serving:begin -->"
END = "<!-- serving:end -->"
CONCURRENCY = [1, 4, 16]
SLOTS = max(CONCURRENCY)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(binary, model, threads):
    port = free_port()
    server = subprocess.Popen(
        [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "-tb", str(threads), "-np", str(SLOTS),
         "-c", str(2048 * SLOTS), "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {server.returncode}")
        try:
            urllib.request.urlopen(url + "/health")
            return server, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("llama-server did not become healthy in 300 s")


# Decoding strategies measured under load, as `mull bench --extra` bodies.
STRATEGIES = {
    "plain": None,
    "self_consistency (5 samples)": {"decoding": {"strategy": "self_consistency", "samples": 5}},
    "cautious": {"temperature": 0.7, "decoding": {"strategy": "cautious"}},
}
STRATEGY_CONCURRENCY = [4]


def bench(url, model_id, label, max_tokens, requests, concurrency=CONCURRENCY, extra=None):
    """Runs `mull bench` once over the given concurrency levels."""
    command = [str(ROOT / "target/release/mull"), "bench", "--url", url, "--model", model_id,
               "--concurrency", ",".join(map(str, concurrency)), "--requests", str(requests),
               "--max-tokens", str(max_tokens), "--label", label]
    if extra is not None:
        command += ["--extra", json.dumps(extra)]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def in_process_decode(model, engine, threads, max_tokens, batch_sizes=(1,)):
    """Decode speed of an engine without HTTP (`mull speed`). With batch
    sizes up to SLOTS, the llama engine has as many slots as the server."""
    out = subprocess.run(
        [str(ROOT / "target/release/mull"), "speed", "--model-path", str(model),
         "--engine", engine, "--threads", str(threads), "--decode-tokens", str(max_tokens),
         "--repeat", "3", "--label", engine, "--batch-sizes", ",".join(map(str, batch_sizes))],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    return json.loads(out.stdout)


BATCH_SIZES = [1, 5, SLOTS]


def variants(llama_server, model, threads, max_tokens, requests):
    """Runs one round of mull's llama engine against llama-server for each
    other format, and for the default format on one thread."""
    runs = []
    configs = [(model.with_name(model.name.replace("Q4_1", fmt)), threads) for fmt in ["Q4_0", "Q8_0"]]
    configs.append((model, 1))
    for path, count in configs:
        if not path.exists():
            print(f"bench-serving: {path.name} is missing, skipped", file=sys.stderr)
            continue
        servers = {}
        try:
            servers["llama-server"] = start_llama_server(llama_server, path, count)
            servers["mull (llama)"] = start_server(
                path, "--engine", "llama", "--threads", str(count),
                "--max-concurrent-requests", str(SLOTS), "--max-queued-requests", str(4 * SLOTS))
            for name, (_, url) in servers.items():
                print(f"bench-serving: {path.name}, {count} threads: {name}", file=sys.stderr)
                model_id = "smollm2-135m" if name.startswith("mull") else "default"
                result = bench(url, model_id, name, max_tokens, requests, [1, SLOTS])
                runs.append({"file": path.name, "threads": count, "server": name, "result": result})
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
    return runs


def main():
    llama_server, model, rounds, threads, max_tokens = sys.argv[1:6]
    rounds, threads, max_tokens = int(rounds), int(threads), int(max_tokens)
    model = Path(model).resolve()
    # Each level gets 16 requests, the highest concurrency.
    requests = SLOTS

    servers = {}
    try:
        servers["llama-server"] = start_llama_server(llama_server, model, threads)
        common = ["--threads", str(threads), "--max-concurrent-requests", str(SLOTS),
                  "--max-queued-requests", str(4 * SLOTS)]
        servers["mull (llama)"] = start_server(model, "--engine", "llama", *common)
        servers["mull (mistralrs)"] = start_server(model, "--engine", "mistralrs", *common)
        results = {name: [] for name in servers}
        for round_ in range(1, rounds + 1):
            for name, (_, url) in servers.items():
                print(f"bench-serving: round {round_} of {rounds}: {name}", file=sys.stderr)
                model_id = "smollm2-135m" if name.startswith("mull") else "default"
                results[name].append(bench(url, model_id, name, max_tokens, requests))
        # One round: cautious decoding on the mistralrs engine alone takes
        # minutes.
        strategies = {}
        for name, (_, url) in servers.items():
            if not name.startswith("mull"):
                continue
            for strategy, extra in STRATEGIES.items():
                print(f"bench-serving: strategies: {name}, {strategy}", file=sys.stderr)
                run = bench(url, "smollm2-135m", f"{name} {strategy}", max_tokens // 2,
                            max(STRATEGY_CONCURRENCY), STRATEGY_CONCURRENCY, extra)
                strategies.setdefault((name, strategy), []).append(run)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()

    in_process = {}
    for engine in ["llama", "mistralrs"]:
        print(f"bench-serving: in-process decode, {engine}", file=sys.stderr)
        sizes = BATCH_SIZES if engine == "llama" else [1]
        in_process[engine] = in_process_decode(model, engine, threads, max_tokens, sizes)

    other_runs = variants(llama_server, model, threads, max_tokens, requests)
    steps = {"Q4_1": in_process["llama"]}
    for fmt in ["Q4_0", "Q8_0"]:
        path = model.with_name(model.name.replace("Q4_1", fmt))
        if path.exists():
            print(f"bench-serving: in-process batched decode, {fmt}", file=sys.stderr)
            steps[fmt] = in_process_decode(path, "llama", threads, max_tokens, BATCH_SIZES)

    raw = {"results": results, "in_process": in_process, "variants": other_runs, "steps": steps,
           "strategies": [{"server": k[0], "strategy": k[1], "runs": v} for k, v in strategies.items()]}
    (ROOT / "target/bench-serving.json").write_text(json.dumps(raw, indent=1))
    write_markdown(results, in_process, strategies, model, rounds, threads, max_tokens, requests,
                   other_runs, steps)


def median_level(runs, concurrency, key):
    values = []
    for run in runs:
        for level in run["levels"]:
            if level["concurrency"] == concurrency:
                value = level[key]
                values.append(value["p50"] if isinstance(value, dict) else value)
    return statistics.median(values)


def write_markdown(results, in_process, strategies, model, rounds, threads, max_tokens, requests,
                   other_runs, steps):
    peer = "llama-server"
    lines = [
        BEGIN,
        "## Serving speed against llama.cpp's llama-server",
        "",
        f"`scripts/bench-serving`, {time.strftime('%Y-%m-%d')}: `{model.name}`, {threads} threads, "
        f"greedy, max_tokens {max_tokens}, {requests} streamed chat requests per level, "
        f"{rounds} rounds alternating the servers, medians over rounds "
        f"({platform.machine()}, {platform.system()}). llama-server {SLOTS} slots, built by "
        "`scripts/build-llama-server`. Ratios are against llama-server in the same run.",
        "",
        "| server | concurrency | output tok/s | ratio | req/s | TTFT p50 ms | TPOT p50 ms | ITL p99 ms | E2E p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for c in CONCURRENCY:
            tps = median_level(runs, c, "output_tokens_per_s")
            ratio = tps / median_level(results[peer], c, "output_tokens_per_s")
            itl99 = statistics.median(
                level["itl_ms"]["p99"] for run in runs for level in run["levels"]
                if level["concurrency"] == c
            )
            lines.append(
                f"| {name} | {c} | {tps:.1f} | {ratio:.2f}x | "
                f"{median_level(runs, c, 'requests_per_s'):.2f} | "
                f"{median_level(runs, c, 'ttft_ms'):.0f} | {median_level(runs, c, 'tpot_ms'):.1f} | "
                f"{itl99:.1f} | {median_level(runs, c, 'e2e_ms'):.0f} |"
            )
    lines += ["", f"Other formats and thread counts, one round each, llama-server and mull's llama "
              f"engine alternating, {requests} requests per level.", "",
              "| file | threads | concurrency | llama-server tok/s | mull (llama) tok/s | ratio | "
              "llama-server TTFT p50 ms | mull TTFT p50 ms |", "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["file"], r["threads"]) for r in other_runs):
        pair = {r["server"]: r["result"] for r in other_runs if (r["file"], r["threads"]) == key}
        if len(pair) < 2:
            continue
        for c in [1, SLOTS]:
            peer_tps = median_level([pair["llama-server"]], c, "output_tokens_per_s")
            tps = median_level([pair["mull (llama)"]], c, "output_tokens_per_s")
            lines.append(
                f"| {key[0]} | {key[1]} | {c} | {peer_tps:.1f} | {tps:.1f} | {tps / peer_tps:.2f}x | "
                f"{median_level([pair['llama-server']], c, 'ttft_ms'):.0f} | "
                f"{median_level([pair['mull (llama)']], c, 'ttft_ms'):.0f} |")
    lines += ["", "Cost of batching in the llama engine, in-process (`mull speed --batch-sizes`, "
              f"{threads} threads, {SLOTS} slots): output tokens/s with one prompt sampled 1, 5 and "
              f"{SLOTS} times, and the time of one decode step against a one-sequence step.", "",
              "| quantization | 1 sequence tok/s | 5 sequences tok/s | step cost at 5 | "
              f"{SLOTS} sequences tok/s | step cost at {SLOTS} |", "|---|---|---|---|---|---|"]
    for fmt, report in steps.items():
        by_size = {b["batch_size"]: b for b in report["batches"]}
        five, full = by_size[5], by_size[SLOTS]
        lines.append(
            f"| {fmt} | {report['decode_tokens_per_s']:.1f} | {five['decode_tokens_per_s']:.1f} | "
            f"{five['step_cost']:.2f}x | {full['decode_tokens_per_s']:.1f} | {full['step_cost']:.2f}x |")
    lines += ["", "Server overhead at one stream: decode speed in-process (`mull speed`, "
              f"{SLOTS} slots for the llama engine, as in the server) against "
              "the same engine over HTTP (1 / TPOT p50).", "",
              "| engine | in-process tok/s | over HTTP tok/s | overhead |", "|---|---|---|---|"]
    for engine, name in [("llama", "mull (llama)"), ("mistralrs", "mull (mistralrs)")]:
        direct = in_process[engine]["decode_tokens_per_s"]
        http = 1000.0 / median_level(results[name], 1, "tpot_ms")
        lines.append(f"| {engine} | {direct:.1f} | {http:.1f} | {100 * (1 - http / direct):.1f}% |")
    lines += ["", f"Decoding strategies under load: streamed chat requests, max_tokens {max_tokens // 2}, "
              f"{max(STRATEGY_CONCURRENCY)} requests per level, one round. Ratios are end-to-end latency "
              "(p50) against plain decoding on the same server and concurrency.", "",
              "| server | strategy | concurrency | E2E p50 ms | ratio to plain | output tok/s |",
              "|---|---|---|---|---|---|"]
    for (name, strategy), runs in strategies.items():
        for c in STRATEGY_CONCURRENCY:
            e2e = median_level(runs, c, "e2e_ms")
            plain = median_level(strategies[(name, "plain")], c, "e2e_ms")
            tps = median_level(runs, c, "output_tokens_per_s")
            lines.append(f"| {name} | {strategy} | {c} | {e2e:.0f} | {e2e / plain:.2f}x | {tps:.1f} |")
    lines += ["", END]

    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    section = "\n".join(lines)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
