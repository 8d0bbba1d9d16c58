"""REST: seconds per GSM8K test answer through ``lfx serve``, and answers per second at concurrency 8 with 1 and 2 workers.

Starts ``lfx serve flows/overlay_reasoning.json`` (API key required, as in production; ``--workers N`` with a
shared ``--flow-dir`` when N > 1) against the benchmark's table and selector (``OVERLAY_DOMAIN`` /
``OVERLAY_MODEL_DIR`` / ``OVERLAY_REDIS_URL``), then times ``POST /flows/<id>/run`` with GSM8K test questions: one
request at a time (seconds per answer) and 8 concurrent clients (answers per second), once per worker count. The
peer, in the same run: the same questions decoded in process by ``OverlayDecoder.generate`` with the same token
limit, so the REST overhead is the difference.

    python benchmarks/bench_rest.py --questions ../shared/data/gsm8k/test.jsonl --requests 16 --workers 1,2
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

FLOW = common.ROOT / "flows" / "overlay_reasoning.json"
API_KEY = "overlay-bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[float, dict]:
    """(seconds, JSON reply) of one request with the API key."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"x-api-key": API_KEY, "content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read() or b"null")
    return time.perf_counter() - start, reply


def redis_url(client) -> str:
    """A URL another process can reach the benchmark's Redis at (the embedded server's unix socket)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def start_server(home: Path, setup: common.Setup, port: int, threads: int, workers: int) -> subprocess.Popen:
    """``lfx serve`` on the shipped flow with ``workers`` worker processes (a shared flow folder when more than one)."""
    lfx = Path(sys.executable).with_name("lfx")
    env = os.environ | {"LANGFLOW_API_KEY": API_KEY, "OVERLAY_DOMAIN": setup.table.domain,
                        "OVERLAY_MODEL_DIR": str(setup.model_dir), "OVERLAY_REDIS_URL": redis_url(setup.client),
                        "OVERLAY_HOME": str(home)}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    shared = ["--workers", str(workers), "--flow-dir", str(home / f"flows-{port}")] if workers > 1 else []
    log = (home / "lfx-serve.log").open("w")
    return subprocess.Popen([str(lfx) if lfx.exists() else "lfx", "serve", str(FLOW), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *shared], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(base: str, proc: subprocess.Popen, home: Path, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"lfx serve exited with {proc.returncode}:\n{(home / 'lfx-serve.log').read_text()[-3000:]}")
        try:
            call(f"{base}/health", timeout=2)
            return time.perf_counter() - start
        except (urllib.error.URLError, OSError, ConnectionError):
            time.sleep(0.5)
    raise RuntimeError(f"lfx serve did not answer /health within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def answer(url: str, question: str, errors: list[str]) -> float | None:
    """Seconds for one answered question, or None with the server's reply kept in ``errors`` when it failed."""
    try:
        seconds, reply = call(url, {"input_value": question})
    except urllib.error.HTTPError as exc:
        errors.append(f"HTTP {exc.code}: {exc.read()[:300]!r}")
        return None
    if not reply.get("success", False):
        errors.append(str(reply)[:300])
        return None
    return seconds


