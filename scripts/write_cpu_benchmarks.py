"""Writes the CPU speed section of BENCHMARKS.md from bench-cpu's results."""

import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- cpu-speed:begin -->"
END = "<!-- cpu-speed:end -->"


def main():
    runs = [json.loads(line) for line in open(sys.argv[1])]
    agreement = json.load(open(sys.argv[2]))
    by_label = {}
    for run in runs:
        entry = by_label.setdefault(run["label"], {"prefill": [], "decode": []})
        entry["prefill"] += run["prefill_runs"]
        entry["decode"] += run["decode_runs"]
    base = by_label["Q4_1 f32"]
    base_prefill = statistics.median(base["prefill"])
    base_decode = statistics.median(base["decode"])
    rows = []
    for label, entry in by_label.items():
        prefill = statistics.median(entry["prefill"])
        decode = statistics.median(entry["decode"])
        rows.append(
            f"| {label} | {prefill:.1f} | {prefill / base_prefill:.2f}x "
            f"| {decode:.1f} | {decode / base_decode:.2f}x |"
        )
    cpu = platform.processor() or platform.machine()
    section = "\n".join([
        BEGIN,
        "## CPU speed of the default model (mistral.rs engine)",
        "",
        f"Measured by `scripts/bench-cpu` on {cpu}, 2 cores, release build with",
        "`-C target-cpu=native`; in-process (`mull speed`), greedy, prefill of a",
        "256-token prompt, decode of 128 tokens, medians over "
        f"{len(base['decode'])} runs per configuration, configurations alternated.",
        "Ratios are against the shipped Q4_1 file with f32 activations in the same run.",
        "",
        "![prefill and decode tokens/s per configuration](docs/cpu-speed.png)",
        "",
        "| format, activations | prefill tokens/s | ratio | decode tokens/s | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Answer change from the Q4_1 to Q8_0 conversion, greedy, first "
        f"{agreement['questions']} GSM8K dev questions, 96 tokens: the final number",
        f"agreed on {agreement['same_final_number']} of {agreement['questions']},",
        f"the whole text on {agreement['same_text']} of {agreement['questions']}.",
        f"Final numbers matching the reference: {agreement['first_correct']} with Q4_1,",
        f"{agreement['second_correct']} with Q8_0. Greedy text from a 135M model",
        "diverges after the first changed token, so texts rarely stay identical",
        "over 96 tokens; the accuracy is the quality measure.",
        END,
    ])
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
