"""Chains decoded end to end, measured: the overlay, the same-size full-context peer and the table alone, on the
same questions in one run (exact-match, well-formed, tool use, checks, tokens, stop reasons, distinct chains)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from overlay.chains import ANSWER, EOS, Q, RESULT, Chain, answers_match
from overlay.roles import execute, question_numbers
from overlay.tracks import TrackMemory, open_tracks
from overlay.decode import DecodeConfig, DecodeResult, OverlayDecoder
from overlay.vote import VoteResult, check_samples, decode_voted, same_answer, sample_settings

MEASURES = ("exact_match", "well_formed", "actions_executed", "checks_passed", "distinct_continuations",
            "mean_tokens", "ms_per_token")
METHOD_NAMES = {"overlay": "overlay (question-aware selector)", "peer": "full-context peer (GPT-2)",
                "table_only": "table only", "track_only": "track only (the chooser's track, calculator, no selector)"}


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


def vote_all(decoder: OverlayDecoder, questions: Sequence[str], greedy: Sequence[DecodeResult], samples: int,
             progress: bool = True) -> list[VoteResult]:
    """Vote over ``samples`` chains per question, the greedy chain already decoded being chain 0."""
    bar = tqdm(total=len(questions), desc="vote", unit="q", disable=not progress or None)
    votes = []
    for question, first in zip(questions, greedy):
        votes.append(decode_voted(decoder, question, samples, first=first)[1])
        bar.update(1)
    bar.close()
    return votes


def vote_measures(votes: Sequence[VoteResult], greedy: Sequence[DecodeResult],
                  answers: Sequence[str]) -> dict[str, Any]:
    """The vote beside greedy decoding: exact-match of each, how often the vote changed the greedy answer, how many
    sampled chains passed their checks, how many questions had one that did, and the rule used per question."""
    n = max(1, len(votes))
    return {
        "samples": votes[0].samples if votes else 0,
        "exact_match": sum(answers_match(v.answer, a) for v, a in zip(votes, answers)) / n,
        "greedy_exact_match": sum(answers_match(g.answer, a) for g, a in zip(greedy, answers)) / n,
        "changed": sum(not same_answer(v.answer, g.answer) for v, g in zip(votes, greedy)) / n,
        "chains_passed": sum(v.passed for v in votes) / max(1, sum(v.samples for v in votes)),
        "questions_passed": sum(v.rule == "checks" for v in votes) / n,
        "rules": dict(Counter(v.rule for v in votes)),
    }


def verification_success(table, model, tokenizer, chains: Sequence[Chain], config: DecodeConfig | None = None,
                         peer=None, progress: bool = False, keep: int = 0, adapter: str = "",
                         samples: int = 1) -> dict[str, Any]:
    """Decode the chains' questions with the overlay (with ``adapter`` when given), the peer (when given) and the
    table alone; report the measures of each, measured in the same run, and the first ``keep`` results of each.
    With ``samples`` > 1, also vote over that many overlay chains per question (``vote``, beside greedy)."""
    check_samples(samples)
    out: dict[str, Any] = {"questions": len(chains), "adapter": adapter or None}
    memory = open_tracks(table)
    methods = {"overlay": model, "peer": peer, "table_only": None, "track_only": memory}
    for name, m in methods.items():
        if m is None and name not in ("table_only", "track_only") or name == "track_only" and memory is None:
            continue
        start = time.perf_counter()
        if name == "track_only":
            results = [track_only(memory, c.question) for c in chains]
        else:
            decoder = OverlayDecoder(table, m, tokenizer, config, adapter=adapter if name == "overlay" else "",
                                     tracks=memory if name == "overlay" else None)
            results = decode_all(decoder, [c.question for c in chains], desc=name, progress=progress)
        out[name] = measures(results, [c.answer for c in chains]) | {"seconds": time.perf_counter() - start}
        if keep:
            out[name]["examples"] = [r.to_dict() | {"expected": c.answer} for r, c in zip(results[:keep], chains)]
        if name == "overlay" and samples > 1:
            start = time.perf_counter()
            votes = vote_all(decoder, [c.question for c in chains], results, samples, progress)
            temperature, top_p, _ = sample_settings(decoder.config, samples)[1]
            out["vote"] = vote_measures(votes, results, [c.answer for c in chains]) | {
                "temperature": temperature, "top_p": top_p, "seconds": time.perf_counter() - start}
            if keep:
                out["vote"]["examples"] = [v.to_dict() | {"chain": v.chain.text, "expected": c.answer}
                                           for v, c in zip(votes[:keep], chains)]
    return out


def track_only(memory: TrackMemory, question: str) -> DecodeResult:
    """The track-only baseline: the chooser's track (of the top ``TOP_K``) followed with this question's numbers and
    the calculator, no selector and no table; a refused question (or a track that cannot be followed) gives no answer."""
    start = time.perf_counter()
    best, _ = memory.choose(question)
    found = [best] if best is not None else []
    steps = execute(found[0].track.chain, found[0].binding, question_numbers(question))[1] if found else []
    answer = steps[-1][1] if steps and steps[-1][0] == ANSWER else None
    text = f"{Q} {' '.join(question.split())} " + "".join(f"{tag} {body} " for tag, body in steps) + (EOS if answer else "")
    calls = [{"ok": True} for tag, _ in steps if tag == RESULT]
    return DecodeResult(question, text.strip(), answer, "answer" if answer is not None else "no_track",
                        [{"tag": t, "text": b} for t, b in steps], [], calls, [], {}, 0, time.perf_counter() - start,
                        tracks=[found[0].to_dict()] if found else [])


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
    if "vote" in gen:
        lines += vote_markdown(gen["vote"])
    return "\n".join(lines) + "\n"


def vote_markdown(vote: dict[str, Any]) -> list[str]:
    """The vote's measures beside greedy decoding, as Markdown lines."""
    rows = {"exact_match, greedy": vote["greedy_exact_match"], "exact_match, vote": vote["exact_match"],
            "vote changed the greedy answer": vote["changed"], "chains passing their checks": vote["chains_passed"],
            "questions with a passing chain": vote["questions_passed"]}
    rules = ", ".join(f"{k} {v}" for k, v in sorted(vote["rules"].items()))
    return [f"\n### Answer voting ({vote['samples']} overlay chains per question: chain 0 as decoded above, the others "
            f"at temperature {vote['temperature']:g}, top-p {vote['top_p']:g})\n", "| measure | value |", "|---|---|",
            *(f"| {name} | {value:.3f} |" for name, value in rows.items()), f"| rule used (questions) | {rules} |"]


def heldout_variants(train_file: str, tracks: int, seed: int = 0) -> list[Chain]:
    """Held-out variants of the first ``tracks`` training records (the track probe's split: numbers and names
    changed, results recomputed; never trained): a question the model has seen the shape of, with new numbers."""
    from overlay.variants import HELDOUT_VARIANTS, generate_variants, library_from_gsm8k

    library = library_from_gsm8k(train_file, limit=tracks)
    return [v.chain for v in generate_variants(library, replace(HELDOUT_VARIANTS, seed=seed)).heldout]
