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
from overlay.vote import VoteResult, check_choice, check_samples, decode_voted, same_answer, sample_settings, vote
from overlay.verifier import Verifier, auc

MEASURES = ("exact_match", "well_formed", "actions_executed", "checks_passed", "distinct_continuations",
            "mean_tokens", "ms_per_token", "ms_per_question")
LABELS = {"checks_passed": "checks consistent (CHECKs restate their own arithmetic)"}
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
        "ms_per_token": 1000 * sum(r.seconds for r in results) / tokens if tokens else None,  # None: no token decoded
        "ms_per_question": 1000 * sum(r.seconds for r in results) / n,
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
             progress: bool = True, verifier: Verifier | None = None, choose: str = "vote") -> list[VoteResult]:
    """Vote over ``samples`` chains per question, the greedy chain already decoded being chain 0 (scored by the
    verifier when given, the answer chosen as ``choose`` says)."""
    bar = tqdm(total=len(questions), desc="vote", unit="q", disable=not progress or None)
    votes = []
    for question, first in zip(questions, greedy):
        votes.append(decode_voted(decoder, question, samples, first=first, verifier=verifier, choose=choose)[1])
        bar.update(1)
    bar.close()
    return votes


def prefix_sizes(samples: int) -> list[int]:
    """The smaller sample counts reported inside an N-chain evaluation: 1, 2, 4, 8, ... below N."""
    return [k for k in (2 ** j for j in range(samples.bit_length())) if k < samples]


def vote_measures(votes: Sequence[VoteResult], greedy: Sequence[DecodeResult],
                  answers: Sequence[str], verifier: Verifier | None = None) -> dict[str, Any]:
    """The chosen answers beside greedy decoding: exact-match of the choice made, of greedy, of the plain vote and
    (when a verifier scored the chains) of verifier best-of-N and the verifier-weighted vote over the same chains;
    pass@N (any chain right: what a perfect chooser would get); how often the choice changed the greedy answer; how
    many chains had consistent checks and how many the verifier accepted; its ranking of the chains (AUC).

    ``prefixes`` gives pass@k, vote@k and (with ``verifier``, which rescores the k chains among themselves) verifier
    best-of-k and verifier-weighted vote@k over the first k chains, for k = 1, 2, 4, ... below N: chain i has the
    same seed whatever N is, so these are what ``--samples k`` decodes, without decoding again."""
    n = max(1, len(votes))

    def right(chosen: Sequence[str | None]) -> float:
        return sum(answers_match(c, a) for c, a in zip(chosen, answers)) / n

    out = {
        "samples": votes[0].samples if votes else 0,
        "exact_match": right([v.answer for v in votes]),
        "greedy_exact_match": right([g.answer for g in greedy]),
        "vote_exact_match": right([vote(v.results).answer for v in votes]),
        "pass_at_n": sum(any(answers_match(r.answer, a) for r in v.results) for v, a in zip(votes, answers)) / n,
        "changed": sum(not same_answer(v.answer, g.answer) for v, g in zip(votes, greedy)) / n,
        "chains_passed": sum(v.passed for v in votes) / max(1, sum(v.samples for v in votes)),
        "questions_passed": sum(v.passed > 0 for v in votes) / n,
        "rules": dict(Counter(v.rule for v in votes)),
    }
    if votes and votes[0].verifier:
        labels = [answers_match(r.answer, a) for v, a in zip(votes, answers) for r in v.results]
        checks = [r.trace["check"]["verified"] for v in votes for r in v.results]
        out |= {"verifier_exact_match": right([vote(v.results, None, v.verifier, "verifier").answer for v in votes]),
                "verifier_vote_exact_match": right([vote(v.results, None, v.verifier, "verifier-vote").answer
                                                    for v in votes]),
                "verifier_auc": auc([p for v in votes for p in v.verifier], labels),
                "chains_verified": sum(checks) / max(1, len(checks)),
                "verified_right": sum(c and y for c, y in zip(checks, labels)) / max(1, sum(checks))}
    prefixes = []
    for k in prefix_sizes(min((v.samples for v in votes), default=0)):
        heads = [v.results[:k] for v in votes]
        row = {"chains": k, "pass": sum(any(answers_match(r.answer, a) for r in h) for h, a in zip(heads, answers)) / n,
               "vote": right([vote(h).answer for h in heads])}
        if verifier is not None:
            scores = [verifier.score_group(h) for h in heads]
            row |= {"verifier": right([vote(h, None, s, "verifier").answer for h, s in zip(heads, scores)]),
                    "verifier_vote": right([vote(h, None, s, "verifier-vote").answer for h, s in zip(heads, scores)])}
        prefixes.append(row)
    if prefixes:
        out["prefixes"] = prefixes
    return out


