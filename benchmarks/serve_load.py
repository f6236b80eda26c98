"""Throughput of `lav2 serve` under N concurrent clients, beside N sequential `lav2 ask` runs.

    python benchmarks/serve_load.py --model demo --clients 1,4,16 --per-client 2 --max-tokens 64

Starts `lav2 serve` on a free loopback port (its load time is not counted), then for each N runs
N client threads that each send `--per-client` chat completions one after another (greedy, the
questions below in turn; every other one about an easy-VQA image when `easy_vqa` is installed,
sent as a data: URL). Requests per second and completion tokens per second are over the wall
time of the whole round. The baseline is what a shell loop does: N `lav2 ask ... --json` runs one
after another, each loading the model (the load counted: it is the price of a process per
question). Only the loopback interface is used; every count is bounded by the options.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = [  # short and long answers: a batch runs until its longest row ends
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Name three colours.",
    "Explain why the sky is blue.",
    "What is the opposite of cold?",
    "Write a poem about the sea.",
]
IMAGE_QUESTIONS = ["What shape is in the image?", "What color is the shape?"]


def easyvqa_images(n: int) -> list[Path]:
    try:
        import easy_vqa
    except ImportError:
        return []
    d = Path(easy_vqa.__file__).parent / "data" / "test" / "images"
    return [d / f"{i}.png" for i in range(n)]


def workload(count: int, with_images: bool) -> list[tuple[str, Path | None]]:
    """`count` (question, image or None) pairs: text and, when asked, image questions alternating."""
    images = easyvqa_images(count) if with_images else []
    out = []
    for i in range(count):
        if images and i % 2 == 1:
            out.append((IMAGE_QUESTIONS[(i // 2) % len(IMAGE_QUESTIONS)], images[i]))
        else:
            out.append((QUESTIONS[(i // 2 if images else i) % len(QUESTIONS)], None))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data}")
    return data


def message(question: str, image: Path | None) -> dict:
    if image is None:
        return {"role": "user", "content": question}
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {"role": "user", "content": [{"type": "text", "text": question},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def serve_round(port: int, model: str, clients: int, per_client: int, max_tokens: int, with_images: bool) -> dict:
    work = workload(clients * per_client, with_images)
    tokens: list[int] = []
    errors: list[str] = []

    def client(k: int) -> None:
        for q, im in work[k::clients]:
            try:
                r = post(port, {"model": model, "messages": [message(q, im)], "temperature": 0,
                                "max_tokens": max_tokens})
                tokens.append(r["usage"]["completion_tokens"])
            except Exception as e:  # reported, not hidden
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"mode": "serve", "clients": clients, "requests": len(tokens), "errors": len(errors),
            "seconds": round(wall, 2), "requests_per_s": round(len(tokens) / wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 1), "completion_tokens": sum(tokens)}


def ask_round(model: str, runs: int, max_tokens: int, with_images: bool, extra: list[str]) -> dict:
    tokens = []
    t0 = time.perf_counter()
    for q, im in workload(runs, with_images):
        r = subprocess.run([sys.executable, "-m", "lav2cli", "ask", str(im) if im else "none", q, "--model", model,
                            "--temperature", "0", "--max-new-tokens", str(max_tokens), "--json", *extra],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        tokens.append(json.loads(r.stdout)["new_tokens"])
    wall = time.perf_counter() - t0
    return {"mode": "ask", "clients": runs, "requests": runs, "errors": 0, "seconds": round(wall, 2),
            "requests_per_s": round(runs / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1),
            "completion_tokens": sum(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated N")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-images", action="store_true", help="text questions only")
    ap.add_argument("--no-ask", action="store_true", help="skip the sequential `lav2 ask` baseline")
    ap.add_argument("--json", action="store_true", help="one JSON line per round instead of a table")
    a = ap.parse_args()
    counts = [int(n) for n in a.clients.split(",")]
    with_images = not a.no_images
    port = free_port()
    log = open(os.devnull, "w")
    server = subprocess.Popen([sys.executable, "-m", "lav2cli", "serve", "--model", a.model, "--port", str(port),
                               "--max-batch", str(a.max_batch), "--device", a.device, "--log-level", "warning"],
                              stdout=log, stderr=log)
    rows = []
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                sys.exit(f"lav2 serve exited with {server.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("lav2 serve did not come up")
            time.sleep(0.5)
        post(port, {"model": a.model, "messages": [message(*workload(2, with_images)[-1])], "max_tokens": 4})  # warm-up
        for n in counts:
            rows.append(serve_round(port, a.model, n, a.per_client, a.max_tokens, with_images))
            print(json.dumps(rows[-1]) if a.json else f"serve, {n} clients: {rows[-1]}", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    if not a.no_ask:
        for n in counts:
            rows.append(ask_round(a.model, n, a.max_tokens, with_images, ["--device", a.device]))
            print(f"ask, {n} runs: {rows[-1]}", file=sys.stderr)
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return
    print("| mode | N | requests | seconds | requests/s | completion tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        what = f"`lav2 serve`, {r['clients']} concurrent clients" if r["mode"] == "serve" else \
            f"{r['clients']} sequential `lav2 ask` runs"
        print(f"| {what} | {r['clients']} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} | "
              f"{r['tokens_per_s']} |" + (f" ({r['errors']} errors)" if r["errors"] else ""))


if __name__ == "__main__":
    main()