def serve(home: Path, setup: common.Setup, args, workers: int, questions: list[str], latency: bool) -> list[dict]:
    """Rows for one server with ``workers`` workers: one request at a time (when ``latency``) and concurrency N.
    Failed requests are counted and their replies kept, not timed."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(home, setup, port, args.threads, workers)
    try:
        startup = wait_healthy(base, proc, home, args.startup_timeout)
        flows = call(f"{base}/flows")[1]
        flow_id = flows[0]["id"] if isinstance(flows[0], dict) else flows[0]
        url = f"{base}/flows/{flow_id}/run"
        errors: list[str] = []
        with ThreadPoolExecutor(workers * 2) as pool:  # warm every worker: each loads the selector once
            warm = list(pool.map(lambda q: answer(url, q, errors), [questions[-1]] * (workers * 2)))
        if not any(warm):
            raise RuntimeError(f"the flow run failed: {errors[:2]}")
        errors.clear()
        rows = []
        if latency:
            single = [answer(url, q, errors) for q in questions[:args.requests]]
            ok = [s for s in single if s is not None]
            rows.append({"measure": "lfx serve, one request at a time", "workers": workers, "requests": len(single),
                         "failed": len(single) - len(ok), "median_s": statistics.median(ok),
                         "p99_s": common.percentile(ok, 99), "answers_per_s": len(ok) / sum(ok), "startup_s": startup})
        with ThreadPoolExecutor(args.concurrency) as pool:
            start = time.perf_counter()
            loaded = list(pool.map(lambda q: answer(url, q, errors),
                                   [questions[i % args.requests] for i in range(args.requests)]))
            wall = time.perf_counter() - start
        ok = [s for s in loaded if s is not None]
        rows.append({"measure": f"lfx serve, concurrency {args.concurrency}", "workers": workers,
                     "requests": len(loaded), "failed": len(loaded) - len(ok), "median_s": statistics.median(ok),
                     "p99_s": common.percentile(ok, 99), "answers_per_s": len(ok) / wall, "startup_s": startup})
        if errors:
            print(f"{len(errors)} failed request(s) with {workers} worker(s); first: {errors[0]}")
            rows[-1]["first_error"] = errors[0]
        return rows
    finally:
        stop(proc)


def run(args) -> dict:
    if not FLOW.exists():
        reason = f"not available: {FLOW.relative_to(common.ROOT)} does not exist"
        print(reason)
        return {"skipped": reason}
    import torch

    from overlay.chains import load_chains
    from overlay.decode import DecodeConfig, OverlayDecoder

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = [c.question for c in load_chains(args.questions, "gsm8k", limit=args.requests + 1).chains]
    workers = [int(w) for w in args.workers.split(",")]
    with common.overlay_home(args.home) as home:
        setup = common.setup_overlay(home, args.data)
        rows = []
        for i, w in enumerate(workers):
            rows += serve(home, setup, args, w, questions, latency=i == 0)
        decoder = OverlayDecoder(setup.table, setup.model, setup.tokenizer, DecodeConfig(max_tokens=256))
        decoder.generate(questions[-1])
        library, tokens = [], []
        for q in questions[:args.requests]:
            start = time.perf_counter()
            tokens.append(decoder.generate(q).tokens)
            library.append(time.perf_counter() - start)
    rows.append({"measure": "in-process OverlayDecoder.generate (peer)", "workers": None, "requests": len(library),
                 "failed": 0, "median_s": statistics.median(library), "p99_s": common.percentile(library, 99),
                 "answers_per_s": len(library) / sum(library)})
    common.table(rows, ["measure", "workers", "requests", "failed", "median_s", "p99_s", "answers_per_s"],
                 f"REST (flow {FLOW.name}, {Path(args.questions).name}, ~{statistics.mean(tokens):.0f} tokens per answer)")
    return {"flow": FLOW.name, "questions": Path(args.questions).name, "threads": args.threads,
            "concurrency": args.concurrency, "workers": workers, "rows": rows, "mean_tokens": statistics.mean(tokens),
            "rest_overhead_s": rows[0]["median_s"] - rows[-1]["median_s"]}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=common.default_questions(), help="GSM8K-style JSONL to ask")
    p.add_argument("--requests", type=int, default=16, help="requests per measurement")
    p.add_argument("--workers", default="1,2", help="lfx serve worker counts to measure, comma-separated")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients in the throughput run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the server (OMP_NUM_THREADS) and the in-process peer; 0 = torch's default")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for lfx serve")
    args = p.parse_args()
    common.write_json("rest", run(args), not args.no_json)


if __name__ == "__main__":
    main()
