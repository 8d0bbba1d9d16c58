"""Next-token evaluation on held-out chains: table alone, selector over the full vocabulary, and the overlay.

Every method is measured on the same target positions (``target_mask``: tool results left out) in one run,
so the table's recall@K is the ceiling the overlay (selector restricted to the table's K candidates) can reach.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from overlay.chains import Chain
from overlay.dataset import NeighbourCache, split_chains, target_mask, token_tags, window_of
from overlay.table import SemanticTable
from overlay.tokenizer import check_tokenizers, encode

LAMBDAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
RECALL_KS = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = {"table": "table alone", "full_vocab": "selector, full vocabulary",
           "overlay": "overlay (selector over K)", "overlay_mixed": "overlay + λ·table weight"}
# Tag codes from overlay.dataset; code 0 among targets is the <RESULT> tag token itself.
TAG_GROUPS = {1: "THOUGHT", 2: "ACTION", 3: "CHECK", 4: "ANSWER", 0: "RESULT"}
BUCKETS = ((0, 31), (32, 63), (64, 127), (128, 255), (256, None))
BATCH = 1024
MISSING = -30.0


def bucket_name(lo: int, hi: int | None) -> str:
    """Label of a position bucket, e.g. "32-63" or "256+"."""
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def _check_inputs(table: SemanticTable, model, tokenizer) -> str:
    """Refuse a table, model and tokenizer that do not belong together; returns the tokenizer hash."""
    return check_tokenizers({"tokenizer": tokenizer, "table": table.meta.get("tokenizer_hash", ""),
                             "model": getattr(model.config, "tokenizer_hash", "")})


def _rows(tokenizer, chains: Iterable[Chain], k: int, max_order: int) -> dict[str, np.ndarray | list]:
    """Every target position of every chain: window, table context, target, tag, position, chain id."""
    cols: dict[str, list] = {"window": [], "context": [], "target": [], "tag": [], "position": [], "chain": []}
    n = 0
    for cid, chain in enumerate(chains):
        n += 1
        ids = encode(tokenizer, chain.to_text())
        tags = token_tags(ids)
        for pos, is_target in enumerate(target_mask(ids)):
            if is_target and pos > 0:
                cols["window"].append(window_of(ids, pos, k))
                cols["context"].append(tuple(ids[max(0, pos - max_order) : pos]))
                cols["target"].append(ids[pos])
                cols["tag"].append(tags[pos])
                cols["position"].append(pos)
                cols["chain"].append(cid)
    out = {name: np.asarray(v, dtype=np.int64) for name, v in cols.items() if name != "context"}
    out["window"] = out["window"].reshape(-1, k)
    return out | {"context": cols["context"], "chains": n}


def _table_lists(table: SemanticTable, contexts: list[tuple[int, ...]], kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """GetNeighbours' first kmax ids and weights per context as [N,kmax] arrays (PAD 0 / MISSING where short)."""
    ids = np.zeros((len(contexts), kmax), dtype=np.int64)
    weights = np.full((len(contexts), kmax), MISSING, dtype=np.float32)
    cache = NeighbourCache(table, kmax, 100_000)
    for start in range(0, len(contexts), 512):
        for i, (nb_ids, nb_weights, _) in enumerate(cache.batch(contexts[start : start + 512]), start):
            ids[i, : len(nb_ids)] = nb_ids
            weights[i, : len(nb_weights)] = nb_weights
    return ids, weights


