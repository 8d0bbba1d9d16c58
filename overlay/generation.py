"""Chains decoded end to end, measured: the overlay, the same-size full-context peer and the table alone, on the
same questions in one run (exact-match, well-formed, tool use, checks, tokens, stop reasons, distinct chains)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from overlay.chains import Chain, answers_match
from overlay.decode import DecodeConfig, DecodeResult, OverlayDecoder

MEASURES = ("exact_match", "well_formed", "actions_executed", "checks_passed", "distinct_continuations",
            "mean_tokens", "ms_per_token")
METHOD_NAMES = {"overlay": "overlay (question-aware selector)", "peer": "full-context peer (GPT-2)",
                "table_only": "table only"}


def continuation(result: DecodeResult) -> str:
    """The chain text after the question (what must differ between questions)."""
    return result.text.split(result.question, 1)[-1].strip() if result.question else result.text


def measures(results: Sequence[DecodeResult], answers: Sequence[str]) -> dict[str, Any]:
    """Generation measures over decoded chains and their gold answers."""
    n = max(1, len(results))
    calls = [c for r in results for c in r.tool_calls]
    verdicts = [v for r in results for v in r.verdicts]
    tokens = sum(r.tokens for r in results)
    return {
        "questions": len(results),
        "exact_match": sum(answers_match(r.answer, a) for r, a in zip(results, answers)) / n,
        "well_formed": sum(r.well_formed for r in results) / n,
        "actions": len(calls),
        "actions_executed": sum(c["ok"] for c in calls) / max(1, len(calls)),
        "checks": len(verdicts),
        "checks_passed": sum(v["verdict"] == "pass" for v in verdicts) / max(1, len(verdicts)),
        "distinct_continuations": len({continuation(r) for r in results}) / n,
        "mean_tokens": tokens / n,
        "ms_per_token": 1000 * sum(r.seconds for r in results) / max(1, tokens),
        "stop_reasons": dict(Counter(r.stop_reason for r in results)),
    }


def decode_all(decoder: OverlayDecoder, questions: Sequence[str], chunk: int = 32, desc: str = "decode",
               progress: bool = True) -> list[DecodeResult]:
    """Decode every question, ``chunk`` chains at a time (one lookup round trip per token position per chunk)."""
    out: list[DecodeResult] = []
    bar = tqdm(total=len(questions), desc=desc, unit="q", disable=not progress or None)
    for start in range(0, len(questions), chunk):
        out += decoder.generate_batch(list(questions[start:start + chunk]))
        bar.update(min(chunk, len(questions) - start))
    bar.close()
    return out


def verification_success(table, model, tokenizer, chains: Sequence[Chain], config: DecodeConfig | None = None,
                         peer=None, progress: bool = False, keep: int = 0, adapter: str = "") -> dict[str, Any]:
    """Decode the chains' questions with the overlay (with ``adapter`` when given), the peer (when given) and the
    table alone; report the measures of each, measured in the same run, and the first ``keep`` results of each."""
    out: dict[str, Any] = {"questions": len(chains), "adapter": adapter or None}
    methods = {"overlay": model, "peer": peer, "table_only": None}
    for name, m in methods.items():
        if m is None and name != "table_only":
            continue
        decoder = OverlayDecoder(table, m, tokenizer, config, adapter=adapter if name == "overlay" else "")
        start = time.perf_counter()
        results = decode_all(decoder, [c.question for c in chains], desc=name, progress=progress)
        out[name] = measures(results, [c.answer for c in chains]) | {"seconds": time.perf_counter() - start}
        if keep:
            out[name]["examples"] = [r.to_dict() | {"expected": c.answer} for r, c in zip(results[:keep], chains)]
    return out


def generation_markdown(gen: dict[str, Any], title: str = "Chains decoded end to end") -> str:
    """The measures of each method side by side, then the stop reasons, as Markdown."""
    methods = [m for m in METHOD_NAMES if m in gen]
    lines = [f"\n## {title} ({gen['questions']} questions)\n", "| measure | " + " | ".join(METHOD_NAMES[m] for m in methods)
             + " |", "|---|" + "---|" * len(methods)]
    for measure in MEASURES:
        fmt = "{:.1f}" if measure in ("mean_tokens", "ms_per_token") else "{:.3f}"
        lines.append(f"| {measure} | " + " | ".join(fmt.format(gen[m][measure]) for m in methods) + " |")
    lines.append("| stop reasons | " + " | ".join(
        ", ".join(f"{k} {v}" for k, v in sorted(gen[m]["stop_reasons"].items())) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def heldout_variants(train_file: str, tracks: int, seed: int = 0) -> list[Chain]:
    """Held-out variants of the first ``tracks`` training records (the track probe's split: numbers and names
    changed, results recomputed; never trained): a question the model has seen the shape of, with new numbers."""
    from overlay.probe import VariantConfig, generate_variants, library_from_gsm8k

    library = library_from_gsm8k(train_file, limit=tracks)
    return [v.chain for v in generate_variants(library, VariantConfig(edits="numbers,names", seed=seed)).heldout]
