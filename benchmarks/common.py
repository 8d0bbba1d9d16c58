"""Shared helpers for the benchmark scripts: setup, timing, machine description, JSON results, tables.

Every script runs as a command, measures its peer in the same run (this machine's absolute speed drifts
while other jobs share it) and writes ``benchmarks/results/performance/<name>.json`` (committed: the published
figures are rendered from these files by ``report.py``). Setup (a table from a GSM8K-style
file plus a small trained selector) lives under a temporary ``OVERLAY_HOME`` with its own embedded Redis;
``--home DIR`` keeps and reuses it (``run_all.py`` passes one home to every script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PERFORMANCE = RESULTS / "performance"  # this suite's result files, committed
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
SAMPLE_TRAIN = ROOT / "examples" / "data" / "gsm8k_train_sample.jsonl"
SHARED_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
SAMPLE_TEST = ROOT / "examples" / "data" / "gsm8k_test_sample.jsonl"
DOMAIN = "bench"
LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # when the script started

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


def default_data() -> Path:
    """The full GSM8K train file next to the checkout when present, else the shipped sample."""
    return SHARED_TRAIN if SHARED_TRAIN.exists() else SAMPLE_TRAIN


def default_questions() -> Path:
    """The GSM8K test file next to the checkout when present, else the shipped test sample."""
    return SHARED_TEST if SHARED_TEST.exists() else SAMPLE_TEST


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data(), help="GSM8K-style JSONL (question, answer) to build from")
    p.add_argument("--home", type=Path, default=None,
                   help="OVERLAY_HOME to build in and reuse (kept); default: a temporary one, removed at the end")
    p.add_argument("--repeats", type=int, default=3, help="repeat each measurement this many times; medians are reported")
    p.add_argument("--no-json", action="store_true", help="print only, write no JSON under benchmarks/results/")
    return p


# --------------------------------------------------------------------------------------------- environment


@contextlib.contextmanager
def overlay_home(home: Path | None = None) -> Iterator[Path]:
    """Point OVERLAY_HOME at ``home`` (kept) or a fresh temporary folder (removed); stop its embedded Redis after."""
    from overlay import store

    temp = home is None
    path = Path(tempfile.mkdtemp(prefix="overlay-bench-")) if temp else Path(home).resolve()
    path.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(store.ENV_HOME)
    os.environ[store.ENV_HOME] = str(path)
    try:
        yield path
    finally:
        for db, client in list(store._embedded.items()):
            if db.startswith(str(path)):
                with contextlib.suppress(Exception):
                    client.shutdown()
                store._embedded.pop(db, None)
        if before is None:
            os.environ.pop(store.ENV_HOME, None)
        else:
            os.environ[store.ENV_HOME] = before
        if temp:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Setup:
    """What the decode-side benchmarks need: a client, the table, a trained selector and its tokenizer."""

    client: Any
    table: Any
    model: Any
    tokenizer: Any
    model_dir: Path
    home: Path
    info: dict


def setup_table(home: Path, data: Path, *, domain: str = DOMAIN, log: Callable[[str], None] = print):
    """(client, table): the table built from ``data`` in ``home``'s embedded Redis, reused when already built."""
    from overlay import store
    from overlay import table as tbl
    from overlay.pipeline import build_table_from_file

    marker = home / f"bench-table-{domain}.json"
    client = store.connect(None)
    source = str(Path(data).resolve())
    built = marker.exists() and json.loads(marker.read_text()).get("data") == source
    if not built or tbl.active_version(client, domain) is None:
        start = time.perf_counter()
        _, stats = build_table_from_file(client, data, "gsm8k", domain)
        log(f"table {domain} v{stats.version}: {stats.contexts} contexts, {stats.entries} entries "
            f"({time.perf_counter() - start:.1f} s)")
        marker.write_text(json.dumps({"data": source, "version": stats.version}))
        (home / f"bench-setup-{domain}.json").unlink(missing_ok=True)  # a model trained on the old table is stale
    return client, tbl.SemanticTable(client, domain)


