"""Live learning: held-out variants of questions the table has never seen, decoded before and after one feedback
batch marks those questions' chains correct — same selector, only the table and its track memory updated.

The table (with its track memory) is built from ``--data`` into ``--home``'s embedded Redis with the model's own
tokenizer (or the domain is reused with ``--reuse``). The first ``--records`` of ``--learn`` (GSM8K format, e.g. the
GSM8K test split) that can vary are the questions learned; their held-out variants (numbers and names changed, the stellator's
held-out split) are decoded before and after ``apply_feedback`` (a reused domain keeps the learned version active).

    python benchmarks/bench_learning.py --model runs/qa --data runs/stellator-full/train.jsonl \
        --learn ../shared/data/gsm8k/test.jsonl --records 50 --home /tmp/ovl-learning
"""

from __future__ import annotations

import time
from pathlib import Path

import common


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="selector folder (its tokenizer.json builds the table)")
    p.add_argument("--learn", type=Path, default=common.default_questions(),
                   help="GSM8K-format records whose chains are learned")
    p.add_argument("--records", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--domain", default="livelearning")
    p.add_argument("--reuse", action="store_true", help="use the domain's active version as it is (no build)")
    args = p.parse_args()

    from overlay import store
    from overlay.chains import load_chains
    from overlay.decode import DecodeConfig
    from overlay.generation import verification_success
    from overlay.learn import append_feedback, apply_feedback
    from overlay.pipeline import build_table_from_file
    from overlay.selector import load_selector
    from overlay.table import SemanticTable
    from overlay.variants import HELDOUT_VARIANTS, generate_variants, library_from_gsm8k

    model, tok = load_selector(args.model)
    decode = DecodeConfig(max_tokens=args.max_tokens)
    with common.overlay_home(args.home) as home:
        client = store.connect(None)
        if not args.reuse:
            start = time.perf_counter()
            build_table_from_file(client, args.data, "gsm8k", args.domain, tokenizer_path=args.model / "tokenizer.json")
            print(f"built {args.domain} from {args.data} in {time.perf_counter() - start:.0f} s (home {home})")
        library = library_from_gsm8k(str(args.learn), args.records)  # the first N records that vary (ids gsm8k-<line>)
        lines = {int(t.id.rpartition("-")[2]) for t in library.tracks}
        learned = [c for c in load_chains(args.learn, "gsm8k", limit=max(lines)).chains if c.line in lines]
        variants = [v.chain for v in generate_variants(library, HELDOUT_VARIANTS).heldout]
        before_table = SemanticTable(client, args.domain)
        before = verification_success(before_table, model, tok, variants, decode, keep=0)
        for chain in learned:
            append_feedback(client, args.domain, text=chain.to_text(), verdict="correct")
        start = time.perf_counter()
        report = apply_feedback(client, args.domain)
        learn_s = time.perf_counter() - start
        after = verification_success(SemanticTable(client, args.domain), model, tok, variants, decode, keep=0)
        rows = [{"when": when, "version": version,
                 **{m: round(gen[m]["exact_match"], 4) for m in ("overlay", "track_only", "table_only") if m in gen}}
                for when, version, gen in (("before", before_table.version, before),
                                           ("after one feedback batch", report.version, after))]
        print(common.table(rows, title=f"exact-match on {len(variants)} held-out variants of {len(learned)} learned "
                                       f"questions ({args.learn.name}), same selector"))
        common.write_json("learning", {
            "model": str(args.model), "data": str(args.data), "learn": str(args.learn), "records": len(learned),
            "variants": len(variants), "max_tokens": args.max_tokens, "learn_s": round(learn_s, 1),
            "tracks_before": int(before_table.meta.get("tracks", 0) or 0),
            "tracks_after": int(SemanticTable(client, args.domain, report.version).meta.get("tracks", 0) or 0),
            "rows": rows}, not args.no_json)


if __name__ == "__main__":
    main()
