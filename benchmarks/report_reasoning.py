"""Render the committed reasoning results (decoded chains: overlay, full-context peer, table only) as Markdown.

Each result file under ``benchmarks/results/reasoning/`` is the ``generation`` (or ``variants``) part of an
``overlay eval`` report with the command, machine and date that produced it; ``--into FILE`` rewrites the text
between ``<!-- reasoning:start -->`` and ``<!-- reasoning:end -->`` in FILE, so the published tables are script
output, never typed by hand.

    python benchmarks/report_reasoning.py --save runs/eval-gsm8k/eval.json --name gsm8k-test --command "overlay eval …"
    python benchmarks/report_reasoning.py --into README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

from overlay.generation import generation_markdown

RESULTS = Path(__file__).resolve().parent / "results" / "reasoning"
START, END = "<!-- reasoning:start -->", "<!-- reasoning:end -->"
PARTS = {"generation": "", "variants": " — held-out variants"}


def machine() -> str:
    """CPU model, core count and Python version of this machine."""
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), "") if cpuinfo.exists() else ""
    return f"{model or platform.machine()}, {os.cpu_count()} cores, CPU only, Python {platform.python_version()}"


def save(report: Path, name: str, command: str) -> Path:
    """Keep the decoded-chain measures of an eval report (no examples) with how they were made."""
    data = json.loads(report.read_text())
    out = {"name": name, "command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    for part in PARTS:
        if part in data:
            out[part] = {k: ({m: v for m, v in val.items() if m != "examples"} if isinstance(val, dict) else val)
                         for k, val in data[part].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def render() -> str:
    """Every committed result as Markdown tables, each with its command."""
    blocks = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for part, suffix in PARTS.items():
            if part in data:
                adapter = data[part].get("adapter")
                title = f"{data['name']}{suffix}" + (f" (adapter {adapter})" if adapter else "")
                blocks.append(generation_markdown(data[part], title).replace("\n## ", "\n#### ", 1))
        blocks.append(f"\n`{data['command']}` — {data['machine']}, {data['date']} ([{path.name}]"
                      f"(benchmarks/results/reasoning/{path.name}))\n")
    return "".join(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--save", type=Path, help="An eval.json to keep as a committed result.")
    ap.add_argument("--name", help="Result name (file name) for --save.")
    ap.add_argument("--command", default="", help="The command that produced --save's report.")
    ap.add_argument("--into", type=Path, help="Rewrite the marked section of this Markdown file.")
    args = ap.parse_args()
    if args.save:
        print(save(args.save, args.name or args.save.parent.name, args.command))
    text = render()
    if args.into:
        doc = args.into.read_text()
        if START not in doc or END not in doc:
            raise SystemExit(f"{args.into} has no {START} … {END} section")
        args.into.write_text(re.sub(f"{re.escape(START)}.*?{re.escape(END)}", lambda _: f"{START}\n{text}\n{END}",
                                    doc, flags=re.S))
    else:
        print(text)


if __name__ == "__main__":
    main()
