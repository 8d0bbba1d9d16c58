"""The main job end to end on one dataset: table → dataset → selector → evaluation → traced answers → report.

Each stage reuses what an earlier run built when it still matches (same table version, same tokenizer),
so a second run is quick; ``fresh=True`` rebuilds everything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay import store
from overlay import table as tbl
from overlay.chains import Chain, ConversionReport, load_chains
from overlay.decode import DecodeConfig
from overlay.generation import generation_markdown, heldout_variants, verification_success
from overlay.tokenizer import (TokenizerMismatch, check_tokenizers, encode, load_tokenizer, tokenizer_hash,
                               train_tokenizer)
from overlay.tracks import Track, file_families, make_tracks
from overlay.variants import HELDOUT_VARIANTS, generate_variants, library_from_gsm8k

EXAMPLE_VARIANTS = 2


@dataclass
class QuickstartConfig:
    """Sizes for the quickstart: small enough for about five minutes on two CPU cores."""

    domain: str = "gsm8k-sample"
    steps: int = 300
    chains_per_batch: int = 8
    n_layer: int = 2
    n_embd: int = 128
    eval_chains: int = 100
    generate: int = 20
    variant_tracks: int = 10
    variants: bool = True
    max_tokens: int = 384  # GSM8K chains run to ~300 tokens: at 200, 2 of the 19 held-out variants were cut
    threads: int = 2


def build_table_from_file(client, path: str | Path, fmt: str, domain: str, *, max_order: int = 3,
                          vocab_size: int = 2000, tokenizer_path: str | Path | None = None, limit: int | None = None,
                          on_flush=None, fields: dict[str, Any] | None = None,
                          tracks: list[Track] | None = None) -> tuple[ConversionReport, tbl.BuildStats]:
    """Convert a JSONL dataset to chains (``fields``: load_chains' field mapping), train (or load) the tokenizer
    and build a new table version with its track memory (the file's chains, or ``tracks`` when given)."""
    tbl.check_domain(domain)
    report = load_chains(path, fmt, limit=limit, **(fields or {}))
    if not report.chains:
        raise ValueError(f"{path}: no record could be converted to a chain ({report.summary()})")
    texts = [c.to_text() for c in report.chains]
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else train_tokenizer(texts, vocab_size=vocab_size)
    if tracks is None:
        tracks = make_tracks(report.chains, file_families(path, report.chains))
    stats = tbl.build_table(client, domain, (encode(tok, t) for t in texts), vocab_size=len(tok),
                            tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok),
                            max_order=max_order, source=str(path), on_flush=on_flush, tracks=tracks)
    return report, stats


def ensure_table(client, train_file: Path, domain: str, fresh: bool, log, variants: bool = True) -> tbl.SemanticTable:
    """Build the domain's table from ``train_file``, with a track memory of the training chains (sources and their
    training variants), unless a complete one with tracks exists (or ``fresh``)."""
    version = tbl.active_version(client, domain)
    stale = version is None or not int(tbl.versions(client, domain).get(version, {}).get("tracks", 0) or 0)
    if fresh or stale:
        chains, families = training_chains(train_file, variants)
        report, stats = build_table_from_file(client, train_file, "gsm8k", domain, tracks=make_tracks(chains, families))
        log(report.summary())
        log(f"table {domain} v{stats.version}: {stats.contexts} contexts, {stats.entries} entries, "
            f"{tbl.versions(client, domain)[stats.version].get('tracks')} tracks in {stats.seconds:.1f} s")
    else:
        log(f"reusing table {domain} v{tbl.active_version(client, domain)}")
    return tbl.SemanticTable(client, domain)


def _matches(manifest_file: Path, table: tbl.SemanticTable) -> bool:
    """True when a finished dataset was built from this table version with its tokenizer."""
    if not manifest_file.exists():
        return False
    manifest = json.loads(manifest_file.read_text())
    try:
        check_tokenizers({"table": table.meta.get("tokenizer_hash"), "dataset": manifest.get("tokenizer_hash")})
    except TokenizerMismatch:
        return False
    return manifest.get("table") == {"domain": table.domain, "version": table.version}


def training_chains(train_file: Path, variants: bool) -> tuple[list[Chain], list[str]]:
    """The sample's chains and, with ``variants``, each one's training variants (stellator data) from the split whose
    held-out variants the quickstart decodes, so those stay never trained; and each chain's family (its source)."""
    chains = load_chains(train_file, "gsm8k").chains
    families = [f"gsm8k-{c.line}" for c in chains]  # the id library_from_gsm8k gives its track
    if not variants:
        return chains, families
    vset = generate_variants(library_from_gsm8k(train_file, None), HELDOUT_VARIANTS)
    extra = [v for v in vset.train if v.index]
    return chains + [v.chain for v in extra], families + [v.track for v in extra]


def ensure_model(table: tbl.SemanticTable, train_file: Path, home: Path, cfg: QuickstartConfig, fresh: bool, log) -> Path:
    """Build the token-level dataset and train the selector unless a matching one exists."""
    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.train import TrainConfig, train

    data = home / "datasets" / table.domain
    model = home / "models" / table.domain
    if fresh or not _matches(data / "manifest.json", table):
        chains = training_chains(train_file, cfg.variants)[0]
        manifest = build_dataset(table, table.tokenizer(), chains, data, DatasetConfig())
        log(f"dataset {data}: {manifest.rows} rows, table recall in rows {manifest.present_rate:.3f}")
        shutil.rmtree(model, ignore_errors=True)
    if not (model / "train_result.json").exists() or not _matches(data / "manifest.json", table):
        result = train(TrainConfig(data=str(data), out=str(model), steps=cfg.steps, chains_per_batch=cfg.chains_per_batch,
                                   n_layer=cfg.n_layer, n_embd=cfg.n_embd, threads=cfg.threads, eval_every=100,
                                   warmup=30))
        log(f"selector {model}: eval accuracy {result.eval_accuracy:.3f}, {result.tokens_per_s:.0f} tokens/s, "
            f"{result.seconds:.0f} s, {result.params} parameters")
    else:
        log(f"reusing selector {model}")
    return model


def run_quickstart(data_dir: Path, cfg: QuickstartConfig, *, fresh: bool = False, redis_url: str | None = None,
                   log=print) -> Path:
    """Run the whole main job on the sample in ``data_dir`` and return the report folder."""
    import torch

    from overlay.evaluate import evaluate, write_report
    from overlay.selector import load_selector

    train_file, test_file = data_dir / "gsm8k_train_sample.jsonl", data_dir / "gsm8k_test_sample.jsonl"
    for f in (train_file, test_file):
        if not f.exists():
            raise FileNotFoundError(f"sample data not found: {f} (pass --data-dir pointing at examples/data)")
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    client = store.connect(redis_url)
    home = store.data_dir()
    table = ensure_table(client, train_file, cfg.domain, fresh, log, cfg.variants)
    model_dir = ensure_model(table, train_file, home, cfg, fresh, log)
    model, tok = load_selector(model_dir)
    test = load_chains(test_file, "gsm8k").chains
    results: dict[str, Any] = evaluate(table, model, tok, test[: cfg.eval_chains])
    decode_cfg = DecodeConfig(max_tokens=cfg.max_tokens)
    results["generation"] = verification_success(table, model, tok, test[: cfg.generate], decode_cfg, keep=1)
    variants = heldout_variants(str(train_file), cfg.variant_tracks)
    results["variants"] = verification_success(table, model, tok, variants, decode_cfg, keep=len(variants))
    examples = [ex | {"label": "held-out variant of a training question (numbers and names changed, never trained)"}
                for ex in results["variants"]["overlay"].pop("examples") if ex["well_formed"]][:EXAMPLE_VARIANTS]
    examples += [ex | {"label": "test question (never trained), whatever the outcome"}
                 for ex in results["generation"]["overlay"].pop("examples")]
    for gen in (results["generation"], results["variants"]):
        gen["table_only"].pop("examples")
    report = home / "reports" / time.strftime("quickstart-%Y%m%d-%H%M%S")
    tmp = report.with_name(report.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_report(results, tmp)
    (tmp / "examples.json").write_text(json.dumps(examples, indent=1))
    with (tmp / "eval.md").open("a") as md:
        md.write(generation_markdown(results["generation"], "Test questions decoded end to end"))
        md.write(generation_markdown(results["variants"], "Held-out variants of training questions"))
        for ex in examples:
            md.write(f"\n### {ex['label']}: {ex['question']}\n\n```\n{ex['text']}\n```\n\nanswer {ex['answer']} "
                     f"(expected {ex['expected']}), stop: {ex['stop_reason']}, {ex['tokens']} tokens\n")
    os.replace(tmp, report)
    log(f"done in {time.perf_counter() - start:.0f} s")
    return report
