"""The logic behind the Langflow nodes in ``components/overlay``: settings, node specs, caching, readable errors.

Langflow executes a node's source from the flow JSON, so component files stay thin and call these helpers;
everything here is plain library code, tested without Langflow. Empty node fields fall back to environment
variables (``OVERLAY_DOMAIN``, ``OVERLAY_MODEL_DIR``, ``OVERLAY_REDIS_URL``) so shipped flows run unchanged
on any deployment.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import redis

from overlay import store
from overlay import table as tbl
from overlay.accumulator import ScoreAccumulator, SessionStore, TraceStep
from overlay.router import ChainCheck, parse_steps, verify_check
from overlay.tools import calc, run_tool_call

ENV_DOMAIN = "OVERLAY_DOMAIN"
ENV_MODEL_DIR = "OVERLAY_MODEL_DIR"
ENV_REDIS_URL = store.ENV_URL
SPEC_NODES = {"table": "GetNeighbours", "selector": "IT-LM Selector", "accumulator": "Accumulator",
              "router": "Tag Router"}
ROUTED_TAGS = ("THOUGHT", "ACTION", "CHECK")
NODE_CHAIN_PREFIX = "ovl:node-chain:"
MAX_CONTEXT_CHARS = 20_000
MAX_DECODERS = 8
SERVE_PROTOCOL = "lfx.serve"
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>$&~])")
VERDICT_MARKS = {"pass": "✓ pass", "fail": "✗ fail", "unverifiable": "? unverifiable"}

_cache_lock = threading.Lock()
_load_locks: dict[str, threading.Lock] = {}
_selectors: dict[str, LoadedSelector] = {}
_decoders: OrderedDict[tuple, Any] = OrderedDict()
_decoder_locks: dict[tuple[str, str], threading.Lock] = {}
_verifiers: dict[str, tuple[tuple, Any]] = {}


class NodeError(ValueError):
    """A short, readable failure shown in the node and in REST responses, never a traceback."""


HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (store.StoreUnavailable, f"check the node's Redis URL or {ENV_REDIS_URL}"),
    (tbl.TableNotFound, "build one with the Table Builder node or `overlay table build`"),
    (FileNotFoundError, f"check the node's Model Folder or {ENV_MODEL_DIR}"),
)


def message_for(exc: BaseException) -> str:
    """One line saying what went wrong and, for the common cases, what to do about it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    hint = next((h for kind, h in HINTS if isinstance(exc, kind)), "")
    return f"{text} ({hint})" if hint else text


@dataclass
class Outcome:
    """What ``readable_errors`` did with a failure: ``failed`` when it stopped the node instead of raising."""

    failed: bool = False
    message: str = ""


def served_by_lfx() -> bool:
    """True inside a flow run that `lfx serve` started (it answers every failure with a traceback in `logs`)."""
    from lfx.observability import get_execution_protocol

    return get_execution_protocol() == SERVE_PROTOCOL


@contextmanager
def readable_errors(node: Any = None) -> Iterator[Outcome]:
    """Re-raise the library's expected failures as one-line NodeErrors (bugs keep their traceback).

    Under `lfx serve` the line goes to stderr (the response's `logs`) and ``node``'s outputs are stopped instead,
    so the request fails (HTTP 500, `result` "No response generated") without a traceback in the response.
    """
    outcome = Outcome()
    try:
        yield outcome
    except NodeError as exc:
        error = exc
    except (ValueError, tbl.TableNotFound, OSError, RuntimeError, redis.exceptions.RedisError) as exc:
        error = NodeError(message_for(exc))
    else:
        return
    if node is None or node.get_vertex() is None or not served_by_lfx():
        raise error from None
    outcome.failed, outcome.message = True, str(error)
    print(f"{node.display_name}: {error}", file=sys.stderr)
    node.status = outcome.message
    for output in node.outputs:
        node.stop(output.name)


def setting(value: str | None, env: str, what: str) -> str:
    """The node's field when filled, else the environment variable ``env``; a NodeError naming both otherwise."""
    text = (value or "").strip() or os.environ.get(env, "").strip()
    if not text:
        raise NodeError(f"no {what} given: fill the node's {what.title()} field or set {env}")
    return text


def connect(redis_url: str | None) -> Any:
    """A checked Redis client for the node's URL (empty: $OVERLAY_REDIS_URL, else the embedded server)."""
    return store.connect((redis_url or "").strip() or None)


def make_spec(kind: str, **fields: Any) -> dict[str, Any]:
    """The payload a node hands the Overlay Decoder: its settings, tagged with the kind of node it came from."""
    return {"kind": f"overlay.{kind}", **fields}


def read_spec(value: Any, kind: str) -> dict[str, Any]:
    """Check that a decoder input carries the spec output of the right node; return its settings ({} if unwired)."""
    if value is None or value == "":
        return {}
    data = getattr(value, "data", value)
    if not isinstance(data, Mapping) or data.get("kind") != f"overlay.{kind}":
        got = data.get("kind", "something else") if isinstance(data, Mapping) else type(data).__name__
        raise NodeError(f"the {kind} input takes the '{kind.title()}' output of the {SPEC_NODES[kind]} node, not {got}")
    return {k: v for k, v in data.items() if k != "kind"}


