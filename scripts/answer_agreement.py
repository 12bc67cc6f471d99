"""Greedy answers of two GGUF files of the same model on GSM8K dev questions.

Starts a release mull server for each file in turn, sends the first N
questions with temperature 0, and prints JSON with how often the final
numbers (and the whole texts) agree, and how many final numbers match the
reference answers. Usage: answer_agreement.py A.gguf B.gguf [N]
"""

import json
import os
import re
import sys
import urllib.request
from pathlib import Path

from mull_server import start_server

ROOT = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("GSM8K_DEV", ROOT.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"))


def last_number(text):
    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def answers(model, questions):
    server, url = start_server(model)
    try:
        texts = []
        for i, question in enumerate(questions):
            body = json.dumps({
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 96,
                "temperature": 0,
            }).encode()
            request = urllib.request.Request(
                url + "/v1/chat/completions", body, {"content-type": "application/json"}
            )
            reply = json.load(urllib.request.urlopen(request))
            texts.append(reply["choices"][0]["message"]["content"])
            print(f"agreement: {Path(model).name} {i + 1}/{len(questions)}", file=sys.stderr)
        return texts
    finally:
        server.terminate()
        server.wait()


def main():
    first, second = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    rows = [json.loads(line) for line in DEV.open()][:count]
    questions = [row["question"] for row in rows]
    gold = [row["answer"].split("####")[-1].strip().replace(",", "") for row in rows]
    a = answers(first, questions)
    b = answers(second, questions)
    same_answer = sum(last_number(x) == last_number(y) for x, y in zip(a, b))
    same_text = sum(x == y for x, y in zip(a, b))
    print(json.dumps({
        "questions": count,
        "same_final_number": same_answer,
        "same_text": same_text,
        "first": Path(first).name,
        "second": Path(second).name,
        "first_correct": sum(last_number(x) == g for x, g in zip(a, gold)),
        "second_correct": sum(last_number(y) == g for y, g in zip(b, gold)),
    }))


if __name__ == "__main__":
    main()