def verification_success(table, model, tokenizer, chains: Sequence[Chain], config: DecodeConfig | None = None,
                         peer=None, progress: bool = False, keep: int = 0, adapter: str = "",
                         samples: int = 1, verifier: Verifier | None = None, choose: str = "vote") -> dict[str, Any]:
    """Decode the chains' questions with the overlay (with ``adapter`` when given), the peer (when given) and the
    table alone; report the measures of each, measured in the same run, and the first ``keep`` results of each.
    With ``samples`` > 1, also decode that many overlay chains per question and choose an answer (``vote``: as
    ``choose`` says, scored by ``verifier`` when given), reported beside greedy with pass@N."""
    check_samples(samples)
    check_choice(choose, verifier)
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
            votes = vote_all(decoder, [c.question for c in chains], results, samples, progress, verifier, choose)
            temperature, top_p, _ = sample_settings(decoder.config, samples)[1]
            out["vote"] = vote_measures(votes, results, [c.answer for c in chains], verifier) | {
                "choose": choose, "temperature": temperature, "top_p": top_p, "seconds": time.perf_counter() - start}
            if verifier is not None:
                out["vote"]["verifier_ms_per_chain"] = verifier_cost(verifier, votes)
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
        fmt = "{:.1f}" if measure in ("mean_tokens", "ms_per_token", "ms_per_question") else "{:.3f}"
        cells = [fmt.format(gen[m][measure]) if gen[m].get(measure) is not None else "–" for m in methods]
        lines.append(f"| {LABELS.get(measure, measure)} | " + " | ".join(cells) + " |")
    lines.append("| stop reasons | " + " | ".join(
        ", ".join(f"{k} {v}" for k, v in sorted(gen[m]["stop_reasons"].items())) for m in methods) + " |")
    if "vote" in gen:
        lines += vote_markdown(gen["vote"])
    return "\n".join(lines) + "\n"


def verifier_cost(verifier: Verifier, votes: Sequence[VoteResult]) -> float:
    """Milliseconds the verifier takes to score one chain among its question's others (measured again here)."""
    start = time.perf_counter()
    for v in votes:
        verifier.score_group(v.results)
    return 1000 * (time.perf_counter() - start) / max(1, sum(v.samples for v in votes))


def vote_markdown(vote: dict[str, Any]) -> list[str]:
    """The chosen answers' measures beside greedy decoding and pass@N, as Markdown lines."""
    n = vote["samples"]
    rows = {"exact_match, greedy (pass@1)": vote["greedy_exact_match"],
            f"exact_match, vote@{n}": vote.get("vote_exact_match", vote["exact_match"])}
    if "verifier_exact_match" in vote:
        rows |= {f"exact_match, verifier best-of-{n}": vote["verifier_exact_match"],
                 f"exact_match, verifier-weighted vote@{n}": vote["verifier_vote_exact_match"]}
    if "pass_at_n" in vote:
        rows[f"pass@{n} (any chain right)"] = vote["pass_at_n"]
    rows |= {f"answer chosen by --choose {vote.get('choose', 'vote')} changed the greedy answer": vote["changed"],
             "chains with consistent checks": vote["chains_passed"],
             "questions with a chain whose checks are consistent": vote["questions_passed"]}
    if "verifier_exact_match" in vote:
        rows |= {"chains verified (consistent checks, verifier accepts)": vote["chains_verified"],
                 "verified chains that are right": vote["verified_right"]}
    lines = [f"\n### Answer choice ({n} overlay chains per question: chain 0 as decoded above, the others at "
             f"temperature {vote['temperature']:g}, top-p {vote['top_p']:g})\n", "| measure | value |", "|---|---|",
             *(f"| {name} | {value:.3f} |" for name, value in rows.items())]
    if "verifier_exact_match" in vote:
        shown = "n/a" if vote["verifier_auc"] is None else f"{vote['verifier_auc']:.3f}"
        lines += [f"| verifier AUC over these chains | {shown} |",
                  f"| verifier ms per chain | {vote['verifier_ms_per_chain']:.3f} |"]
    rules = ", ".join(f"{k} {v}" for k, v in sorted(vote["rules"].items()))
    lines.append(f"| rule used (questions) | {rules} |")
    if vote.get("prefixes"):
        scored = "verifier" in vote["prefixes"][0]
        lines += [f"\nThe first k of the {n} chains (the chains `--samples k` decodes, same seeds):\n",
                  "| chains k | pass@k | vote@k" + (" | verifier best-of-k | verifier-weighted vote@k" if scored else "")
                  + " |", "|---|---|---" + ("|---|---" if scored else "") + "|"]
        for row in vote["prefixes"] + [{"chains": n, "pass": vote.get("pass_at_n"), "vote": rows[f"exact_match, vote@{n}"],
                                        "verifier": vote.get("verifier_exact_match"),
                                        "verifier_vote": vote.get("verifier_vote_exact_match")}]:
            cells = [row["pass"], row["vote"]] + ([row.get("verifier"), row.get("verifier_vote")] if scored else [])
            lines.append(f"| {row['chains']} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    return lines


def heldout_variants(train_file: str, tracks: int, seed: int = 0) -> list[Chain]:
    """Held-out variants of the first ``tracks`` training records (the track probe's split: numbers and names
    changed, results recomputed; never trained): a question the model has seen the shape of, with new numbers."""
    from overlay.variants import HELDOUT_VARIANTS, generate_variants, library_from_gsm8k

    library = library_from_gsm8k(train_file, limit=tracks)
    return [v.chain for v in generate_variants(library, replace(HELDOUT_VARIANTS, seed=seed)).heldout]
