"""Render the committed reasoning results as Markdown: decoded chains (overlay, full-context peer, table only, track only),
stellator data statistics and self-improvement rounds.

Under ``benchmarks/results/``: ``reasoning/*.json`` holds the ``generation`` (and ``variants`` / ``vote``) part of
an ``overlay eval`` report, ``stellator/*.json`` an ``overlay dataset variants`` stats.json, ``improve/*.json`` an
``overlay improve`` state.json; each with the command, machine and date that produced it. ``--into FILE`` rewrites
the text between ``<!-- reasoning:start -->`` and ``<!-- reasoning:end -->`` in FILE with one summary table;
``--full FILE`` writes every table with its command. The published figures are script output, never typed by hand.

    python benchmarks/report_reasoning.py --save runs/eval-gsm8k/eval.json --name gsm8k-test --command "overlay eval …"
    python benchmarks/report_reasoning.py --save-stellator runs/stellator/stats.json --name gsm8k-train --command "…"
    python benchmarks/report_reasoning.py --save-improve runs/improve/state.json --name gsm8k --command "…"
    python benchmarks/report_reasoning.py --into README.md --full docs/reasoning.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import report
from overlay.generation import generation_markdown

ROOT = Path(__file__).resolve().parent / "results"
RESULTS, STELLATOR, IMPROVE = ROOT / "reasoning", ROOT / "stellator", ROOT / "improve"
START, END = "<!-- reasoning:start -->", "<!-- reasoning:end -->"
PARTS = {"generation": "", "variants": " — held-out variants"}


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def _stamp(name: str, command: str) -> dict[str, Any]:
    """How a result was made, written by the code: the command, the commit (and whether tracked files had changes),
    the machine with its load, the library versions, and the models the command names (--model, --peer)."""
    machine = common.machine()
    return {"name": name, "command": command, "date": time.strftime("%Y-%m-%d"), "machine": report.machine_line(machine),
            "commit": _git("rev-parse", "HEAD"), "tree_clean": not _git("status", "--porcelain", "--untracked-files=no"),
            "load_avg": machine.get("load_avg_at_start"), "versions": common.versions(), "models": _models(command)}


def _models(command: str) -> dict[str, Any]:
    """Configuration, size and training of each model folder the command names (what its train_result.json says)."""
    words, out = shlex.split(command.split("#")[0]), {}
    for flag in ("--model", "--peer"):
        if flag not in words[:-1]:
            continue
        folder = Path(words[words.index(flag) + 1])
        info: dict[str, Any] = {"path": str(folder)}
        for file, keys in (("config.json", None), ("train_result.json", ("step", "params", "rows_train", "eval_accuracy",
                                                                          "seconds", "device"))):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads((folder / file).read_text())
                info |= {k: doc[k] for k in (keys or ("model_type", "n_layer", "n_head", "n_embd", "n_positions",
                                                      "vocab_size", "tokenizer_hash")) if k in doc}
        out[flag.strip("-")] = info
    return out


def _write(folder: Path, name: str, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def save(report: Path, name: str, command: str) -> Path:
    """Keep the decoded-chain measures of an eval report (no examples) with how they were made."""
    data = json.loads(report.read_text())
    out: dict[str, Any] = _stamp(name, command) | {k: data[k] for k in ("table", "tokenizer_hash") if k in data}
    for part in PARTS:
        if part in data:
            out[part] = {k: ({m: v for m, v in val.items() if m != "examples"} if isinstance(val, dict) else val)
                         for k, val in data[part].items()}
    return _write(RESULTS, name, out)


def save_stellator(stats: Path, name: str, command: str) -> Path:
    """Keep an ``overlay dataset variants`` stats.json (without the list of chains that failed, which must be empty)."""
    data = json.loads(stats.read_text())
    return _write(STELLATOR, name, _stamp(name, command) | {k: v for k, v in data.items() if k != "not_verified"}
                  | {"not_verified": len(data.get("not_verified", []))})


def save_improve(state: Path, name: str, command: str) -> Path:
    """Keep an ``overlay improve`` state.json: the baseline and each round's figures."""
    data = json.loads(state.read_text())
    return _write(IMPROVE, name, _stamp(name, command) | {k: data[k] for k in ("config", "baseline", "rounds") if k in data})


