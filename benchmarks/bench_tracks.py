"""Track memory without any neural model: how often following a retrieved track answers a question.

Tracks are built from ``--train`` (chains whose roles reproduce their own answer), indexed in memory (the same BM25
scores GetTracks computes in Redis), the chooser is fitted on training questions retrieved against the other tracks
(``fit_chooser``), and every ``--test`` question is answered by following the top-``k`` tracks with its own numbers
and the calculator. Reported: top-1 (follow the best retrieved track), chooser (follow the chooser's pick; a refusal
counts as wrong), the chooser without refusing and how often it refused, its picks by probability and how many were
right, any-k (the right answer is among the k followed tracks), and the median milliseconds of in-memory
retrieval + binding + following per question.

``--dev N`` holds out N records of the train file (shuffled, seed 0) and evaluates on them instead of ``--test``:
tune on that, report the test figure once per design choice.

    python benchmarks/bench_tracks.py --train ../shared/data/mawps-asdiv-a/train.jsonl \\
        --test ../shared/data/mawps-asdiv-a/test.jsonl --format jsonl --limit 313
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_tracks.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


def families_of(path: Path, chains, field: str | None) -> list[str] | None:
    """Each chain's family from the record's ``field`` (variants of one source share it); None without a field."""
    if not field:
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for c in chains:
        rec = json.loads(lines[c.line - 1])
        out.append(str(rec.get(field, f"line{c.line}")))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="JSONL of training chains (the tracks)")
    p.add_argument("--test", type=Path, default=None, help="JSONL of questions to answer (not needed with --dev)")
    p.add_argument("--format", default="gsm8k", choices=("gsm8k", "jsonl"), help="record format of both files")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many test questions (shuffled, seed 0)")
    p.add_argument("--k", type=int, default=None, help="tracks retrieved per question (default: tracks.TOP_K)")
    p.add_argument("--dev", type=int, default=0, help="hold out this many train records as the test set instead")
    p.add_argument("--fit-questions", type=int, default=None, help="training questions the chooser is fitted on "
                   "(default: fit_chooser's)")
    p.add_argument("--family-out", type=float, default=None, help="share of fitting questions whose family is left out")
    p.add_argument("--family-field", default=None, help="record field naming a chain's family (e.g. 'track')")
    p.add_argument("--failures", type=int, default=0, help="print this many wrongly chosen questions")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    from overlay.chains import answers_match, load_chains
    from overlay.roles import question_numbers
    from overlay.tracks import TOP_K, Index, fit_chooser, make_tracks, max_score, retrieved, word_idf

    args.k = args.k or TOP_K

    train = load_chains(args.train, args.format).chains
    families = families_of(args.train, train, args.family_field)
    if args.dev:
        order = list(range(len(train)))
        random.Random(0).shuffle(order)
        dev = set(order[:args.dev])
        test = [train[i] for i in order[:args.dev]]
        keep = [i for i in range(len(train)) if i not in dev]
        train = [train[i] for i in keep]
        families = [families[i] for i in keep] if families else None
    else:
        if args.test is None:
            p.error("--test is needed unless --dev is given")
        test = load_chains(args.test, args.format).chains
        random.Random(0).shuffle(test)
    test = test[:args.limit] if args.limit else test

    t0 = time.perf_counter()
    tracks = make_tracks(train, families)
    index = Index.build([t.question for t in tracks], [t.family for t in tracks])  # at most PER_FAMILY per family
    idf_of = word_idf(index)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = {} if args.family_out is None else {"family_out": args.family_out}
    if args.fit_questions:
        kw["questions"] = args.fit_questions
    chooser, fitted = fit_chooser(tracks, index, idf_of, k=args.k, **kw)
    fit_s = time.perf_counter() - t0

    top1 = chosen = argmax = refused = any_k = 0
    ms, wrong, calibration = [], [], {}
    for c in test:
        t0 = time.perf_counter()
        hits = index.search(c.question, args.k)
        norm = max_score(c.question, index.df, index.n)
        found = retrieved(c.question, [(tracks[j], s / norm) for j, s in hits], idf_of)
        ms.append(1000 * (time.perf_counter() - t0))
        best = chooser.choose(found)
        top1 += bool(found) and answers_match(found[0].answer, c.answer)
        ok = best is not None and answers_match(best.answer, c.answer)
        chosen += ok
        refused += best is None
        pick = max((r for r in found if r.answer is not None), key=lambda r: (r.p, -r.rank), default=None)
        argmax += pick is not None and answers_match(pick.answer, c.answer)
        if pick is not None:
            bucket = calibration.setdefault(f"{min(9, int(pick.p * 10)) / 10:.1f}", [0, 0])
            bucket[0] += 1
            bucket[1] += answers_match(pick.answer, c.answer)
        any_k += any(answers_match(r.answer, c.answer) for r in found)
        if not ok:
            wrong.append((c, found, best))
    n = max(1, len(test))
    result = {"train": str(args.train), "test": f"dev{args.dev} of train" if args.dev else str(args.test),
              "format": args.format, "questions": len(test), "k": args.k, "tracks": len(tracks), "of": len(train),
              "top1": round(top1 / n, 4), "chooser": round(chosen / n, 4),
              "chooser_no_refusal": round(argmax / n, 4), "refused": round(refused / n, 4),
              f"any{args.k}": round(any_k / n, 4),
              "calibration": {b: f"{r}/{t}" for b, (t, r) in sorted(calibration.items())},
              "median_ms": round(statistics.median(ms), 3) if ms else None, "build_s": round(build_s, 2),
              "fit_s": round(fit_s, 2), "fitted": fitted, "weights": [round(w, 3) for w in chooser.weights]}
    for c, found, best in wrong[:args.failures]:
        print("=" * 100)
        print("Q:", c.question, "| gold", c.answer, "| chosen", best.answer if best else None)
        print("  numbers:", [q.value for q in question_numbers(c.question)])
        for r in found:
            mark = "*" if answers_match(r.answer, c.answer) else " "
            used = r.track.chain.used
            slots = {r.track.chain.numbers[t].value: (question_numbers(c.question)[j].value if j is not None else None)
                     for t, j in ((t, r.binding.slots.get(t)) for t in used)}
            print(f" {mark} r{r.rank} sim {r.similarity:.2f} bind {r.binding.confidence:.2f} p {r.p:.2f} ans {r.answer}"
                  f" | {r.track.question}")
            print("      steps:", [s for tag, s in r.track.chain.steps if tag.endswith("ACTION>")], "bound", slots)
    print(json.dumps({k: v for k, v in result.items() if k != "fitted"}))
    print("fitted:", fitted)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
