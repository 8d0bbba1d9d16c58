"""GetTracks per question against an in-process BM25 scan of the same tracks, and GetNeighbours for scale.

The track memory is built from ``--data`` (every chain a track; a stellator ``train.jsonl`` gives sources and their
variants, families from its ``track`` field) into a table version in ``--home``'s embedded Redis, or an existing
domain is used (``--domain`` with ``--reuse``). Questions are the first ``--questions`` of ``--questions-file``.
Per question, all in the same run: GetTracks' one round trip (``TrackMemory.search``: the shards' scripts), the whole
of ``get_tracks`` (retrieval, binding every hit's numbers, following each with the calculator, the chooser), the
in-process peer (``Index.search``: the same BM25 scores computed in Python over all tracks), and one GetNeighbours
lookup (cache off) for scale.

    python benchmarks/bench_get_tracks.py --data runs/stellator-full/train.jsonl \
        --questions-file runs/stellator-full/heldout1000.jsonl --home /tmp/ovl-bench-home
"""

from __future__ import annotations

import time
from pathlib import Path

import common
from overlay.tracks import TOP_K


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--questions-file", type=Path, default=common.default_questions())
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--k", type=int, default=TOP_K)
    p.add_argument("--domain", default="benchtracks")
    p.add_argument("--reuse", action="store_true", help="use the domain's active version as it is (no build)")
    args = p.parse_args()

    from overlay import store
    from overlay.chains import load_chains
    from overlay.pipeline import build_table_from_file
    from overlay.table import SemanticTable
    from overlay.tokenizer import encode
    from overlay.tracks import Index, TrackMemory, make_tracks, file_families

    with common.overlay_home(args.home) as home:
        client = store.connect(None)
        if not args.reuse:
            start = time.perf_counter()
            build_table_from_file(client, args.data, "gsm8k", args.domain)
            print(f"built {args.domain} from {args.data} in {time.perf_counter() - start:.0f} s (home {home})")
        table = SemanticTable(client, args.domain)
        memory = TrackMemory(client, args.domain, table.version)
        questions = [c.question for c in load_chains(args.questions_file, "gsm8k", limit=args.questions).chains]
        chains = load_chains(args.data, "gsm8k").chains
        tracks = make_tracks(chains, file_families(args.data, chains))
        index = Index.build([t.question for t in tracks], [t.family for t in tracks])
        tok = table.tokenizer()
        table.cache_size = 0
        contexts = [encode(tok, f"<Q> {q} ")[-table.max_order:] for q in questions]
        memory.search(questions[0], args.k)
        times: dict[str, list[float]] = {"get_tracks_round_trip": [], "get_tracks_whole": [], "peer_in_process_scan": [],
                                         "get_neighbours": []}
        for _ in range(args.repeats):
            for q, ctx in zip(questions, contexts):
                for name, fn in (("get_tracks_round_trip", lambda: memory.search(q, args.k)),
                                 ("get_tracks_whole", lambda: memory.get_tracks(q, args.k)),
                                 ("peer_in_process_scan", lambda: index.search(q, args.k)),
                                 ("get_neighbours", lambda: table.neighbours(ctx, 32))):
                    start = time.perf_counter()
                    fn()
                    times[name].append(1000 * (time.perf_counter() - start))
        rows = [{"what": name, **{k: round(v, 3) for k, v in common.summary(vals).items()}} for name, vals in times.items()]
        print(common.table(rows, title=f"ms per question, {len(questions)} questions × {args.repeats}, {memory.count} tracks"))
        ratio = common.summary(times["peer_in_process_scan"])["median"] / common.summary(times["get_tracks_round_trip"])["median"]
        print(f"GetTracks (one round trip) is {ratio:.1f}× faster than the in-process scan")
        common.write_json("get_tracks", {"tracks": memory.count, "shards": memory.shards, "k": args.k,
                                         "questions": len(questions), "questions_file": str(args.questions_file),
                                         "data": str(args.data), "ms": rows, "ratio_peer_over_round_trip": ratio},
                          not args.no_json)


if __name__ == "__main__":
    main()
