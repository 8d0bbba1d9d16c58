"""Render the committed track-probe results as docs/probe.md's results section and its two figures.

Each file under ``benchmarks/results/probe/`` keeps one ``overlay probe tracks`` report: its aggregates (every
setting, per-model entry rates, followed steps, divergences, layer similarity, anchor attention; not the
per-continuation entries) and the numbers behind its first example figure, with the commands, commit, machine and
date that produced it. ``--into FILE`` rewrites the text between ``<!-- probe:start -->`` and ``<!-- probe:end -->``
in FILE and draws the figures next to it, so the published tables and figures are script output, never typed by
hand.

    python benchmarks/report_probe.py --save RUN/report --name sample --command "overlay probe library …" …
    python benchmarks/report_probe.py --into docs/probe.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import common
from report import splice

from overlay.probe import example_figure, markdown, summary_figure

RESULTS = common.RESULTS / "probe"
START, END = "<!-- probe:start -->", "<!-- probe:end -->"


def commit() -> str:
    """The checkout's commit (with ``+changes`` when the tree differs from it), or "" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=common.ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+changes" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def save(report: Path, name: str, commands: list[str], source_commit: str | None = None,
         folder: Path = RESULTS) -> Path:
    """Keep a probe report's aggregates and first example (no per-continuation entries) with how they were made."""
    data = json.loads((report / "probe.json").read_text())
    example = json.loads((report / data["examples"][0]["json"]).read_text()) if data["examples"] else None
    out = {"name": name, "commands": commands, "commit": source_commit or commit(), "date": time.strftime("%Y-%m-%d"),
           "machine": common.machine(), "probe": {k: v for k, v in data.items() if k not in ("entries", "examples")},
           "example": example}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def figure_names(name: str) -> tuple[str, str]:
    """File names of a result's summary and example figures (next to the document)."""
    return f"probe_{name}_summary.png", f"probe_{name}_example.png"


def section(data: dict[str, Any], path: Path) -> str:
    """One result as Markdown: how it was made, the probe's tables, its figures."""
    probe, m = data["probe"], data["machine"]
    summary_png, example_png = figure_names(data["name"])
    commands = "\n".join(data["commands"])
    tables = markdown(probe).replace("\n## ", "\n#### ").replace("# Track probe\n\n", "", 1)
    lines = [f"### {data['name']}\n", f"```bash\n{commands}\n```\n",
             f"Commit {data['commit']}, {data['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
             f"([{path.name}](../benchmarks/results/probe/{path.name})).\n", tables,
             f"![summary]({summary_png})\n"]
    ex = data["example"]
    if ex is not None:
        verdicts = "; ".join(f"{n}: {'entered' if v['entered'] else 'left'} after {v['followed_steps']} step(s)"
                             for n, v in ex["models"].items())
        lines += [f"![example]({example_png})\n",
                  f"Example: track {ex['track']}, variant {ex['variant']} (edits: {'; '.join(ex['edits']) or 'none'}), "
                  f"prefix = question + {ex['prefix_steps']} step(s); {verdicts}.\n"]
    return "\n".join(lines)


def render(folder: Path = RESULTS) -> str:
    """Every committed probe result as Markdown, each with its commands."""
    return "\n".join(section(json.loads(p.read_text()), p) for p in sorted(folder.glob("*.json")))


def draw(folder: Path, into: Path) -> list[Path]:
    """Draw every committed result's summary and example figures from its JSON into ``into``."""
    paths = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        summary_png, example_png = figure_names(data["name"])
        paths.append(summary_figure(data["probe"], into / summary_png))
        if data["example"] is not None:
            paths.append(example_figure(data["example"], into / example_png))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--save", type=Path, help="The report folder of `overlay probe tracks` to keep.")
    ap.add_argument("--name", help="Result name (file name) for --save.")
    ap.add_argument("--command", action="append", default=[], help="A command that produced --save (repeat, in order).")
    ap.add_argument("--commit", help="The commit the commands ran at (default: this checkout's).")
    ap.add_argument("--results", type=Path, default=RESULTS, help="Folder of committed probe results.")
    ap.add_argument("--into", type=Path, help="Rewrite this Markdown file's marked section; figures go beside it.")
    args = ap.parse_args()
    if args.save:
        print(save(args.save, args.name or args.save.name, args.command, args.commit, args.results))
    text = render(args.results)
    if args.into is None:
        print(text)
        return
    args.into.write_text(splice(args.into.read_text(), text, START, END))
    for path in draw(args.results, args.into.parent):
        print(f"wrote {path}")
    print(f"wrote {args.into}")


if __name__ == "__main__":
    main()
