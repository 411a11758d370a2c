"""Load on ``florence-kit serve MODEL --api``: N concurrent ``openai`` clients × M requests, batching on and off.

    python -m benchmarks.api_load                               # tiny model, 16 clients × 63 requests
    python -m benchmarks.api_load --model base --requests 4     # base-sized random model at 768 px
    python -m benchmarks.api_load --clients 1,4,16 --json out.json

For each setting the server is the real command (``florence-kit serve DIR --api``) in its own process on
127.0.0.1, first with batching (``--max-batch``, ``--batch-window-ms``), then with batching off (``--max-batch 1``)
as the baseline, on the same model folder, images and request list. Each client is a thread with its own
``openai.OpenAI`` client asking its share of a fixed mix: caption, ``<OD>``, DocVQA questions and OCR over a
handful of generated images (data: URLs), with one broken request in every ``--broken-every`` (an unknown task, an
undecodable image, a GIF, a box outside the image). Printed per run: requests/s over all requests, p50/p95/p99
latency of the good ones, good requests that failed (must be 0), broken ones not refused with a 4xx (must be 0),
the server's RSS before (after a warm-up) and after, the largest batch it formed. Answers of the two runs must
be equal (asserted): batching changes the speed, never an answer.

The models are random (no weights are downloaded): :func:`benchmarks.predict_speed.build_model` scales their
cross-attention so answers depend on the image, and answers run to ``--max-tokens``, the same work in both runs.
On a shared CPU wall-clock rates swing with the other load; the ratio of the two runs, measured back to back,
is steadier.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

QUESTIONS = ("What is the total?", "What is the date?", "Who is the sender?", "What is the invoice number?")


def save_model(name: str, folder: Path) -> Path:
    """The random model of :mod:`benchmarks.predict_speed`, saved as a folder ``serve`` loads."""
    from benchmarks.predict_speed import build_model

    model, processor = build_model(name)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def make_urls(n: int, seed: int = 0) -> list[str]:
    """``n`` varied photo-like JPEGs as data: URLs."""
    from benchmarks.predict_speed import make_images

    with tempfile.TemporaryDirectory() as tmp:
        return [f"data:image/jpeg;base64,{base64.b64encode(p.read_bytes()).decode()}"
                for p in make_images(Path(tmp), n, seed)]


def broken_requests() -> list[dict[str, Any]]:
    """Requests a server must refuse with a 4xx."""
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(gif, "GIF")
    gif_url = f"data:image/png;base64,{base64.b64encode(gif.getvalue()).decode()}"
    return [{"text": "<NOT_A_TASK>"}, {"url": "data:image/png;base64,@@@@", "text": "<OD>"},
            {"url": gif_url, "text": "<CAPTION>"}, {"text": "region-category", "box": "9000,9000,9100,9100"}]


def plan(total: int, urls: list[str], broken_every: int) -> list[dict[str, Any]]:
    """The fixed request list: a mix of tasks over the images, one broken request in every ``broken_every``."""
    bad = broken_requests()
    out = []
    for i in range(total):
        if broken_every and i % broken_every == broken_every - 1:
            out.append({"url": urls[i % len(urls)], **bad[(i // broken_every) % len(bad)], "broken": True})
            continue
        kind = i % 4
        text = ("<CAPTION>", "<OD>", QUESTIONS[(i // 4) % len(QUESTIONS)], "<OCR>")[kind]
        out.append({"url": urls[i % len(urls)], "text": text, "broken": False})
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model_dir: Path, port: int, max_batch: int, window_ms: float, threads: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from florence_kit.cli import main; main()", "serve", str(model_dir), "--api",
         "--port", str(port), "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms),
         "--task", "docvqa"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.loads(response.read())


def run_load(port: int, requests: list[dict[str, Any]], clients: int, max_tokens: int) -> dict[str, Any]:
    """Every request of ``requests`` asked by ``clients`` threads (client c asks c, c+N, ...)."""
    import openai

    answers: dict[int, str] = {}
    latencies: list[float] = []
    failed_good, accepted_bad, refused = [], [], 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal refused
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        for i in range(c, len(requests), clients):
            req = requests[i]
            extra = {"box": req["box"]} if "box" in req else None
            start = time.perf_counter()
            try:
                got = api.chat.completions.create(
                    model="m", max_tokens=max_tokens, temperature=0, extra_body=extra,
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": req["url"]}},
                                                           {"type": "text", "text": req["text"]}]}])
                took = time.perf_counter() - start
                with lock:
                    if req["broken"]:
                        accepted_bad.append(i)
                    else:
                        answers[i] = got.choices[0].message.content
                        latencies.append(took)
            except openai.APIStatusError as exc:
                with lock:
                    if req["broken"] and 400 <= exc.status_code < 500:
                        refused += 1
                    else:
                        failed_good.append((i, exc.status_code, str(exc)[:200]))
            except Exception as exc:  # a dropped connection is a failure too
                with lock:
                    failed_good.append((i, None, f"{type(exc).__name__}: {exc}"[:200]))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(requests), "wall_s": round(wall, 2), "req_per_s": round(len(requests) / wall, 2),
            "p50_ms": round(q[49] * 1000), "p95_ms": round(q[94] * 1000), "p99_ms": round(q[98] * 1000),
            "good": len(latencies), "failed_good": len(failed_good), "broken_refused": refused,
            "broken_accepted": len(accepted_bad), "first_failures": failed_good[:3], "answers": answers}


def measure(model_dir: Path, requests: list[dict[str, Any]], clients: int, args: argparse.Namespace,
            batching: bool) -> dict[str, Any]:
    port = free_port()
    max_batch, window = (args.max_batch, args.window_ms) if batching else (1, 0.0)
    proc = start_server(model_dir, port, max_batch, window, args.threads)
    try:
        warmup = 2 * clients if args.warmup is None else args.warmup
        if warmup:
            run_load(port, requests[:min(len(requests), warmup)], clients, args.max_tokens)
        before = rss_mb(proc.pid)
        result = run_load(port, requests, clients, args.max_tokens)
        result.update(rss_before_mb=round(before), rss_after_mb=round(rss_mb(proc.pid)),
                      largest_batch=health(port)["largest_batch"], max_batch=max_batch, window_ms=window)
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--clients", default="16", help="concurrent clients, or a comma list (1,4,16)")
    parser.add_argument("--requests", type=int, default=63, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=None, help="requests before the measured ones (default: "
                        "2 per client); RSS 'before' is read after them")
    parser.add_argument("--broken-every", type=int, default=25, help="one broken request in every K (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch CPU threads (0: its default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the batching-off run")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    urls = make_urls(args.images)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(args.model, Path(tmp) / "model")
        for clients in [int(c) for c in args.clients.split(",")]:
            requests = plan(clients * args.requests, urls, args.broken_every)
            on = measure(model_dir, requests, clients, args, batching=True)
            show(args.model, clients, "batching", on, rows)
            if args.no_baseline:
                continue
            off = measure(model_dir, requests, clients, args, batching=False)
            show(args.model, clients, "off", off, rows)
            rows[-2]["speedup"] = round(on["req_per_s"] / off["req_per_s"], 2)
            print(f"{args.model:4s} clients={clients:3d} speedup ×{rows[-2]['speedup']} (batching / off)", flush=True)
            assert on["answers"] == off["answers"], "batching changed an answer"
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def show(model: str, clients: int, name: str, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print one run's figures and keep them (without the answers)."""
    row = {"model": model, "clients": clients, "mode": name, **{k: v for k, v in result.items() if k != "answers"}}
    rows.append(row)
    print(f"{model:4s} clients={clients:3d} {name:8s} {row['req_per_s']:7.2f} req/s  p50 {row['p50_ms']} ms  "
          f"p95 {row['p95_ms']} ms  p99 {row['p99_ms']} ms  good {row['good']}  failed {row['failed_good']}  "
          f"broken refused {row['broken_refused']}/{row['broken_refused'] + row['broken_accepted']}  "
          f"RSS {row['rss_before_mb']}→{row['rss_after_mb']} MB  largest batch {row['largest_batch']}", flush=True)


if __name__ == "__main__":
    main()