def open_table(redis_url: str | None, domain: str | None, version: int = 0) -> tbl.SemanticTable:
    """The domain's table (its active version when ``version`` is 0) on the node's Redis."""
    name = setting(domain, ENV_DOMAIN, "domain")
    return tbl.SemanticTable(connect(redis_url), name, version or None)


def table_spec(redis_url: str | None, domain: str | None, k: int) -> tuple[dict[str, Any], str]:
    """Check the table exists and return the decoder's table spec with a status line."""
    if k < 1:
        raise NodeError(f"Candidates (K) must be at least 1, got {k}")
    table = open_table(redis_url, domain)
    info = table.info()
    spec = make_spec("table", domain=table.domain, redis_url=(redis_url or "").strip(), k_candidates=k)
    contexts = info.get("contexts", "?")
    return spec, f"table {table.domain} v{table.version}: {contexts} contexts, order ≤ {table.max_order}, K={k}"


def domain_options(redis_url: str | None) -> list[str]:
    """Domains with a complete table (an active version) on the node's Redis, for the Domain dropdown."""
    client = connect(redis_url)
    return [d for d in tbl.list_domains(client) if tbl.active_version(client, d) is not None]


def model_options(home: Path | None = None) -> list[str]:
    """Selector folders under the data directory (``<data dir>/models/*`` holding config.json), for Model Folder."""
    from overlay.selector import CONFIG_FILE

    root = (home or store.data_dir()) / "models"
    found = root.glob("*") if root.is_dir() else ()
    return sorted(str(p) for p in found if (p / CONFIG_FILE).is_file() and ".tmp-" not in p.name
                  and ".old-" not in p.name)


def fill_options(build_config: Any, field_value: Any, field_name: str | None) -> Any:
    """Langflow's refresh of Domain, Model Folder or Control Folder: offer what exists (typed text still works)."""
    if field_name in build_config:
        build_config[field_name]["value"] = field_value
    with readable_errors():
        if field_name == "domain" and "domain" in build_config:
            url = (build_config.get("redis_url") or {}).get("value")
            build_config["domain"]["options"] = domain_options(url if isinstance(url, str) else None)
        elif field_name in ("model_dir", "control_dir") and field_name in build_config:
            build_config[field_name]["options"] = model_options()
    return build_config


@dataclass
class NeighbourRows:
    """GetNeighbours' answer as table rows, with a status line for the node."""

    rows: list[dict[str, Any]]
    context_ids: list[int]
    order: int
    status: str


def neighbours_for_text(redis_url: str | None, domain: str | None, context: str | None, k: int,
                        version: int = 0) -> NeighbourRows:
    """Tokenise ``context`` with the table's tokenizer and list up to k candidates, best first."""
    from overlay.tokenizer import encode

    if k < 1:
        raise NodeError(f"Candidates (K) must be at least 1, got {k}")
    text = context or ""
    if len(text) > MAX_CONTEXT_CHARS:
        raise NodeError(f"the context is {len(text)} characters long (limit {MAX_CONTEXT_CHARS}); "
                        "only its last tokens are looked up, so pass its end")
    table = open_table(redis_url, domain, version)
    tok = table.tokenizer()
    ids = encode(tok, text)
    nb = table.neighbours(ids, k)
    rows = [
        {"rank": rank, "token": tok.convert_ids_to_tokens(i), "token_id": i, "weight": round(w, 6), "count": c,
         "order": o}
        for rank, (i, w, c, o) in enumerate(zip(nb.ids, nb.weights, nb.counts, nb.orders), 1)
    ]
    where = "empty context: unigram top-K" if not ids else f"{len(ids)} context tokens, order used {nb.order}"
    return NeighbourRows(rows, ids, nb.order, f"{len(rows)} candidates from {table.domain} v{table.version} ({where})")


@dataclass
class TrackRows:
    """GetTracks' answer: one row per retrieved track, the chooser's verdict as chat Markdown, and a status line."""

    rows: list[dict[str, Any]]
    chat: str
    status: str


def track_verdict(found: Any, best: Any, threshold: float) -> str:
    """What the chooser does with one retrieved track: followed, refused (unfollowable or p below the threshold), or
    not chosen (acceptable, but another track is more probable)."""
    if best is not None and found.track.id == best.track.id:
        return "followed"
    return "refused" if found.answer is None or found.p < threshold else "not chosen"


def refusal(found: list[Any], threshold: float) -> str:
    """Why the chooser followed none of the retrieved tracks: the best followable one's p is below the threshold, or
    none can be followed with this question's numbers."""
    followable = [r.p for r in found if r.answer is not None]
    if not followable:
        return f"none of the {len(found)} retrieved tracks can be followed with this question's numbers"
    return f"the chooser refuses all {len(found)} retrieved tracks (best p {max(followable):.3f} < {threshold:g})"