def setup_overlay(home: Path, data: Path, *, domain: str = DOMAIN, model_chains: int = 1000, steps: int = 200,
                  n_layer: int = 2, n_embd: int = 128, n_head: int = 4, attn_span: int = 0,
                  log: Callable[[str], None] = print) -> Setup:
    """Build (or reuse) the table from ``data``, a token-level dataset of its first ``model_chains`` chains and a
    selector trained ``steps`` steps, all under ``home`` (its embedded Redis). Reuse needs the same settings.
    ``attn_span`` > 0 makes it an ALiBi selector with that span (dataset window = its receptive field)."""
    import torch

    from overlay import table as tbl
    from overlay.chains import load_chains
    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.selector import alibi_window, load_selector
    from overlay.train import TrainConfig, train

    settings = {"data": str(Path(data).resolve()), "domain": domain, "model_chains": model_chains, "steps": steps,
                "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head} | ({"attn_span": attn_span} if attn_span else {})
    name = f"{domain}-alibi{attn_span}" if attn_span else domain
    window = alibi_window(n_layer, attn_span) if attn_span else DatasetConfig().window
    marker = home / f"bench-setup-{name}.json"
    previous = json.loads(marker.read_text()) if marker.exists() else None
    client, table = setup_table(home, data, domain=domain, log=log)
    reuse = previous is not None and previous.get("settings") == settings and (home / "models" / name).is_dir()
    if not reuse:
        chains = load_chains(data, "gsm8k", limit=model_chains).chains
        start = time.perf_counter()
        build_dataset(table, table.tokenizer(), chains, home / "datasets" / name, DatasetConfig(window=window))
        threads = torch.get_num_threads()
        result = train(TrainConfig(data=str(home / "datasets" / name), out=str(home / "models" / name), steps=steps,
                                   batch_size=128, n_layer=n_layer, n_head=n_head, n_embd=n_embd, threads=1,
                                   arch="window" if attn_span else "qa", chains_per_batch=8,
                                   positions="alibi" if attn_span else "slot", attn_span=attn_span,
                                   eval_every=0, eval_rows=2000, save_every=0, warmup=min(100, steps // 5), device="cpu"),
                       progress=False)
        torch.set_num_threads(threads)
        log(f"selector {name} {n_layer}x{n_embd} trained {steps} steps on {model_chains} chains: eval accuracy "
            f"{result.eval_accuracy:.3f} ({time.perf_counter() - start:.1f} s with the dataset)")
        marker.write_text(json.dumps({"settings": settings, "version": table.version,
                                      "eval_accuracy": result.eval_accuracy}))
    table = tbl.SemanticTable(client, domain)
    model, tok = load_selector(home / "models" / name, device="cpu")
    info = json.loads(marker.read_text()) | {"table": table.info()}
    return Setup(client, table, model, tok, home / "models" / name, home, info)


# ---------------------------------------------------------------------------------------------------- timing


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p99, mean, min and count of a list of durations (same unit in, same unit out)."""
    return {"median": statistics.median(values) if values else float("nan"), "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else float("nan"), "min": min(values, default=float("nan")),
            "n": len(values)}


def best_rate(fn: Callable[[], int], repeats: int, min_seconds: float = 0.2) -> dict[str, float]:
    """Run ``fn`` (returns how many operations it did) repeatedly; per repeat, operations per second over at
    least ``min_seconds``. Returns the median and the max over repeats."""
    rates = []
    for _ in range(repeats):
        ops, start = 0, time.perf_counter()
        while True:
            ops += fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(ops / elapsed)
    return {"median": statistics.median(rates), "max": max(rates), "repeats": repeats}


# --------------------------------------------------------------------------------------------------- reports


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU, cores, load, memory, versions."""
    import redis
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    out = {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
           "torch": torch.__version__, "redis_py": redis.__version__, "platform": platform.platform(),
           "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "load_avg_1_5_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "load_avg_at_start": LOAD_AT_START,
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def command_line(argv: Sequence[str] = sys.argv) -> str:
    """The command that ran, as typed from the checkout: ``python`` + arguments, paths next to the checkout (the
    scripts, ``../shared/data/…``) relative to it."""
    args = [os.path.relpath(a, ROOT) if os.path.isabs(a) and Path(a).is_relative_to(ROOT.parent) else a for a in argv]
    return " ".join(["python", *args])


def versions() -> dict[str, str]:
    """The checkout's commit (``+changes`` when tracked files differ from it) and the versions of what the figures
    depend on."""
    import numpy
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10).stdout.strip()

    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = git("rev-parse", "--short", "HEAD")
        commit += "+changes" if commit and git("status", "--porcelain", "--untracked-files=no") else ""
    return {"commit": commit, "numpy": numpy.__version__, "transformers": transformers.__version__}


def write_json(name: str, payload: dict[str, Any], enabled: bool = True) -> Path | None:
    """Write ``payload`` with the command, the machine (load averages included), versions and the time to
    benchmarks/results/performance/<name>.json."""
    if not enabled:
        return None
    PERFORMANCE.mkdir(parents=True, exist_ok=True)
    path = PERFORMANCE / f"{name}.json"
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
           "machine": machine(), "versions": versions()} | payload
    path.write_text(json.dumps(doc, indent=2, default=_jsonable))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures (thousands grouped), the rest as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if value != value:
            return "–"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> str:
    """Render rows as a Markdown table (also readable in a terminal) and print it."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ([f"\n### {title}\n"] if title else []) + [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ] + ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