def _link(path: Path) -> str:
    """A result file's path from the repository root."""
    return f"benchmarks/results/{path.parent.name}/{path.name}"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "–" if value is None else str(value)


def _source(path: Path, data: dict[str, Any], where: str) -> str:
    return (f"\n`{data['command']}` — {data['machine']}, {data['date']} "
            f"([{path.name}]({where}/{_link(path)}))\n")


def _chosen(vote: dict[str, Any] | None) -> list[Any]:
    """Chains per question, vote@N, verifier best-of-N and pass@N of a result's answer choice (None where absent; a
    result saved before the plain vote was kept apart has only the chosen answer, which was the vote's)."""
    if not vote:
        return [None] * 4
    return [vote["samples"], vote.get("vote_exact_match", vote["exact_match"]), vote.get("verifier_exact_match"),
            vote.get("pass_at_n")]


def summary() -> str:
    """One row per decoded-chain result: exact-match of each method, well-formed chains, consistent checks and, where
    N chains were decoded per question, the plain vote, verifier best-of-N and pass@N over them."""
    rows = ["| result | questions | exact-match: overlay | peer | table only | track only | well-formed (overlay) "
            "| checks consistent | chains N | vote@N | verifier best-of-N | pass@N |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for part, suffix in PARTS.items():
            gen = data.get(part)
            if not gen:
                continue
            adapter = f" (adapter {gen['adapter']})" if gen.get("adapter") else ""
            cells = [f"[{data['name']}{suffix}{adapter}]({_link(path)})", gen["questions"],
                     gen["overlay"]["exact_match"], gen.get("peer", {}).get("exact_match"),
                     gen.get("table_only", {}).get("exact_match"), gen.get("track_only", {}).get("exact_match"),
                     gen["overlay"]["well_formed"],
                     gen["overlay"]["checks_passed"], *_chosen(gen.get("vote"))]
            rows.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for path in sorted(IMPROVE.glob("*.json")):
        data = json.loads(path.read_text())
        first, last = data.get("baseline", {}).get("test", {}), (data["rounds"][-1].get("test", {}) if data["rounds"] else {})
        if first and last:
            rows.append(f"| [improve {data['name']}: before → after {len(data['rounds'])} rounds]"
                        f"({_link(path)}) | {last['questions']} | "
                        f"{_fmt(first['exact_match'])} → {_fmt(last['exact_match'])} | – | – | – | "
                        f"{_fmt(first['well_formed'])} → {_fmt(last['well_formed'])} | "
                        f"{_fmt(first['checks_passed'])} → {_fmt(last['checks_passed'])} | – | – | – | – |")
    return "\n".join(rows) + "\n"


def stellator_markdown(path: Path, where: str) -> str:
    """The statistics of one stellator data set."""
    d = json.loads(path.read_text())
    cfg = d["config"]
    lines = [f"\n### Stellator data {d['name']} ({d['variants_per_chain']} variants per chain)\n",
             "| measure | value |", "|---|---|",
             f"| chains | {d['chains']} |", f"| became tracks | {d['tracks']} |",
             f"| produced variants | {d['chains_with_variants']} |", f"| variants | {d['variants']} |",
             f"| training chains (sources + variants) / held out | {d['train_chains']} / {d['heldout_chains']} |",
             f"| kept chains that verify | {d['verified']} of {d['train_chains'] + d['heldout_chains']} |",
             f"| settings | {cfg['variants']} variants, {cfg['heldout']} held out, variability {cfg['variability']}, "
             f"volatility {cfg['volatility']}, edits {cfg['edits']} |"]
    lines += ["", "| chains skipped (reason) | count |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in d["chains_skipped"].items()] or ["| none | 0 |"]
    lines += ["", "| variant draws skipped (reason) | count |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in d["draws_skipped"].items()] or ["| none | 0 |"]
    lines += ["", "| edits in kept variants | count |", "|---|---|"] + [f"| {e} | {n} |" for e, n in d["edits"].items()]
    return "\n".join(lines) + "\n" + _source(path, d, where)


def improve_markdown(path: Path, where: str) -> str:
    """Each self-improvement round: solve rate, kept chains, table version, test and live-learning figures."""
    d = json.loads(path.read_text())
    lines = [f"\n### Self-improvement {d['name']}\n", "| round | training questions solved | chains kept (so far) | "
             "table version | test exact-match | test well-formed | live: variants before → after |",
             "|---|---|---|---|---|---|---|"]
    base = d.get("baseline")
    if base:
        lines.append(f"| before | – | – | v{base['table_version']} | {_fmt(base['test']['exact_match'])} | "
                     f"{_fmt(base['test']['well_formed'])} | – |")
    for r in d["rounds"]:
        live = r.get("live", {})
        live_cell = (f"{_fmt(live['before']['exact_match'])} → {_fmt(live['after']['exact_match'])} "
                     f"({live['variants']} variants)") if live else "–"
        test = r.get("test", {})
        lines.append(f"| {r['round']} | {_fmt(r['solved'])} of {r['questions']} | {r['kept_chains']} ({r['kept_so_far']}) "
                     f"| v{r['table_version']} | {_fmt(test.get('exact_match'))} | {_fmt(test.get('well_formed'))} "
                     f"| {live_cell} |")
    cfg = d["config"]
    lines.append(f"\nSettings: {cfg['samples']} chains per question (temperature {cfg['temperature']}), "
                 f"{cfg['steps']} training steps per round, replay {cfg['replay']}.")
    return "\n".join(lines) + "\n" + _source(path, d, where)


def full(where: str) -> str:
    """Every committed result as Markdown tables, each with its command; links relative to ``where``."""
    blocks = ["\n## Decoded chains\n"]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for part, suffix in PARTS.items():
            if part in data:
                adapter = data[part].get("adapter")
                title = f"{data['name']}{suffix}" + (f" (adapter {adapter})" if adapter else "")
                blocks.append(generation_markdown(data[part], title).replace("\n## ", "\n### ", 1))
        blocks.append(_source(path, data, where))
    if any(STELLATOR.glob("*.json")):
        blocks.append("\n## Stellator data\n")
        blocks += [stellator_markdown(p, where) for p in sorted(STELLATOR.glob("*.json"))]
    if any(IMPROVE.glob("*.json")):
        blocks.append("\n## Self-improvement rounds\n")
        blocks += [improve_markdown(p, where) for p in sorted(IMPROVE.glob("*.json"))]
    return "".join(blocks)


def _replace(path: Path, text: str) -> None:
    path.write_text(report.splice(path.read_text(), text, START, END))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--save", type=Path, help="An eval.json to keep as a committed result.")
    ap.add_argument("--save-stellator", type=Path, help="A stats.json of overlay dataset variants to keep.")
    ap.add_argument("--save-improve", type=Path, help="A state.json of overlay improve to keep.")
    ap.add_argument("--name", help="Result name (file name) for --save*.")
    ap.add_argument("--command", default="", help="The command that produced the saved file.")
    ap.add_argument("--into", type=Path, help="Rewrite the marked section of this Markdown file with the summary.")
    ap.add_argument("--full", type=Path, help="Rewrite the marked section of this Markdown file with every table.")
    args = ap.parse_args()
    for option, saver in ((args.save, save), (args.save_stellator, save_stellator), (args.save_improve, save_improve)):
        if option:
            print(saver(option, args.name or option.parent.name, args.command))
    if args.into:
        _replace(args.into, summary())
    if args.full:
        up = os.path.relpath(ROOT.parent.parent, args.full.resolve().parent)
        _replace(args.full, full(up))
    if not (args.into or args.full):
        print(summary() + full("."))


if __name__ == "__main__":
    main()