def tracks_chat(found: list[Any], best: Any, threshold: float, steps: list[tuple[str, str]]) -> str:
    """GetTracks for a chat window: the chooser's verdict, the followed track's chain with this question's numbers,
    then one line per retrieved track."""
    if best is not None:
        lines = [f"**Follows track {best.rank + 1}: answer {md_escape(str(best.answer))}** (p {best.p:.3f} ≥ "
                 f"{threshold:g}, similarity {best.similarity:.3f}, binding {best.binding.confidence:.2f})", "",
                 f"Track question: {md_escape(best.track.question)}", ""]
        previous = ""
        for tag, text in steps:
            lines.append(step_line(tag.strip("<>"), text, previous, None))
            previous = tag.strip("<>")
    elif found:
        lines = [f"**No track followed**: {refusal(found, threshold)}; the table and the selector decode alone"]
    else:
        lines = ["**No track found**: no word of the question routes into the track memory; the table and the "
                 "selector decode alone"]
    if found:
        lines += ["", "Retrieved tracks:", ""]
        lines += [f"{r.rank + 1}. {track_verdict(r, best, threshold)}: similarity {r.similarity:.3f}, binding "
                  f"{r.binding.confidence:.2f}, answer {md_escape(str(r.answer))}, p {r.p:.3f} — "
                  f"{md_escape(r.track.question)}" for r in found]
    return "\n".join(lines)


def tracks_for_question(redis_url: str | None, domain: str | None, question: str | None, k: int,
                        version: int = 0) -> TrackRows:
    """GetTracks on the track memory stored with the table: the top-k tracks for a question, bound to its numbers,
    each followed with the calculator and scored by the chooser, and the chain the chooser would follow."""
    from overlay.roles import execute, question_numbers
    from overlay.tracks import open_tracks

    if k < 1:
        raise NodeError(f"Tracks (K) must be at least 1, got {k}")
    text = (question or "").strip()
    if not text:
        raise NodeError("the question is empty: give the question to route into a track")
    if len(text) > MAX_CONTEXT_CHARS:
        raise NodeError(f"the question has {len(text)} characters; the limit is {MAX_CONTEXT_CHARS}")
    table = open_table(redis_url, domain, version)
    memory = open_tracks(table)
    if memory is None:
        raise NodeError(f"table {table.domain} v{table.version} has no track memory: rebuild it with the Table Builder "
                        "node or `overlay table build` (tracks are stored with the table)")
    best, found = memory.choose(text, k)
    threshold = memory.chooser.threshold
    steps = execute(best.track.chain, best.binding, question_numbers(text))[1] if best is not None else []
    rows = [{"rank": r.rank + 1, "similarity": round(r.similarity, 4), "binding": round(r.binding.confidence, 4),
             "answer": r.answer, "p": round(r.p, 4), "verdict": track_verdict(r, best, threshold), "track": r.track.id,
             "question": r.track.question} for r in found]
    verdict = f"follows track {best.rank + 1} (p {best.p:.3f})" if best is not None else "refuses every track"
    status = f"{len(rows)} tracks from {table.domain} v{table.version}; the chooser {verdict}"
    return TrackRows(rows, tracks_chat(found, best, threshold, steps), status)


@dataclass
class LoadedSelector:
    """A selector loaded by a node: model, tokenizer, the file fingerprint it was loaded from, the load time, and the
    question-aware scorer the Choice output builds on first use."""

    model: Any
    tokenizer: Any
    fingerprint: tuple
    seconds: float
    scorer: Any = None


def quiet_progress() -> None:
    """Silence transformers' and huggingface_hub's progress bars and info logs (they end up in REST responses)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()


def fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of the files a load reads (config, weights, tokenizer, domain adapters): changes when the
    model or an adapter is retrained."""
    from overlay.selector import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_INDEX

    files = [folder / CONFIG_FILE, folder / TOKENIZER_FILE, folder / WEIGHTS_INDEX,
             *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("adapters/*/*"))]
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())


def shared_selector(folder: str, on_load: Callable[[str], None] | None = None) -> tuple[LoadedSelector, bool]:
    """A selector folder's model, loaded once per process (again only when its files change); and whether this call
    loaded it. ``on_load`` is told before a load starts. The Selector node and the decoder share what it returns."""
    from overlay.selector import check_model_folder, load_selector

    path = check_model_folder(Path(folder).expanduser()).resolve()
    key = str(path)
    with _cache_lock:
        lock = _load_locks.setdefault(key, threading.Lock())
    with lock:
        stamp = fingerprint(path)
        found = _selectors.get(key)
        if found is not None and found.fingerprint == stamp:
            return found, False
        if on_load is not None:
            on_load(f"loading selector {path.name} (once per server process)…")
        quiet_progress()
        start = time.perf_counter()
        model, tok = load_selector(path)
        adapters = sorted(p.parent.name for p in path.glob("adapters/*/adapter_config.json"))
        if adapters:  # every domain adapter on the one base, none merged: decoders fold in their domain's
            from overlay.train import load_adapters

            model = load_adapters(path, adapters)
        _selectors[key] = LoadedSelector(model, tok, stamp, time.perf_counter() - start)
        return _selectors[key], True