def _model_scores(model, windows: np.ndarray, cands: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Selector log-probabilities over the K candidates [N,K], full-vocab argmax == target, full-vocab rank."""
    device = next(model.parameters()).device
    logp, full_hit, full_rank = [], [], []
    with torch.inference_mode():
        for start in range(0, len(windows), BATCH):
            w = torch.as_tensor(windows[start : start + BATCH], device=device)
            c = torch.as_tensor(cands[start : start + BATCH], device=device)
            t = torch.as_tensor(targets[start : start + BATCH], device=device)
            logp.append(torch.log_softmax(model.score(w, c).float(), dim=-1).cpu())
            full = model.full_vocab_logits(w).float()
            true = full.gather(1, t[:, None])
            full_hit.append((full.argmax(-1) == t).cpu())
            full_rank.append(((full > true).sum(-1) + 1).cpu())
    return tuple(torch.cat(x).numpy() for x in (logp, full_hit, full_rank))


def _candidate_metrics(scores: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy@1 and reciprocal rank of the target's column (label −1: target not among them → 0, 0)."""
    found = label >= 0
    true = np.take_along_axis(scores, np.maximum(label, 0)[:, None], axis=1)[:, 0]
    rank = (scores > true[:, None]).sum(-1) + 1
    hit = found & (scores.argmax(-1) == label)
    return hit, np.where(found, 1.0 / rank, 0.0)


def _summary(hit: np.ndarray, rr: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Mean accuracy@1 and MRR over the selected rows."""
    n = int(rows.sum())
    return {"accuracy": float(hit[rows].mean()) if n else 0.0, "mrr": float(rr[rows].mean()) if n else 0.0}


def evaluate(table: SemanticTable, model, tokenizer, chains: Iterable[Chain], *, K: int = 32, k: int | None = None,
             dev_fraction: float = 0.2, seed: int = 0, recall_ks: Sequence[int] = (8, 32, 128)) -> dict:
    """Measure table, full-vocab selector and overlay on the same held-out target positions; returns a dict."""
    start = time.perf_counter()
    if K < 2:
        raise ValueError(f"K must be ≥ 2, got {K}")
    qa = getattr(model.config, "model_type", "") == "overlay-qa-selector"
    window = getattr(model.config, "window", None)
    k = k or window or (1 if qa else None)
    if not k or k < 1 or (window and k > window):
        raise ValueError(f"window k={k} must be ≥ 1 and at most the model's window ({window}); give k for HF models")
    tok_hash = _check_inputs(table, model, tokenizer)
    data = _rows(tokenizer, chains, k, table.max_order)
    n = len(data["target"])
    if n == 0:
        raise ValueError("no target positions: give at least one chain with reasoning steps")
    ks = sorted(set(RECALL_KS) | set(recall_ks) | {K})
    ids, weights = _table_lists(table, data["context"], max(ks))
    target = data["target"]
    hit_pos = ids == target[:, None]
    rank = np.where(hit_pos.any(1), hit_pos.argmax(1), -1)
    cands, cand_w = ids[:, :K], weights[:, :K]
    label = np.where((rank >= 0) & (rank < K), rank, -1)

    dev_chains = split_chains(data["chains"], dev_fraction, seed)
    is_dev = np.isin(data["chain"], sorted(dev_chains))
    tuned_on = "dev" if is_dev.any() and (~is_dev).any() else "all"
    tune_rows = is_dev if tuned_on == "dev" else np.ones(n, dtype=bool)
    report = ~is_dev if tuned_on == "dev" else np.ones(n, dtype=bool)

    if qa:
        return _qa_results(model, tokenizer, list(chains), data, cands, label, rank, report, tune_rows, ks, K, k, table,
                           tok_hash, tuned_on, start)
    logp, full_hit, full_rank = _model_scores(model, data["window"], cands, target)
    grid = []
    for lam in LAMBDAS:
        dev = _summary(*_candidate_metrics(logp + lam * cand_w, label), tune_rows)
        grid.append({"lambda": lam, "dev_accuracy": dev["accuracy"], "dev_mrr": dev["mrr"]})
    best = max(grid, key=lambda g: (g["dev_accuracy"], g["dev_mrr"], -g["lambda"]))["lambda"]
    per_row = {
        "table": (rank == 0, np.where(label >= 0, 1.0 / (np.maximum(label, 0) + 1), 0.0)),
        "full_vocab": (full_hit, 1.0 / full_rank),
        "overlay": _candidate_metrics(logp, label),
        "overlay_mixed": _candidate_metrics(logp + best * cand_w, label),
    }

    def block(rows: np.ndarray) -> dict:
        return {"n": int(rows.sum()), **{m: _summary(h, r, rows) for m, (h, r) in per_row.items()}}

    by_tag = {name: block(report & (data["tag"] == code)) for code, name in TAG_GROUPS.items()}
    by_position = {bucket_name(lo, hi): block(report & (data["position"] >= lo) & (hi is None or data["position"] <= hi))
                   for lo, hi in BUCKETS}
    recall = {str(c): float(((rank >= 0) & (rank < c))[report].mean()) for c in ks}
    methods = {m: _summary(h, r, report) for m, (h, r) in per_row.items()}
    return {
        "chains": data["chains"], "positions": int(report.sum()), "dev_positions": int(tune_rows.sum()),
        "K": K, "k": k, "table": {"domain": table.domain, "version": int(table.version)}, "tokenizer_hash": tok_hash,
        "recall": recall, "recall_at_K": recall[str(K)], "methods": methods,
        "full_vocab_accuracy": methods["full_vocab"]["accuracy"],
        "lambda": best, "lambda_tuned_on": tuned_on, "lambda_grid": grid,
        "by_tag": by_tag, "by_position": by_position, "seconds": round(time.perf_counter() - start, 3),
    }


def _qa_hits(model, tokenizer, chains: list[Chain], data: dict, cands: np.ndarray,
             label: np.ndarray) -> tuple[np.ndarray, ...]:
    """Accuracy@1, reciprocal rank, "scored" mask, and full-vocabulary accuracy@1 and reciprocal rank of the
    question-aware selector over the table's K candidates plus its copy
    values, one forward per chain (a target spelled by a visible number counts as its copy value; the positions
    inside a copied number are not scored, as in decoding)."""
    from overlay.dataset import prompt_length
    from overlay.selector.batches import collate, make_example
    from overlay.selector.state import NumberSpans, token_texts

    numbers = NumberSpans(token_texts(tokenizer))
    hit = np.zeros(len(label), dtype=bool)
    rr = np.zeros(len(label))
    scored = np.zeros(len(label), dtype=bool)
    full_hit = np.zeros(len(label), dtype=bool)
    full_rr = np.zeros(len(label))
    device = next(model.parameters()).device
    for cid, chain in enumerate(chains):
        rows = np.flatnonzero(data["chain"] == cid)
        if not len(rows):
            continue
        ids = encode(tokenizer, chain.to_text())
        plen = prompt_length(ids)
        labels = np.where(label[rows] >= 0, label[rows], -1).tolist()
        ex = make_example(ids, plen, data["position"][rows].tolist(), cands[rows].tolist(), labels, numbers,
                          model.config, len(ids) + 1)
        kept = rows[np.isin(data["position"][rows], np.asarray(ex.at) + plen)]
        batch = collate([ex], device)
        batch.pop("labels")
        with torch.inference_mode():
            out = model(**batch)
            logits = out.logits.float().cpu().numpy()
            last = out.hidden[0, batch["at"] + batch["question_ids"].shape[1]]
            full = (last @ model.get_input_embeddings().weight.T).float().cpu()
        target = torch.as_tensor(data["target"][kept])
        true = full.gather(1, target[:, None])
        full_hit[kept] = (full.argmax(-1) == target).numpy()
        full_rr[kept] = (1.0 / ((full > true).sum(-1) + 1)).numpy()
        gold = np.asarray(ex.labels)
        gold_score = np.take_along_axis(logits, np.maximum(gold, 0)[:, None], 1)[:, 0]
        found = gold >= 0
        hit[kept] = found & (logits.argmax(-1) == gold)
        rr[kept] = np.where(found, 1.0 / ((logits > gold_score[:, None]).sum(-1) + 1), 0.0)
        scored[kept] = True
    return hit, rr, scored, full_hit, full_rr


def _qa_results(model, tokenizer, chains: list[Chain], data: dict, cands: np.ndarray, label: np.ndarray,
                rank: np.ndarray, report: np.ndarray, tune_rows: np.ndarray, ks: list[int], K: int, k: int,
                table: SemanticTable, tok_hash: str, tuned_on: str, start: float) -> dict:
    """Next-token results for a question-aware selector on the positions the overlay scores: the table alone, the
    selector over the whole vocabulary (no copies), and the overlay (K table candidates + copy values)."""
    hit, rr, scored, full_hit, full_rr = _qa_hits(model, tokenizer, chains, data, cands, label)
    report = report & scored
    per_row = {"table": (rank == 0, np.where(label >= 0, 1.0 / (np.maximum(label, 0) + 1), 0.0)),
               "full_vocab": (full_hit, full_rr), "overlay": (hit, rr)}

    def block(rows: np.ndarray) -> dict:
        return {"n": int(rows.sum()), **{m: _summary(h, r, rows) for m, (h, r) in per_row.items()}}

    recall = {str(c): float(((rank >= 0) & (rank < c))[report].mean()) for c in ks}
    methods = {m: _summary(h, r, report) for m, (h, r) in per_row.items()}
    return {
        "chains": len(chains), "positions": int(report.sum()), "dev_positions": int(tune_rows.sum()), "K": K, "k": k,
        "table": {"domain": table.domain, "version": int(table.version)}, "tokenizer_hash": tok_hash,
        "recall": recall, "recall_at_K": recall[str(K)], "methods": methods,
        "full_vocab_accuracy": methods["full_vocab"]["accuracy"],
        "lambda": 0.0, "lambda_tuned_on": tuned_on, "lambda_grid": [],
        "by_tag": {name: block(report & (data["tag"] == code)) for code, name in TAG_GROUPS.items()},
        "by_position": {bucket_name(lo, hi): block(report & (data["position"] >= lo) & (hi is None or data["position"] <= hi))
                        for lo, hi in BUCKETS},
        "seconds": round(time.perf_counter() - start, 3),
    }


def _markdown(results: dict) -> str:
    """eval.md: overview, recall, λ grid and the breakdowns as Markdown tables."""
    r = results
    lines = [f"# Next-token evaluation — {r['table']['domain']} v{r['table']['version']}", "",
             f"{r['chains']} chains, {r['positions']} reported target positions (tool results excluded), "
             f"K={r['K']}, k={r['k']}, λ={r['lambda']} tuned on {r['dev_positions']} {r['lambda_tuned_on']} positions.", "",
             "| method | accuracy@1 | MRR |", "|---|---|---|"]
    lines += [f"| {METHODS[m]} | {v['accuracy']:.4f} | {v['mrr']:.4f} |" for m, v in r["methods"].items()]
    present = {m: METHODS[m] for m in r["methods"]}
    lines += ["", f"Table recall@K (the overlay's ceiling): recall@{r['K']} = {r['recall_at_K']:.4f}", "",
              "| K | " + " | ".join(r["recall"]) + " |", "|---|" + "---|" * len(r["recall"]),
              "| recall | " + " | ".join(f"{v:.4f}" for v in r["recall"].values()) + " |", "",
              "| λ | dev accuracy@1 | dev MRR |", "|---|---|---|"]
    lines += [f"| {g['lambda']} | {g['dev_accuracy']:.4f} | {g['dev_mrr']:.4f} |" for g in r["lambda_grid"]]
    for title, groups in (("By tag (accuracy@1)", r["by_tag"]), ("By position (accuracy@1)", r["by_position"])):
        lines += ["", f"## {title}", "", "| group | n | " + " | ".join(present.values()) + " |",
                  "|---|---|" + "---|" * len(present)]
        lines += [f"| {g} | {v['n']} | " + " | ".join(f"{v[m]['accuracy']:.4f}" for m in present) + " |"
                  for g, v in groups.items()]
    return "\n".join(lines) + "\n"


def _bar_plot(groups: dict, title: str, path: Path) -> None:
    """Grouped bars: accuracy@1 per group for each method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    names = list(groups)
    methods = {m: label for m, label in METHODS.items() if m in next(iter(groups.values()))}
    width = 0.8 / len(methods)
    for i, (m, label) in enumerate(methods.items()):
        ax.bar(np.arange(len(names)) + i * width, [groups[g][m]["accuracy"] for g in names], width, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(methods) - 1) / 2, [f"{g}\n(n={groups[g]['n']})" for g in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy@1")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _recall_plot(results: dict, path: Path) -> None:
    """Table recall@K against K (log scale), with the overlay accuracies as reference lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ks = [int(c) for c in results["recall"]]
    ax.plot(ks, list(results["recall"].values()), marker="o", label="table recall@K")
    for m in [m for m in ("overlay", "overlay_mixed", "full_vocab") if m in results["methods"]]:
        ax.axhline(results["methods"][m]["accuracy"], linestyle="--", linewidth=1, label=f"{METHODS[m]} acc@1",
                   color={"overlay": "C1", "overlay_mixed": "C2", "full_vocab": "C3"}[m])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(c) for c in ks])
    ax.set_ylim(0, 1)
    ax.set_xlabel("K")
    ax.set_ylabel("fraction of targets")
    ax.set_title("Candidate recall (the overlay's ceiling)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write eval.json, eval.md and three PNG plots (accuracy by tag, by position, recall@K) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "accuracy_by_tag.png", out / "accuracy_by_position.png",
             out / "recall_at_k.png"]
    paths[0].write_text(json.dumps(results, indent=2))
    paths[1].write_text(_markdown(results))
    _bar_plot(results["by_tag"], "Accuracy@1 by step tag", paths[2])
    _bar_plot(results["by_position"], "Accuracy@1 by token position", paths[3])
    _recall_plot(results, paths[4])
    return paths
