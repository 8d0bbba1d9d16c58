"""Table build throughput: entries per second and Redis memory per entry, on GSM8K train and a larger corpus.

Two builds into a fresh embedded Redis (each in its own temporary OVERLAY_HOME, so memory is measured on an
otherwise empty server): the data file as it is, and a corpus of generated variants of its chains (every
number in question and steps replaced by a seeded random number of the same length, so n-grams are new
but the text is GSM8K-like), ``--scale`` times as many chains. An entry is one (context, next token) member
of a zset; memory is ``used_memory`` after minus before, divided by entries.

    python benchmarks/bench_table_build.py --data ../shared/data/gsm8k/train.jsonl --scale 10
"""

from __future__ import annotations

import random
import re
import time

import common

NUMBER = re.compile(r"\d+")


def variants(chains, scale: int, seed: int = 0):
    """``scale`` copies of every chain's text, the first as is, the others with their numbers rewritten."""
    rng = random.Random(seed)

    def renumber(m: re.Match) -> str:
        n = len(m.group(0))
        return str(rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n))

    for chain in chains:
        text = chain.to_text()
        yield text
        for _ in range(scale - 1):
            yield NUMBER.sub(renumber, text)


def build(texts, label: str, vocab_size: int, tokenizer=None, home=None) -> dict:
    """Build one table from ``texts`` in a fresh home; entries/s, contexts/s and memory per entry."""
    from overlay import store
    from overlay import table as tbl
    from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer

    with common.overlay_home(home):
        client = store.connect(None)
        texts = list(texts)
        start = time.perf_counter()
        tok = tokenizer or train_tokenizer(texts, vocab_size=vocab_size)
        tok_s = time.perf_counter() - start
        start = time.perf_counter()
        encoded = [encode(tok, t) for t in texts]
        enc_s = time.perf_counter() - start
        before = client.info("memory")["used_memory"]
        stats = tbl.build_table(client, "build", encoded, vocab_size=len(tok), tokenizer_json=tok.backend_tokenizer.to_str(),
                                tokenizer_hash=tokenizer_hash(tok), max_order=3)
        after = client.info("memory")["used_memory"]
        keys = client.dbsize()
    return {"corpus": label, "chains": stats.sequences, "tokens": stats.tokens, "contexts": stats.contexts,
            "entries": stats.entries, "build_s": stats.seconds, "entries_per_s": stats.entries / stats.seconds,
            "tokens_per_s": stats.tokens / stats.seconds, "tokenizer_s": tok_s, "encode_s": enc_s,
            "memory_mb": (after - before) / 2**20, "bytes_per_entry": (after - before) / stats.entries,
            "bytes_per_context": (after - before) / max(1, stats.contexts), "keys": keys}, tok


def run(args) -> dict:
    from overlay.chains import load_chains

    chains = load_chains(args.data, "gsm8k", limit=args.limit or None).chains
    rows = []
    base, tok = build((c.to_text() for c in chains), f"{args.data.name} ({len(chains)} chains)", args.vocab_size)
    rows.append(base)
    print(f"built {base['corpus']}: {base['entries_per_s']:,.0f} entries/s", flush=True)
    if args.scale > 1:
        pool = chains[: args.variant_base] if args.variant_base else chains
        row, _ = build(variants(pool, args.scale), f"{args.scale}× variants of {len(pool)} chains", args.vocab_size,
                       tokenizer=tok)
        rows.append(row)
    common.table(rows, ["corpus", "chains", "tokens", "entries", "build_s", "entries_per_s", "tokens_per_s",
                        "memory_mb", "bytes_per_entry"], "Table build (max order 3, embedded Redis)")
    return {"builds": rows, "max_order": 3, "vocab_size": args.vocab_size}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0, help="chains of the data file to use; 0 = all")
    p.add_argument("--scale", type=int, default=10, help="variants corpus = this many copies of each chain")
    p.add_argument("--variant-base", type=int, default=0,
                   help="chains the variants are made from (0 = all of them: a corpus --scale times the data file)")
    p.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary")
    args = p.parse_args()
    common.write_json("table_build", run(args), not args.no_json)


if __name__ == "__main__":
    main()