def selector_spec(model_dir: str | None, temperature: float, top_p: float, seed: int, mix: float = 0.0,
                  on_load: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """Check the sampling settings and load the model into the shared cache (the decoder reuses it)."""
    folder = setting(model_dir, ENV_MODEL_DIR, "model folder")
    check_sampling(temperature, top_p)
    loaded, fresh = shared_selector(folder, on_load)
    config = loaded.model.config
    reads = (f"window k={config.window}" if hasattr(config, "window")
             else f"question + last {getattr(config, 'attn_span', '?')} tokens")
    spec = make_spec("selector", model_dir=folder, temperature=float(temperature), top_p=float(top_p), seed=int(seed),
                     mix=float(mix))
    state = f"loaded in {loaded.seconds:.1f} s" if fresh else "already loaded"
    return spec, f"selector {Path(folder).name} ({state}): {reads}, temperature {temperature}, top-p {top_p}"


def check_sampling(temperature: float, top_p: float) -> None:
    """Reject sampling settings that cannot work, naming the field."""
    if temperature < 0:
        raise NodeError(f"Temperature must be ≥ 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise NodeError(f"Top-p must be in (0, 1], got {top_p}")


def candidate_ids(candidates: Any) -> tuple[list[int], list[float], list[int]]:
    """Token ids, table weights and orders from GetNeighbours' Candidates (a DataFrame or a list of rows)."""
    if candidates is None or (isinstance(candidates, str) and not candidates):
        raise NodeError("no candidates: connect the Candidates output of a GetNeighbours node")
    is_frame = hasattr(candidates, "to_dict") and hasattr(candidates, "columns")
    records = candidates.to_dict("records") if is_frame else candidates
    rows = [getattr(r, "data", r) for r in (records if isinstance(records, list) else [records])]
    if not rows or not all(isinstance(r, Mapping) and "token_id" in r for r in rows):
        raise NodeError("the candidates must be GetNeighbours rows with a token_id column")
    return ([int(r["token_id"]) for r in rows], [float(r.get("weight", 0.0)) for r in rows],
            [int(r.get("order", 0)) for r in rows])


def candidate_logits(loaded: LoadedSelector, context_ids: list[int], ids: list[int]) -> Any:
    """The selector's logits for table candidates after a context, read as the decoder reads it: a window selector
    sees the last k tokens; a question-aware one holds the ``<Q> …`` prompt as its question, the rest as the chain."""
    import torch

    from overlay.chains import BOS, Q, SPECIAL_TOKENS, STEP_TAGS
    from overlay.dataset import window_of

    model = loaded.model
    if hasattr(model, "score"):
        window = window_of(context_ids, len(context_ids), int(getattr(model.config, "window", 8)))
        device = next(model.parameters()).device
        return model.score(torch.tensor([window], device=device), torch.tensor([ids], device=device))[0].float().cpu()
    if not context_ids or context_ids[0] != SPECIAL_TOKENS.index(Q):
        raise NodeError("this selector reads the question: start the context with <Q> and the question")
    if loaded.scorer is None:
        from overlay.selector import QAScorer
        from overlay.selector.state import NumberSpans, token_texts

        loaded.scorer = QAScorer(model, NumberSpans(token_texts(loaded.tokenizer)))
    tags = {SPECIAL_TOKENS.index(tag) for tag in STEP_TAGS}
    split = next((i for i, t in enumerate(context_ids) if t in tags), len(context_ids))
    memory = loaded.scorer.start(context_ids[:split])
    loaded.scorer.feed(memory, [SPECIAL_TOKENS.index(BOS), *context_ids[split:]])
    return torch.from_numpy(loaded.scorer.scores(memory, ids)[0]).float()


def choose(folder: str | None, context: str | None, candidates: Any, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, mix: float = 0.0) -> tuple[dict[str, Any], str]:
    """Score the candidates after the context with the selector and pick one with the decoder's sampler.

    ``mix`` adds that multiple of each candidate's table weight to its log-prob before choosing, as the decoder does.
    """
    import torch

    from overlay.decode import choose_index
    from overlay.tokenizer import encode

    check_sampling(temperature, top_p)
    ids, weights, orders = candidate_ids(candidates)
    loaded, _ = shared_selector(setting(folder, ENV_MODEL_DIR, "model folder"))
    tok = loaded.tokenizer
    vocab = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise NodeError(f"candidate ids {bad[:5]} are outside the selector's vocabulary ({vocab}): "
                        "the table and the model use different tokenizers")
    context_ids = encode(tok, (context or "")[-MAX_CONTEXT_CHARS:])
    logits = candidate_logits(loaded, context_ids, ids)
    logprobs = torch.log_softmax(logits, -1)
    adjusted = logprobs + mix * torch.tensor(weights) if mix else logprobs
    pick = choose_index(adjusted, temperature, top_p, seed, len(context_ids))
    others = torch.cat([adjusted[:pick], adjusted[pick + 1:]])
    margin = float(adjusted[pick] - others.max()) if len(others) else 0.0
    token = tok.convert_ids_to_tokens(ids[pick])
    choice = {
        "token": token, "token_id": ids[pick], "rank": pick + 1, "score": float(logprobs[pick]), "margin": margin,
        "table_weight": weights[pick], "order_used": orders[pick], "context_ids": context_ids,
        "candidates": [{"token_id": i, "token": tok.convert_ids_to_tokens(i), "logit": round(float(lg), 6),
                        "prob": round(math.exp(float(lp)), 6)} for i, lg, lp in zip(ids, logits, logprobs)],
    }
    prob = math.exp(choice["score"])
    return choice, f"chose {token!r} (candidate {pick + 1} of {len(ids)}, p={prob:.3f}, margin {margin:.2f})"


def accumulator_spec(max_tokens: int, min_mean_logprob: float, state_ttl: int) -> tuple[dict[str, Any], str]:
    """Check the stop rules and return the decoder's accumulator spec with a status line."""
    if max_tokens < 1:
        raise NodeError(f"Max Tokens must be at least 1, got {max_tokens}")
    if state_ttl < 1:
        raise NodeError(f"State TTL must be at least 1 second, got {state_ttl}")
    spec = make_spec("accumulator", max_tokens=int(max_tokens), min_mean_logprob=float(min_mean_logprob),
                     state_ttl=int(state_ttl))
    floor = f", stop below mean log-prob {min_mean_logprob}" if min_mean_logprob < 0 else ""
    return spec, f"stop after {max_tokens} tokens{floor}; chain state kept {state_ttl} s"


def summary(acc: ScoreAccumulator) -> dict[str, Any]:
    """The accumulator's totals as plain data: score, per-token mean, perplexity, tag counts, stop reason."""
    return {"tokens": acc.tokens, "scored_tokens": acc.scored_tokens, "log_score": acc.log_score,
            "mean_logprob": acc.mean_logprob, "perplexity": acc.perplexity if math.isfinite(acc.perplexity) else None,
            "tag_counts": dict(acc.tag_counts), "stop_reason": acc.stop_reason}


def accumulate(choice: Any, chain_id: str | None, redis_url: str | None, max_tokens: int,
               min_mean_logprob: float, state_ttl: int) -> tuple[dict[str, Any], str]:
    """Add the Selector's choice to the chain's running score (kept in Redis with a TTL) and report the totals.

    A chain id keeps only the running sums (overwritten, fixed size) and appends the new trace step to the chain's
    capped trace stream, so what a run reads and writes does not grow with the chain (``SessionStore.append``).
    """
    accumulator_spec(max_tokens, min_mean_logprob, state_ttl)
    data = getattr(choice, "data", choice) if choice not in (None, "") else None
    if data is not None and not (isinstance(data, Mapping) and "token_id" in data and "score" in data):
        raise NodeError("the choice input takes the Choice output of the IT-LM Selector node")
    sid = (chain_id or "").strip()
    sessions = SessionStore(connect(redis_url), prefix=NODE_CHAIN_PREFIX) if sid else None
    state = sessions.load(sid) if sessions else None
    acc = ScoreAccumulator.from_dict(state) if state else ScoreAccumulator()
    if data is not None:
        acc.stop_reason = None
        acc.add(TraceStep(position=acc.tokens, token_id=data["token_id"], token=str(data.get("token", "")), tag="",
                          candidates=[c["token_id"] for c in data.get("candidates", [])],
                          chosen_rank=int(data.get("rank", 1)) - 1, score=data["score"], margin=data.get("margin", 0.0),
                          table_weight=data.get("table_weight", 0.0), order_used=data.get("order_used", 0)))
        acc.should_stop(max_tokens, min_mean_logprob if min_mean_logprob < 0 else None)
    if sessions:
        sessions.append(sid, acc.to_dict(trace=False), [], [asdict(s) for s in acc.steps], ttl_s=state_ttl)
    totals = summary(acc) | {"chain_id": sid or None}
    where = f"chain {sid}" if sid else "no chain id, not kept"
    stop = f", stop: {acc.stop_reason}" if acc.stop_reason else ""
    scores = f"log-score {acc.log_score:.3f}, mean {acc.mean_logprob:.3f}"
    return totals, f"{acc.tokens} tokens, {scores} ({where}{stop})"


@dataclass
class Routed:
    """A chain split by tag: the text each routed output carries, and what the router did."""

    texts: dict[str, str] = field(default_factory=dict)
    status: str = ""


def route(chain: str | None, run_tools: bool = True, verify: bool = True) -> Routed:
    """Split a chain (or one step) into THOUGHT / ACTION / CHECK text; run ACTION tools and verify CHECK claims."""
    steps = parse_steps(chain or "")
    if not steps:
        raise NodeError("the chain is empty: give a chain or a step such as '<ACTION> CALL calc(48/2)'")
    lines: dict[str, list[str]] = {tag: [] for tag in ROUTED_TAGS}
    for step in steps:
        if step.tag == "ACTION":
            result = run_tool_call(step.text) if run_tools else None
            shown = "" if result is None else f" -> {result.output}" if result.ok else f" -> error: {result.error}"
            lines["ACTION"].append(step.text + shown)
        elif step.tag == "CHECK":
            verdict = verify_check(step.text) if verify else None
            lines["CHECK"].append(step.text + ("" if verdict is None else f" -> {verdict[0]}: {verdict[1]}"))
        elif step.tag == "THOUGHT":
            lines["THOUGHT"].append(step.text)
    counts = ", ".join(f"{len(v)} {k}" for k, v in lines.items())
    other = sum(1 for s in steps if s.tag not in ROUTED_TAGS)
    return Routed({tag: "\n".join(v) for tag, v in lines.items()}, f"{counts}; {other} other step(s)")


def router_spec(max_step_repeats: int) -> tuple[dict[str, Any], str]:
    """The decoder's router spec: the tools ACTION steps can call, and when a repeated step stops the chain."""
    from overlay.tools import available_tools

    if max_step_repeats < 1:
        raise NodeError(f"Max Step Repeats must be at least 1, got {max_step_repeats}")
    tools = sorted(available_tools())
    spec = make_spec("router", max_step_repeats=int(max_step_repeats), tools=tools)
    return spec, f"tools: {', '.join(tools)}; stop when a step repeats {max_step_repeats} times"


def evaluate_expression(expression: str | None) -> tuple[dict[str, str], str]:
    """Evaluate an arithmetic expression with the safe calculator (also accepts 'CALL calc(...)')."""
    text = (expression or "").strip()
    if not text:
        raise NodeError("the expression is empty: give arithmetic such as 48/2 + 3")
    if text.upper().startswith("CALL ") or text.lower().startswith("calc("):
        result = run_tool_call(text)
        if not result.ok:
            raise NodeError(result.error or "calc failed")
        value = result.output
    else:
        value = calc(text)
    return {"expression": text, "result": value}, f"{text} = {value}"


@dataclass
class Decoded:
    """The Chain Decoder's outputs: the chain as chat Markdown, the raw chain, the trace as JSON, and a status line."""

    chat: str
    chain: str
    trace_json: str
    status: str


def md_escape(text: str) -> str:
    """``text`` with the characters a Markdown chat would take for HTML, emphasis, code, math or links escaped."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", text)


def step_line(tag: str, text: str, previous: str, verdict: Mapping[str, str] | None) -> str:
    """One chain step as a Markdown list item: its tag in bold, shown literally; tool results and verdicts marked."""
    body = md_escape(text)
    if tag == "RESULT" and previous == "ACTION" and text.startswith("error:"):
        body = f"⚠ tool error: {md_escape(text.removeprefix('error:').strip())}"
    elif tag == "RESULT" and previous == "ACTION":
        body = f"**{body}** (tool result)"
    elif tag == "CHECK" and verdict is not None:
        mark = VERDICT_MARKS.get(verdict["verdict"], md_escape(verdict["verdict"]))
        body = f"{body} → {mark} ({md_escape(verdict['reason'])})"
    return f"- **{md_escape(f'<{tag}>')}** {body}" if tag else f"- {body}"


def chat_text(result: Any) -> str:
    """A decoded chain as Markdown for a chat window: the answer first (with the verifier's verdict when one read the
    chain, and saying when its checks failed), then one line per step with its tag shown (a Markdown chat takes a bare
    `<THOUGHT>` for HTML and `*` for emphasis), tool results and CHECK verdicts marked."""
    recorded = result.trace.get("check")
    line = (ChainCheck.from_dict(recorded) if recorded else ChainCheck.of(result.verdicts)).line()
    checked = f" — {md_escape(line)}" if line else ""
    answer = f"**Answer: {md_escape(result.answer)}{checked}**" if result.answer is not None else "**No answer**"
    lines = [answer, ""]
    verdicts = iter(result.verdicts)
    previous = ""
    for step in result.steps:
        tag, text = step["tag"], step["text"]
        if tag not in ("Q", "EOS"):
            lines.append(step_line(tag, text, previous, next(verdicts, None) if tag == "CHECK" else None))
        previous = tag
    lines += ["", f"stop: {md_escape(result.stop_reason)} after {result.tokens} tokens"]
    if result.errors:
        lines += ["", "⚠ " + md_escape("; ".join(result.errors))]
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Plain JSON data from dataclasses, mappings, sequences and numbers (numpy/torch scalars included)."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def decode_settings(table: Any, selector: Any, accumulator: Any, router: Any,
                    max_question_chars: int) -> dict[str, Any]:
    """Merge the wired nodes' specs into load_decoder's arguments; unwired optional nodes keep the defaults."""
    tspec, sspec = read_spec(table, "table"), read_spec(selector, "selector")
    aspec, rspec = read_spec(accumulator, "accumulator"), read_spec(router, "router")
    if not tspec:
        raise NodeError("connect the Table output of a GetNeighbours node to the decoder's Table input")
    if not sspec:
        raise NodeError("connect the Selector output of an IT-LM Selector node to the decoder's Selector input")
    if max_question_chars < 1:
        raise NodeError(f"Max Question Length must be at least 1, got {max_question_chars}")
    floor = aspec.get("min_mean_logprob", 0.0)
    config = {"k_candidates": tspec.get("k_candidates"), "temperature": sspec.get("temperature"),
              "top_p": sspec.get("top_p"), "seed": sspec.get("seed"), "mix": sspec.get("mix"),
              "max_tokens": aspec.get("max_tokens"), "min_mean_logprob": floor if floor < 0 else None,
              "session_ttl_s": aspec.get("state_ttl"), "max_step_repeats": rspec.get("max_step_repeats"),
              "max_question_chars": max_question_chars}
    return {"domain": tspec["domain"], "model_dir": sspec["model_dir"], "redis_url": tspec.get("redis_url") or None,
            "config": {k: v for k, v in config.items() if v is not None}}


def node_decoder(domain: str, model_dir: str, redis_url: str | None,
                 config: Mapping[str, Any]) -> tuple[Any, threading.Lock]:
    """A decoder over the domain's active table and the shared selector with the domain's LoRA adapter when the
    folder has one (kept per settings, table version and model files), with the lock its domain and model share:
    decoders of other domains or models run in parallel, and switching domains reloads nothing."""
    from overlay.decode import DecodeConfig, OverlayDecoder, adapter_for
    from overlay.tokenizer import check_tokenizers

    loaded, _ = shared_selector(model_dir)
    client = connect(redis_url)
    model_key = str(Path(model_dir).expanduser().resolve())
    version = tbl.active_version(client, domain)
    key = (domain, version, redis_url or "", model_key, loaded.fingerprint, tuple(sorted(config.items())))
    with _cache_lock:
        decoder = _decoders.get(key)
        if decoder is not None:
            _decoders.move_to_end(key)
    if decoder is None:
        table = tbl.SemanticTable(client, domain, version)
        check_tokenizers({f"table {domain!r} v{table.version}": table.meta.get("tokenizer_hash"),
                          f"model {model_dir}": loaded.tokenizer})
        decoder = OverlayDecoder(table, loaded.model, loaded.tokenizer, DecodeConfig(**config), SessionStore(client),
                                 adapter_for(model_dir, domain))
        with _cache_lock:
            _decoders[key] = decoder
            while len(_decoders) > MAX_DECODERS:
                _decoders.popitem(last=False)
    with _cache_lock:
        return decoder, _decoder_locks.setdefault((domain, model_key), threading.Lock())


def track_line(tracks: list[Mapping[str, Any]]) -> str:
    """The decoder's track in one line (which retrieved track it followed: rank, similarity, p, decisions; or that the
    chooser refused them all), so a chat shows whether the chain came from a track; empty when none was retrieved."""
    if not tracks:
        return ""
    row = next((t for t in tracks if t.get("followed")), None)
    if row is None:
        followable = [t["p"] for t in tracks if t.get("answer") is not None]
        why = (f"the chooser refused all {len(tracks)} retrieved tracks (best p {max(followable):.3f})" if followable
               else f"none of the {len(tracks)} retrieved tracks could be followed")
        return f"Track: {why}; the table and the selector decoded alone"
    left = ", then left it" if row.get("left_track") else ""
    return (f"Track: followed track {row['rank'] + 1} (similarity {row['similarity']:.3f}, p {row['p']:.3f}) for "
            f"{row['followed_decisions']} decisions{left}")


def vote_chat(vote: Any) -> str:
    """A vote as Markdown for a chat window: its summary, one line per chain, then the chosen chain (``chat_text``)."""
    lines = [f"**{md_escape(vote.summary())}**", ""]
    lines += [f"- {md_escape(vote.chain_line(i))}" for i in range(vote.samples)]
    return "\n".join(lines + ["", f"**Chosen chain ({vote.chosen})**", "", chat_text(vote.chain)])


def node_verifier(model_dir: str) -> Any:
    """The verifier saved beside a selector folder (``<model>/verifier``), loaded once per process and again when its
    files change; None when the folder has none."""
    from overlay.verifier import Verifier, verifier_dir

    folder = verifier_dir(Path(model_dir).expanduser().resolve())
    if not folder.exists():
        return None
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file())
    with _cache_lock:
        found = _verifiers.get(str(folder))
    if found is not None and found[0] == stamp:
        return found[1]
    verifier = Verifier.load(folder)
    with _cache_lock:
        _verifiers[str(folder)] = (stamp, verifier)
    return verifier


def decode_question(question: str | None, table: Any, selector: Any, accumulator: Any, router: Any,
                    chain_id: str | None, max_question_chars: int = 2000, samples: int = 1) -> Decoded:
    """Run the decoder for one question with the wired nodes' settings; the chain, its trace and a status line.

    With a chain id the chain's state is kept in Redis, so a chain cut by the token limit continues on the
    next call with the same id. With ``samples`` > 1 it decodes that many chains and answers by vote
    (``overlay.vote``): the chat shows the vote and the chosen chain, the trace carries the vote. When the selector
    folder has a verifier, every chain's check records its verdict and the chat shows it beside the answer.
    """
    from overlay.vote import check_samples, decode_voted

    check_samples(samples)
    sid = (chain_id or "").strip() or None
    if samples > 1 and sid:
        raise NodeError("a Chain ID continues one chain: clear it or set Samples to 1")
    args = decode_settings(table, selector, accumulator, router, max_question_chars)
    decoder, lock = node_decoder(args["domain"], args["model_dir"], args["redis_url"], args["config"])
    verifier = node_verifier(args["model_dir"])
    with lock:
        if samples > 1:
            result, vote = decode_voted(decoder, question or "", samples, verifier=verifier)
        else:
            result, vote = decoder.generate(question or "", sid), None
            if verifier is not None:
                verifier.check([result])
    payload = jsonable(result.to_dict() | ({"vote": vote.to_dict()} if vote else {}))
    status = (f"{result.tokens} tokens in {result.seconds:.2f} s, stop: {result.stop_reason}, "
              f"answer: {result.answer if result.answer is not None else 'none'}")
    if result.trace.get("check", {}).get("p") is not None:
        status += f" ({ChainCheck.from_dict(result.trace['check']).line()})"
    if vote is not None:
        status = f"{vote.summary()}; chosen chain: {status}"
    chat = vote_chat(vote) if vote is not None else chat_text(result)
    followed = track_line(result.tracks)
    if followed:
        chat, status = f"{chat}\n\n{md_escape(followed)}", f"{status}; {followed}"
    return Decoded(chat, result.text, json.dumps(payload, separators=(",", ":")), status)


def build_table_from_file(client: Any, path: str | Path, fmt: str, domain: str, *, max_order: int = 3,
                          vocab_size: int = 2000, limit: int | None = None) -> tuple[tbl.BuildStats, str]:
    """Build a new table version from a JSONL dataset; returns the build stats and the conversion summary."""
    from overlay.pipeline import build_table_from_file as build

    try:
        report, stats = build(client, path, fmt, domain, max_order=max_order, vocab_size=vocab_size, limit=limit)
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    return stats, report.summary()


def build_table_node(redis_url: str | None, path: str, fmt: str, domain: str | None, max_order: int, vocab_size: int,
                     limit: int) -> tuple[dict[str, Any], str]:
    """The Table Builder node's job: build from a file and report what was written."""
    if fmt not in ("gsm8k", "jsonl"):
        raise NodeError(f"Format must be gsm8k or jsonl, not {fmt!r}")
    if max_order < 1 or vocab_size < 20 or limit < 0:
        raise NodeError("Max Order must be ≥ 1, Vocabulary Size ≥ 20 and Limit ≥ 0 (0 = all records)")
    name = setting(domain, ENV_DOMAIN, "domain")
    file = Path(path)
    if not file.is_file():
        raise NodeError(f"dataset file not found: {file}")
    stats, converted = build_table_from_file(connect(redis_url), file, fmt, name, max_order=max_order,
                                             vocab_size=vocab_size, limit=limit or None)
    result = {"domain": name, "version": stats.version, "chains": stats.sequences, "tokens": stats.tokens,
              "contexts": stats.contexts, "entries": stats.entries, "seconds": round(stats.seconds, 3),
              "per_order": {str(k): v for k, v in stats.per_order.items()}, "conversion": converted}
    status = (f"built {name} v{stats.version}: {stats.sequences} chains, {stats.contexts} contexts "
              f"in {stats.seconds:.1f} s")
    return result, status


FEEDBACK_FIELDS = {"chain_id": str, "text": str, "verdict": str, "answer": str, "apply": bool}


def feedback_request(request: str | None) -> dict[str, Any]:
    """The fields of a JSON feedback request (what a REST call sends through the flow's Chat Input); {} if empty."""
    raw = (request or "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise NodeError('the feedback request must be a JSON object such as {"chain_id": "c1", "verdict": "correct"}')
    unknown = sorted(set(data) - set(FEEDBACK_FIELDS))
    if unknown:
        raise NodeError(f"unknown field(s) {', '.join(unknown)} in the feedback request; use {', '.join(FEEDBACK_FIELDS)}")
    for name, value in data.items():
        if value is not None and not isinstance(value, FEEDBACK_FIELDS[name]):
            raise NodeError(f"'{name}' in the feedback request must be a {FEEDBACK_FIELDS[name].__name__}, not {value!r}")
    if "chain_id" in data or "text" in data:  # the request names the chain: the node's chain fields step aside
        data = {"chain_id": None, "text": None} | data
    return data


def record_feedback(redis_url: str | None, domain: str | None, chain_id: str | None, chain_text: str | None,
                    verdict: str | None, answer: str | None, apply_now: bool,
                    request: str | None = None) -> tuple[dict[str, Any], str]:
    """The Chain Feedback node's job: append a verdict to the domain's feedback log and, if asked, apply the
    pending items as a new table version; ``request`` (JSON) replaces the node's fields it names."""
    from overlay.learn import append_feedback, apply_feedback, pending_feedback

    fields = {"chain_id": chain_id, "text": chain_text, "verdict": verdict, "answer": answer, "apply": apply_now}
    fields |= feedback_request(request)
    if not (fields["verdict"] or "").strip():
        raise NodeError("no verdict given: choose correct or wrong in the node's Verdict field (or send \"verdict\")")
    name = setting(domain, ENV_DOMAIN, "domain")
    client = connect(redis_url)
    entry = append_feedback(client, name, chain_id=fields["chain_id"], text=fields["text"] or None,
                            verdict=fields["verdict"], answer=fields["answer"])
    kind = fields["verdict"].strip().lower()
    result = {"domain": name, "recorded": entry, "verdict": kind, "chain_id": (fields["chain_id"] or "").strip() or None,
              "answer": " ".join((fields["answer"] or "").split()) or None, "applied": 0, "version": None}
    status = f"recorded {kind} as {entry} in {name}'s feedback log"
    if not fields["apply"]:
        pending = len(pending_feedback(client, name))
        return result | {"pending": pending}, f"{status}; {pending} pending (Apply Now or `overlay table learn {name}`)"
    try:
        report = apply_feedback(client, name)
    except (ValueError, tbl.TableNotFound, OSError, RuntimeError, redis.exceptions.RedisError) as exc:
        raise NodeError(f"{status}, but applying it failed: {message_for(exc)}") from None
    result |= {"applied": len(report.items), "version": report.version, "active": report.active,
               "pending": len(pending_feedback(client, name))}
    return result, f"{status}; {report.summary()}"
