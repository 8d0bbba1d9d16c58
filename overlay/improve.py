"""Self-improvement rounds: decode the training questions (several samples each), keep the chains that reach the
gold answer with every CHECK passing, and learn from them twice: a new table version (the active pointer moves, as
for a build) and more selector training (from the previous round's selector, on every chain kept so far plus a
replay sample of the original chains). Every stage of a round leaves its file in ``round-N/`` before the next one
starts, so an interrupted run resumes where it stopped, and no stage runs twice (a table version learned by a round
is found again by its tag)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from overlay import table as tbl
from overlay.chains import Chain, answers_match
from overlay.configs import DatasetConfig, ImproveConfig, TrainConfig
from overlay.decode import DecodeConfig, DecodeResult, OverlayDecoder
from overlay.learn import learn_version
from overlay.tracks import make_tracks
from overlay.tokenizer import encode
from overlay.vote import check_samples, decode_voted

STATE = "state.json"


def _write_json(path: Path, data: Any) -> None:
    """Write whole or not at all (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def kept_chains(results: list[DecodeResult], gold: str) -> list[str]:
    """The distinct chain texts that are well-formed, answer ``gold`` and pass every CHECK they make."""
    kept: list[str] = []
    for r in results:
        if (r.well_formed and answers_match(r.answer, gold) and r.verdicts
                and all(v["verdict"] == "pass" for v in r.verdicts) and r.text not in kept):
            kept.append(r.text)
    return kept


def decode_round(decoder: OverlayDecoder, chains: list[Chain], config: ImproveConfig, seed: int,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """For each question: the gold answer, how many chains were decoded and the chains kept."""
    sampling = DecodeConfig(temperature=config.temperature, top_p=config.top_p, seed=seed, max_tokens=config.max_tokens)
    out = []
    start = time.perf_counter()
    for i, chain in enumerate(chains, 1):
        _, vote = decode_voted(decoder, chain.question, config.samples, sampling)
        out.append({"question": chain.question, "gold": chain.answer, "decoded": vote.samples,
                    "kept": kept_chains(vote.results, chain.answer)})
        if i % 50 == 0 or i == len(chains):
            solved = sum(bool(q["kept"]) for q in out)
            log(f"  decoded {i}/{len(chains)} questions, {solved} solved, {time.perf_counter() - start:.0f} s")
    return out


def test_figures(table: tbl.SemanticTable, model: Path, test: list[Chain], config: ImproveConfig) -> dict[str, Any]:
    """Greedy exact-match, well-formed chains and checks passed of a selector on test questions."""
    from overlay.generation import decode_all, measures
    from overlay.selector import load_selector

    selector, tok = load_selector(model)
    decoder = OverlayDecoder(table, selector, tok, DecodeConfig(max_tokens=config.max_tokens))
    gen = measures(decode_all(decoder, [c.question for c in test], progress=False), [c.answer for c in test])
    return {k: gen[k] for k in ("questions", "exact_match", "well_formed", "checks_passed")}


def live_learning(client, domain: str, selector, tok, solved: list[Chain], before: int, after: int,
                  config: ImproveConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Held-out variants (never trained, never learned) of the questions the table just learned from, decoded by the
    same selector on the table version before and after: what the table alone learned."""
    from overlay.generation import decode_all, measures
    from overlay.variants import VariantConfig, VariantError, stellator

    try:
        vset, _ = stellator(solved, VariantConfig(variants=config.live, heldout=config.live, edits="numbers,names",
                                                  seed=config.seed))
    except VariantError:
        return {}
    variants = [v.chain for v in vset.heldout]
    figures: dict[str, Any] = {"questions": len(solved), "variants": len(variants)}
    for name, version in (("before", before), ("after", after)):
        decoder = OverlayDecoder(tbl.SemanticTable(client, domain, version), selector, tok,
                                 DecodeConfig(max_tokens=config.max_tokens))
        got = measures(decode_all(decoder, [c.question for c in variants], progress=False), [c.answer for c in variants])
        figures[name] = {"table_version": version, "exact_match": got["exact_match"], "well_formed": got["well_formed"]}
    log(f"  live learning: held-out variants of the {len(solved)} learned questions, exact-match "
        f"{figures['before']['exact_match']:.3f} (table v{before}) → {figures['after']['exact_match']:.3f} (v{after})")
    return figures


def _learned_version(client, domain: str, tag: str) -> int | None:
    """The complete table version a round already learned (its meta carries the round's tag), if any."""
    found = [v for v, meta in tbl.versions(client, domain).items()
             if meta.get("improve_round") == tag and meta.get("status") == "complete"]
    return max(found) if found else None


def run_improve(client, domain: str, model_dir: str | Path, chains: list[Chain], out: str | Path,
                config: ImproveConfig, test: list[Chain] | None = None, log: Callable[[str], None] = print,
                replay: list[Chain] | None = None) -> list[dict]:
    """Run rounds until ``config.rounds`` are complete (resuming a run in ``out``); returns each round's figures.
    ``chains`` are the training questions with their gold answers (only the answers are used); ``replay`` the chains
    the start model was trained on, mixed into each round's training (default: ``chains`` themselves)."""
    from overlay.dataset import build_dataset
    from overlay.selector import load_selector
    from overlay.train import train

    check_samples(config.samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _read_json(out / STATE) or {"domain": domain, "start_model": str(model_dir), "config": asdict(config),
                                         "rounds": []}
    if state["domain"] != domain:
        raise ValueError(f"{out} holds a run on table {state['domain']!r}, not {domain!r}: give another --out")
    order = list(range(len(chains)))
    random.Random(config.seed).shuffle(order)
    asked = [chains[i] for i in order[: config.questions or len(chains)]]
    model = Path(state["rounds"][-1]["model"]) if state["rounds"] else Path(model_dir)
    if test and "baseline" not in state:
        state["baseline"] = {"model": str(model_dir), "table_version": tbl.active_version(client, domain),
                             "test": test_figures(tbl.SemanticTable(client, domain), Path(model_dir),
                                                  test[: config.test_limit], config)}
        log(f"before round 1: test exact-match {state['baseline']['test']['exact_match']:.3f}")
        _write_json(out / STATE, state)
    for r in range(len(state["rounds"]) + 1, config.rounds + 1):
        folder = out / f"round-{r}"
        folder.mkdir(exist_ok=True)
        table = tbl.SemanticTable(client, domain)
        selector, tok = load_selector(model)
        log(f"round {r}: decoding {len(asked)} training questions × {config.samples} with {model}, table v{table.version}")
        decoded = _read_json(folder / "decoded.json")
        if decoded is None:
            decoder = OverlayDecoder(table, selector, tok, DecodeConfig(max_tokens=config.max_tokens))
            decoded = decode_round(decoder, asked, config, config.seed + r, log)
            _write_json(folder / "decoded.json", decoded)
        kept = [Chain.from_text(t) for rounds in [_read_json(out / f"round-{k}" / "decoded.json") for k in range(1, r + 1)]
                for q in rounds for t in q["kept"]]
        new = [t for q in decoded for t in q["kept"]]
        tag = f"{out.resolve()}#{r}"
        version = _learned_version(client, domain, tag)
        if version is None:
            version = learn_version(client, domain, ((encode(tok, t), 1.0) for t in new),
                                    source=f"improve round {r} ({len(new)} verified chains)",
                                    extra_meta={"improve_round": tag},
                                    tracks=make_tracks([Chain.from_text(t) for t in new])) if new else table.version
        live = _read_json(folder / "live.json")
        based_on = tbl.versions(client, domain).get(version, {}).get("based_on")
        if live is None and config.live and new and based_on:
            solved = [c for c, q in zip(asked, decoded) if q["kept"]]
            live = live_learning(client, domain, selector, tok, solved, int(based_on), version, config, log)
            _write_json(folder / "live.json", live)
        table = tbl.SemanticTable(client, domain, version)
        log(f"round {r}: {sum(bool(q['kept']) for q in decoded)} of {len(decoded)} questions solved, {len(new)} chains "
            f"kept ({len(kept)} so far); table v{version}")
        if not kept:
            log(f"round {r}: no verified chain yet, so the selector is not trained this round")
        elif not (folder / "model" / "train_result.json").exists():
            pool = chains if replay is None else replay
            mixed = random.Random(config.seed + r).sample(pool, min(len(pool), int(config.replay * len(kept))))
            data = folder / "dataset"
            if not (data / "manifest.json").exists():
                build_dataset(table, tok, kept + mixed, data, DatasetConfig(seed=config.seed))
            train(TrainConfig(data=str(data), out=str(folder / "model"), base=str(model), steps=config.steps,
                              chains_per_batch=config.chains_per_batch, lr=config.lr, warmup=max(1, config.steps // 10),
                              eval_every=0, save_every=max(1, config.steps // 4), threads=config.threads,
                              seed=config.seed + r, resume=(folder / "model" / "checkpoint").exists()), progress=False)
        model = folder / "model" if kept else model
        figures: dict[str, Any] = {"round": r, "model": str(model), "table_version": version,
                                   "questions": len(decoded), "solved": sum(bool(q["kept"]) for q in decoded) / len(decoded),
                                   "kept_chains": len(new), "kept_so_far": len(kept)} | ({"live": live} if live else {})
        if test:
            figures["test"] = test_figures(table, model, test[: config.test_limit], config)
            log(f"round {r}: test exact-match {figures['test']['exact_match']:.3f} on {figures['test']['questions']}")
        state["rounds"].append(figures)
        _write_json(out / STATE, state)
    return state["rounds"]
