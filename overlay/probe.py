"""Track probe: do held-out variants of trained chains make a trained selector "fall into" the chain's track?

A *track* is a chain template: a question and GSM8K-style solution lines with variable slots (``{name}``,
``{n1}``) and calculations ``<<{n1}/2=half>>`` that the calculator computes, binding ``half`` for later
lines. Variants swap slot values (numbers, names, entities) and vary the question's surface (synonyms,
reordered independent sentences); some variants are held out of training. The probe feeds each held-out
variant's prefix (question + first j steps) to the decoder, decodes greedily and checks whether the
continuation reproduces the variant's expected next m steps *modulo the slots* (every number is ``#``,
every slot word ``@``), for the model and a control model in the same run. Inside the model it compares
hidden states of variant and source at aligned tokens per layer and measures attention on anchor tokens
(tags, operators, numbers), drawing one "token → attention → embedding shift → output" figure per example.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from overlay.chains import ANSWER, EOS, Q, RESULT, SPECIAL_TOKENS, STEP_TAGS, Chain
from overlay.probe_report import example_figure, markdown, summary_figure
from overlay.variants import (UNIT, TrackLibrary, Variant, VariantConfig, VariantError, VariantSet,
                              generate_variants, library_from_gsm8k, load_library, skeleton, slot_words)

IDS = {tag: i for i, tag in enumerate(SPECIAL_TOKENS)}
STEP_IDS = frozenset(IDS[t] for t in STEP_TAGS)
OPERATORS = frozenset("+-*/=()x×÷%")
PROBE_EDITS = "numbers,names,entities,synonyms,reorder"  # steps keep their order and count: probed step by step


class ProbeError(ValueError):
    """Bad model, split or settings for the probe; the message says what and where."""


# ---------------------------------------------------------------------------------------------------------------
# Comparing chains modulo slots
# ---------------------------------------------------------------------------------------------------------------


def _same_unit(expected: str, got: str, words: frozenset[str]) -> bool:
    return expected == got or (expected == "#" and got[:1].isdigit()) or (expected == "@" and got in words)


def model_steps(text: str) -> list[tuple[str, str]]:
    """(tag, text) of the steps a model produces: tool <RESULT>s, <EOS> and <Q> left out; "" = text before a tag."""
    from overlay.router import parse_steps

    return [(s.tag, s.text) for s in parse_steps(text) if s.tag not in ("RESULT", "EOS", "Q")]


def split_chain(chain: Chain, j: int) -> tuple[str, str, int]:
    """(prefix, expected continuation, j used): the chain cut after its j-th model step and that step's <RESULT>.
    j is clipped so that at least one model step (the answer) is left to produce."""
    parts = [(s.tag, s.text) for s in chain.steps] + [(ANSWER, chain.answer)]
    n_model = sum(t != RESULT for t, _ in parts)
    j = max(0, min(j, n_model - 1))
    cut, seen = 0, 0
    while cut < len(parts) and (seen < j or (cut and parts[cut][0] == RESULT)):
        seen += parts[cut][0] != RESULT
        cut += 1
    prefix = f"{Q} {chain.question} " + "".join(f"{t} {x} " for t, x in parts[:cut])
    rest = "".join(f"{t} {x} " for t, x in parts[cut:]) + EOS
    return prefix, rest, j


def compare_steps(expected: str, generated: str, words: frozenset[str] = frozenset(), exact: bool = False,
                  numbers: frozenset[str] | None = None) -> tuple[int, int, dict | None]:
    """(steps followed, units followed, where it diverged or None) of a continuation against the expected one.

    Units are tags, words, numbers and symbols. Modulo slots, an expected slot number (one of ``numbers``, the
    variant's slot and computed values; every number when None) matches any number and an expected slot word
    (one of ``words``) any slot word; everything else must be equal. ``diverged``: step (offset after the
    prefix), expected tag, produced tag, unit index in the step (-1: the tag itself), expected and produced unit."""
    exp, gen = model_steps(expected), model_steps(generated)
    steps = units = 0
    for i, (tag, text) in enumerate(exp):
        if i >= len(gen):
            return steps, units, {"step": i, "tag": tag, "got_tag": None, "unit": -1, "expected": f"<{tag}>", "got": "(stopped)"}
        got_tag, got_text = gen[i]
        if got_tag != tag:
            got = f"<{got_tag}>" if got_tag else (got_text.split() or ["(nothing)"])[0]
            return steps, units, {"step": i, "tag": tag, "got_tag": got_tag, "unit": -1, "expected": f"<{tag}>", "got": got}
        eu, gu = skeleton(text, words, exact, numbers), skeleton(got_text, exact=True)
        same = next((n for n, (a, b) in enumerate(zip(eu, gu)) if not _same_unit(a, b, words)), min(len(eu), len(gu)))
        if same < len(eu) or same < len(gu):
            return steps, units + 1 + same, {"step": i, "tag": tag, "got_tag": got_tag, "unit": same,
                                             "expected": eu[same] if same < len(eu) else "(step end)",
                                             "got": gu[same] if same < len(gu) else "(step end)"}
        steps, units = steps + 1, units + 1 + len(eu)
    return steps, units, None


@dataclass
class Entry:
    """One probed continuation: did the model enter the track, how far it followed, where it left it."""

    track: str
    variant: int
    prefix_steps: int
    expected_steps: int
    followed_steps: int
    followed_units: int
    entered: bool
    exact_followed_steps: int
    exact_entered: bool
    diverged: dict | None
    stop_reason: str
    prefix: str
    continuation: str
    expected: str


def follow_tracks(decoder, variants: list[Variant], words: dict[str, frozenset[str]], j: int, m: int,
                  extra_tokens: int = 12) -> list[Entry]:
    """Decode every variant greedily from its prefix (question + first j steps), batched, each chain stopping as
    soon as a finished step leaves the track, at its end, or after its expected length + extra_tokens."""
    from overlay.decode import TAG_IDS
    from overlay.tokenizer import encode

    tok, texts = decoder.tokenizer, decoder.texts
    states, plans = [], []
    for v in variants:
        prefix, expected, used = split_chain(v.chain, j)
        states.append(decoder.state_from_prefix(prefix, v.chain.question))
        plans.append((prefix, expected, used, len(encode(tok, expected)) + extra_tokens, words.get(v.track, frozenset())))
    active = list(range(len(states)))
    while active:
        before = [len(states[i].ids) for i in active]
        decoder.step([states[i] for i in active])
        still = []
        for i, n in zip(active, before):
            s, (_, expected, _, budget, w) = states[i], plans[i]
            made = s.ids[s.prompt_len:]
            if s.acc.stop_reason:
                continue
            if len(made) >= budget:
                s.acc.stop_reason = "budget"
                continue
            if any(t in TAG_IDS for t in s.ids[n:]):  # a step closed (tool output may follow the tag)
                text = "".join(texts[t] for t in made)
                done, _, diverged = compare_steps(expected, text, w, numbers=variants[i].numbers)
                last_tag = next(t for t in reversed(made) if t in TAG_IDS)
                finished = len(model_steps(text)) - (last_tag not in (IDS[RESULT], IDS[EOS]))
                if diverged is not None and (diverged["step"] < finished or (diverged["unit"] == -1 and diverged["got_tag"])):
                    s.acc.stop_reason = "left track"
                    continue
                if done == len(model_steps(expected)):
                    s.acc.stop_reason = "track end"
                    continue
            still.append(i)
        active = still
    out = []
    for v, s, (prefix, expected, used, _, w) in zip(variants, states, plans):
        text = " ".join("".join(texts[t] for t in s.ids[s.prompt_len:]).split())
        n_exp = len(model_steps(expected))
        steps, units, diverged = compare_steps(expected, text, w, numbers=v.numbers)
        exact_steps, _, _ = compare_steps(expected, text, w, exact=True)
        need = min(m, n_exp)
        out.append(Entry(v.track, v.index, used, n_exp, steps, units, steps >= need, exact_steps, exact_steps >= need,
                         diverged, s.acc.stop_reason or "", prefix.strip(), text, expected))
    return out


def continue_from(decoder, prefix: str, max_new_tokens: int = 256):
    """Greedy (per the decoder's config) continuation of a chain prefix ``<Q> question <THOUGHT> ...``: the
    decoder's loop started from arbitrary chain text; returns the decoder's DecodeResult for the whole chain."""
    try:
        state = decoder.state_from_prefix(prefix.rstrip() + " ")
    except ValueError as exc:
        raise ProbeError(str(exc)) from exc
    start = time.perf_counter()
    while not state.acc.stop_reason and len(state.ids) - state.prompt_len < max_new_tokens:
        decoder.step([state])
    state.elapsed = time.perf_counter() - start
    return decoder.result(state)


# ---------------------------------------------------------------------------------------------------------------
# Inside the model: hidden states at aligned tokens, attention on anchors
# ---------------------------------------------------------------------------------------------------------------


def check_hidden_access(model, name: str = "model") -> int:
    """Number of layers whose hidden states and attention maps the model returns; ProbeError when it gives none."""
    import torch

    probe_ids = torch.tensor([[IDS["<BOS>"], IDS[Q]]], device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            out = model(probe_ids, probe_ids.clone(), output_hidden_states=True, output_attentions=True)
    except TypeError as exc:
        raise ProbeError(f"{name} ({type(model).__name__}) has no hidden-state access: its forward does not take "
                         f"output_hidden_states / output_attentions ({exc})") from None
    hidden, atts = getattr(out, "hidden_states", None), getattr(out, "attentions", None)
    if not hidden or not atts or any(a is None for a in atts):
        what = "hidden states" if not hidden else "attention maps"
        raise ProbeError(f"{name} ({type(model).__name__}) returns no {what} for output_hidden_states=True, "
                         "output_attentions=True: the probe needs both (a SelectorModel, or a causal LM loaded with "
                         "attn_implementation='eager')")
    if len(hidden) != len(atts) + 1:
        raise ProbeError(f"{name} returns {len(hidden)} hidden states for {len(atts)} attention layers (expected layers + 1)")
    return len(atts)


def _window(model) -> int:
    return int(getattr(getattr(model, "config", None), "window", 8))


class Inspector:
    """Hidden states, attention and candidate scores of one model for every reasoning position of a chain."""

    def __init__(self, model, tokenizer, table=None, k_candidates: int = 32):
        self.model, self.tokenizer, self.table, self.K = model, tokenizer, table, k_candidates
        self.k = _window(model)
        self.device = next(model.parameters()).device
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.labels = [t.replace("\u2581", " ") for t in vocab]
        self.abstract = ["#" if t.strip().isdigit() else t for t in self.labels]
        tags = set(range(len(SPECIAL_TOKENS)))
        self.anchor = [i in tags or t.strip() in OPERATORS or t.strip().isdigit() for i, t in enumerate(self.labels)]

    def kind(self, token: int) -> str:
        t = self.labels[token].strip()
        return "tag" if token < len(SPECIAL_TOKENS) else "number" if t.isdigit() else "operator" if t in OPERATORS else "word"

    def run(self, ids: list[int], positions: list[int], scores: bool = False) -> dict[str, Any]:
        """Per position p (the window ending at p): last-token hidden state per layer [L+1][P,d], attention of the
        last token per layer (mean over heads) [L][P,k], anchor masks, and with ``scores`` p(next token)."""
        import torch

        from overlay.dataset import window_of

        windows = torch.tensor([window_of(ids, p + 1, self.k) for p in positions], dtype=torch.long)
        cands = windows[:, -1:].clone()
        if scores and self.table is not None:
            nbs = self.table.neighbours_batch([ids[max(0, p + 1 - self.table.max_order):p + 1] for p in positions], self.K)
            width = max(len(nb.ids) for nb in nbs)
            cands = torch.zeros(len(positions), width, dtype=torch.long)
            for row, nb in enumerate(nbs):
                cands[row, :len(nb.ids)] = torch.tensor(nb.ids)
        with torch.inference_mode():
            out = self.model(windows.to(self.device), cands.to(self.device), output_hidden_states=True,
                             output_attentions=True)
        hidden = [h[:, -1, :].float().cpu() for h in out.hidden_states]
        att = [a[:, :, -1, :].float().mean(1).cpu() for a in out.attentions]
        anchor = torch.tensor([[self.anchor[t] and t != 0 for t in w] for w in windows.tolist()])
        result = {"windows": windows, "hidden": hidden, "attention": att, "anchor": anchor, "real": windows != 0}
        if scores and self.table is not None:
            logp = torch.log_softmax(out.logits.float().cpu(), -1)
            target = torch.tensor([ids[p + 1] for p in positions])
            hit = cands == target[:, None]
            result["p_next"] = torch.where(hit.any(1), (logp.exp() * hit).sum(1), torch.zeros(len(positions)))
            result["top1"] = cands[torch.arange(len(positions)), logp.argmax(1)]
        return result

    def reasoning(self, ids: list[int]) -> list[int]:
        """Positions from the first step tag to the second-to-last token (each predicts the next one)."""
        first = next((i for i, t in enumerate(ids) if t in STEP_IDS), len(ids))
        return list(range(first, len(ids) - 1))

    def align(self, a: list[int], b: list[int]) -> list[tuple[int, int]]:
        """Aligned reasoning positions of two chains: equal runs of their token sequences with digits as '#'."""
        pa, pb = self.reasoning(a), self.reasoning(b)
        sa, sb = [self.abstract[a[p]] for p in pa], [self.abstract[b[p]] for p in pb]
        blocks = difflib.SequenceMatcher(None, sa, sb, autojunk=False).get_matching_blocks()
        return [(pa[x.a + n], pb[x.b + n]) for x in blocks for n in range(x.size)]

    def similarity(self, a: list[int], b: list[int], run_a: dict | None = None) -> dict[str, Any]:
        """Per layer mean cosine of a's and b's hidden states at aligned positions whose windows differ (identical
        windows give identical states, so they are counted but left out of the means), plus per-position values
        (1.0 where the windows are identical, NaN where a's token is not aligned)."""
        import torch

        pairs = self.align(a, b)
        pos_a = self.reasoning(a)
        run_a = run_a or self.run(a, pos_a)
        index_a = {p: i for i, p in enumerate(pos_a)}
        run_b = self.run(b, [q for _, q in pairs]) if pairs else None
        keep = [n for n, (p, _) in enumerate(pairs) if not torch.equal(run_a["windows"][index_a[p]], run_b["windows"][n])]
        layers = len(run_a["hidden"])
        per_pos = [[math.nan] * len(pos_a) for _ in range(layers)]  # NaN: not aligned; 1.0: identical windows
        for p, _ in pairs:
            for layer in range(layers):
                per_pos[layer][index_a[p]] = 1.0
        means = []
        for layer in range(layers):
            if not keep:
                means.append(None)
                continue
            ha = run_a["hidden"][layer][[index_a[pairs[n][0]] for n in keep]]
            hb = run_b["hidden"][layer][keep]
            cos = torch.nn.functional.cosine_similarity(ha, hb, dim=-1)
            means.append(float(cos.mean()))
            for n, c in zip(keep, cos.tolist()):
                per_pos[layer][index_a[pairs[n][0]]] = c
        return {"layers": means, "pairs": len(keep), "identical_windows": len(pairs) - len(keep), "per_position": per_pos}

    @staticmethod
    def anchor_attention(run: dict) -> dict[str, list[float]]:
        """Per layer: mean attention mass of the last token on anchor tokens, and the anchors' share of the window."""
        real = run["real"].float()
        share = float(((run["anchor"].float()).sum(1) / real.sum(1).clamp(min=1)).mean())
        mass = [float((a * run["anchor"].float()).sum(1).mean()) for a in run["attention"]]
        return {"mass": mass, "share": share}


# ---------------------------------------------------------------------------------------------------------------
# The probe run: entry measures and inner measures for the model and the control, report, figures
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """One probe run (the CLI options are its fields)."""

    prefix_steps: str = field(default="0,1", metadata={
        "help": "j: model steps of the variant's own chain fed after the question, comma-separated for several."})
    next_steps: int = field(default=2, metadata={"help": "m: steps the continuation must reproduce to count as entered."})
    variants: int = field(default=6, metadata={"help": "Variants per track."})
    heldout: int = field(default=2, metadata={"help": "Of which held out of training and probed."})
    variability: float = field(default=0.5, metadata={"help": "0..1: how much each variant's surface is changed."})
    volatility: float = field(default=0.5, metadata={"help": "0..1: how much each variant's structure is changed."})
    edits: str = field(default=PROBE_EDITS, metadata={"help": "Allowed edit kinds."})
    seed: int = field(default=0, metadata={"help": "Variant generator seed (must match the one used for training)."})
    limit: int = field(default=0, metadata={"help": "Probe only the first N tracks; 0 = all."})
    k_candidates: int = field(default=32, metadata={"help": "Table candidates per token (K)."})
    repetition_penalty: float = field(default=1.5, metadata={"help": "The decoder's repetition penalty (1 = none)."})
    extra_tokens: int = field(default=12, metadata={"help": "Tokens allowed beyond the expected continuation's length."})
    figures: int = field(default=4, metadata={"help": "Per-example figures to draw."})
    sources: bool = field(default=True, metadata={"help": "Also probe the source chains (seen in training) as a reference."})

    def __post_init__(self) -> None:
        self.prefixes()
        self.variant_config()
        if self.heldout < 1:
            raise ProbeError(f"the probe decodes held-out variants: need heldout ≥ 1, got {self.heldout}")
        if self.next_steps < 1 or self.k_candidates < 2 or self.extra_tokens < 0 or self.figures < 0 or self.limit < 0:
            raise ProbeError("need next_steps ≥ 1, k_candidates ≥ 2, extra_tokens ≥ 0, figures ≥ 0 and limit ≥ 0")

    def prefixes(self) -> list[int]:
        try:
            js = [int(x) for x in str(self.prefix_steps).split(",") if x.strip()]
        except ValueError:
            raise ProbeError(f"prefix_steps must be comma-separated integers, got {self.prefix_steps!r}") from None
        if not js or min(js) < 0:
            raise ProbeError(f"prefix_steps must list integers ≥ 0, got {self.prefix_steps!r}")
        return js

    def variant_config(self) -> VariantConfig:
        return VariantConfig(variants=self.variants, heldout=self.heldout, volatility=self.volatility, edits=self.edits,
                             seed=self.seed, variability=self.variability)


def summarize(entries: list[Entry]) -> dict[str, Any]:
    """Entry rate (modulo slots and exact), mean followed steps / units, and where continuations diverged."""
    n = max(1, len(entries))
    div = [e.diverged for e in entries if e.diverged]
    return {
        "n": len(entries),
        "entry_rate": sum(e.entered for e in entries) / n,
        "exact_entry_rate": sum(e.exact_entered for e in entries) / n,
        "followed_steps": sum(e.followed_steps for e in entries) / n,
        "followed_units": sum(e.followed_units for e in entries) / n,
        "expected_steps": sum(e.expected_steps for e in entries) / n,
        "completed_rate": sum(e.diverged is None for e in entries) / n,
        "diverged_at_tag": dict(Counter(d["tag"] for d in div).most_common()),
        "diverged_at_step": {str(k): v for k, v in sorted(Counter(d["step"] for d in div).items())},
        "diverged_at_unit": dict(Counter("tag" if d["unit"] < 0 else str(min(d["unit"], 5)) if d["unit"] < 5 else "5+"
                                         for d in div).most_common()),
        "first_divergences": dict(Counter(f"{d['expected']} → {d['got']}" for d in div).most_common(8)),
        "stop_reasons": dict(Counter(e.stop_reason for e in entries).most_common()),
    }


def _mean_layers(parts: list[tuple[list, int]]) -> list[float | None]:
    """Pair-weighted mean per layer of several chains' layer means."""
    if not parts:
        return []
    out = []
    for layer in range(len(parts[0][0])):
        num = sum(v[layer] * w for v, w in parts if v[layer] is not None)
        den = sum(w for v, w in parts if v[layer] is not None)
        out.append(num / den if den else None)
    return out


def _unit_position(ids: list[int], labels: list[str], tag: int, unit: int) -> int:
    """Token position of unit number ``unit`` of the step whose tag token is at ``tag`` (-1: the tag itself)."""
    for p in range(tag + 1, len(ids)):
        if ids[p] in STEP_IDS or len(UNIT.findall("".join(labels[t] for t in ids[tag + 1:p + 1]))) > unit:
            return p if unit >= 0 else tag
    return tag


def _tag_positions(ids: list[int], start: int) -> list[int]:
    return [p for p in range(start, len(ids)) if ids[p] in STEP_IDS and ids[p] != IDS[RESULT]]


def probe_tracks(table, models: dict[str, tuple[Any, Any]], library: TrackLibrary, out: str | Path,
                 config: ProbeConfig | None = None, log=None, split: VariantSet | None = None) -> dict[str, Any]:
    """Run the probe for every model in ``models`` (name → (model, tokenizer); e.g. "model" and "control") on the
    held-out variants of ``library``, with the decoder over ``table``; writes probe.json, probe.md, summary.png
    and example-*.png/json under ``out`` and returns the results. ``split`` (VariantSet.load of the variants.json
    written when the training chains were made) fixes the held-out variants; without it they are regenerated
    from the config's seed, which gives the same split only with the same library and overlay version."""
    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.tokenizer import TokenizerMismatch, check_tokenizers, encode

    config = config or ProbeConfig()
    log = log or (lambda *_: None)
    start = time.perf_counter()
    if not library.tracks:
        raise ProbeError("the library has no tracks")
    if not models:
        raise ProbeError("give at least one model to probe")
    lib = TrackLibrary(library.tracks[: config.limit or None], library.skipped, library.path)
    if split is None:
        vset = generate_variants(lib, config.variant_config())
    else:
        ids = {t.id for t in lib.tracks}
        vset = VariantSet([v for v in split.variants if v.track in ids], split.config)
        missing = sorted(ids - {v.track for v in vset.variants if v.index == 0})
        if missing or not vset.heldout:
            raise ProbeError(f"the variant split does not match the library (tracks without a source chain: "
                             f"{', '.join(missing[:5]) or 'none'}; held-out variants: {len(vset.heldout)})")
        leaked = {v.chain.to_text() for v in vset.train} & {v.chain.to_text() for v in vset.heldout}
        if leaked:
            raise ProbeError(f"{len(leaked)} held-out variant(s) are also training chains in the split")
    words = {t.id: slot_words(t) for t in lib.tracks}
    try:
        check_tokenizers({f"table {table.domain!r} v{table.version}": table.meta.get("tokenizer_hash"),
                          **{name: tok for name, (_, tok) in models.items()}})
    except TokenizerMismatch as exc:
        raise ProbeError(f"{exc}: train the model and the control on this table's tokenizer") from None
    for name, (model, _) in models.items():
        check_hidden_access(model, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heldout, js = vset.heldout, config.prefixes()
    sources = [v for v in vset.variants if v.index == 0]
    tracks = [t.id for t in lib.tracks]
    results: dict[str, Any] = {
        "config": asdict(config), "table": {"domain": table.domain, "version": table.version},
        "library": {"path": lib.path, "tracks": len(lib.tracks), "skipped": len(lib.skipped), "variants": len(vset.variants),
                    "train_chains": len(vset.train), "heldout": len(heldout), "split": "file" if split else "generated"},
        "models": {}, "entries": {}, "examples": []}
    inspectors, runs = {}, {}
    for name, (model, tok) in models.items():
        t0 = time.perf_counter()
        decoder = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=100_000, k_candidates=config.k_candidates,
                                                                 temperature=0.0, repetition_penalty=config.repetition_penalty))
        entries = {j: follow_tracks(decoder, heldout, words, j, config.next_steps, config.extra_tokens) for j in js}
        res: dict[str, Any] = {"heldout": {str(j): summarize(e) for j, e in entries.items()}}
        if config.sources:
            res["sources"] = summarize(follow_tracks(decoder, sources, words, js[0], config.next_steps, config.extra_tokens))
        results["entries"][name] = {str(j): [asdict(x) for x in e] for j, e in entries.items()}
        insp = inspectors[name] = Inspector(model, tok, table, config.k_candidates)
        on, off, att, share, identical = [], [], [], [], 0
        for v in heldout:
            ids = encode(tok, v.chain.to_text())
            run = runs[(name, v.track, v.index)] = insp.run(ids, insp.reasoning(ids))
            sim = insp.similarity(ids, encode(tok, vset.source(v.track).chain.to_text()), run)
            run["similarity"] = sim
            on.append((sim["layers"], sim["pairs"]))
            identical += sim["identical_windows"]
            if len(tracks) > 1:
                other = tracks[(tracks.index(v.track) + 1) % len(tracks)]
                sim_o = insp.similarity(ids, encode(tok, vset.source(other).chain.to_text()), run)
                off.append((sim_o["layers"], sim_o["pairs"]))
            a = insp.anchor_attention(run)
            att.append((a["mass"], len(run["windows"])))
            share.append((a["share"], len(run["windows"])))
        res["layer_similarity"] = _mean_layers(on)
        res["layer_similarity_other_track"] = _mean_layers(off)
        res["aligned_pairs"] = sum(w for _, w in on)
        res["aligned_identical_windows"] = identical
        res["anchor_attention"] = _mean_layers(att)
        res["anchor_share"] = sum(s * w for s, w in share) / max(1, sum(w for _, w in share))
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results["models"][name] = res
        h = res["heldout"][str(js[0])]
        log(f"{name}: entry rate {h['entry_rate']:.3f} (exact {h['exact_entry_rate']:.3f}), followed "
            f"{h['followed_steps']:.2f} of {h['expected_steps']:.2f} steps, {res['seconds']:.1f} s")
    picked = []
    for t in tracks:
        v = next((x for x in heldout if x.track == t), None)
        if v is not None and len(picked) < config.figures:
            picked.append(v)
    for n, v in enumerate(picked):
        ex = _example(v, vset, models, inspectors, runs, results["entries"], js[0], config)
        stem = f"example-{n + 1:02d}"
        (out / f"{stem}.json").write_text(json.dumps(ex, indent=1))
        example_figure(ex, out / f"{stem}.png")
        results["examples"].append({"track": v.track, "variant": v.index, "json": f"{stem}.json", "png": f"{stem}.png"})
    results["seconds"] = round(time.perf_counter() - start, 2)
    (out / "probe.json").write_text(json.dumps(results, indent=1, default=str))
    summary_figure(results, out / "summary.png")
    (out / "probe.md").write_text(markdown(results))
    return results


def _example(v: Variant, vset: VariantSet, models, inspectors, runs, entries, j: int, config: ProbeConfig) -> dict:
    """The numbers behind one example figure: tokens around the prefix end and, per model, attention on anchors,
    embedding shift (1 − cosine to the source at aligned tokens), p(expected next token), greedy agreement."""
    from overlay.tokenizer import encode

    name0 = next(iter(models))
    tok, insp = models[name0][1], inspectors[name0]
    ids = encode(tok, v.chain.to_text())
    prefix, _, used = split_chain(v.chain, j)
    cut = len(encode(tok, prefix))
    upto = len(encode(tok, split_chain(v.chain, used + config.next_steps)[0]))
    positions = insp.reasoning(ids)
    lo = max(positions[0], cut - 8)
    hi = min(positions[-1] + 1, max(upto, cut + 8), lo + 64)
    region = [p for p in positions if lo <= p < hi]
    index = {p: i for i, p in enumerate(positions)}
    tags = _tag_positions(ids, cut)
    ex: dict[str, Any] = {
        "track": v.track, "variant": v.index, "edits": v.edits, "prefix_steps": used, "question": v.chain.question,
        "source_question": vset.source(v.track).chain.question,
        "positions": region, "tokens": [insp.labels[ids[p]].strip() or "␣" for p in region],
        "next_tokens": [insp.labels[ids[p + 1]].strip() or "␣" for p in region],
        "kinds": [insp.kind(ids[p]) for p in region], "prefix_end": cut, "models": {}}
    for name, (model, _) in models.items():
        run = runs[(name, v.track, v.index)]
        scored = inspectors[name].run(ids, region, scores=True)
        entry = next(e for e in entries[name][str(j)] if e["track"] == v.track and e["variant"] == v.index)
        d = entry["diverged"]
        ex["models"][name] = {
            "anchor_attention": [[round(float(a[index[p]] @ run["anchor"][index[p]].float()), 4) for p in region]
                                 for a in run["attention"]],
            "shift": [[None if math.isnan(c := run["similarity"]["per_position"][layer][index[p]]) else round(1 - c, 4)
                       for p in region] for layer in range(len(run["hidden"]))],
            "p_next": [round(float(x), 4) for x in scored.get("p_next", [])],
            "top1_ok": [int(t) == ids[p + 1] for t, p in zip(scored.get("top1", []), region)],
            "entered": entry["entered"], "followed_steps": entry["followed_steps"], "diverged": d,
            "diverged_position": _unit_position(ids, insp.labels, tags[d["step"]], d["unit"])
            if d and d["step"] < len(tags) else None,
            "continuation": entry["continuation"]}
    return ex


# ---------------------------------------------------------------------------------------------------------------
# Training a model on the library and a control on other chains, over one shared table
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    """Sizes for training the probed model and its control (same architecture, steps and seed)."""

    steps: int = field(default=600, metadata={"help": "Training steps for each of the two models."})
    n_layer: int = field(default=2, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    n_embd: int = field(default=128, metadata={"help": "Embedding width."})
    batch_size: int = field(default=128, metadata={"help": "Windows per batch."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    window: int = field(default=8, metadata={"help": "k: tokens the selector reads."})
    candidates: int = field(default=32, metadata={"help": "K: candidates per training row."})
    vocab_size: int = field(default=2000, metadata={"help": "Tokenizer vocabulary (trained on both chain sets)."})
    max_order: int = field(default=3, metadata={"help": "Longest table context."})
    seed: int = field(default=0, metadata={"help": "Training seed."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads during training."})


def prepare_models(client, domain: str, train: list[Chain], control: list[Chain], out: str | Path,
                   config: PrepareConfig | None = None, log=None) -> dict[str, Path]:
    """One tokenizer and one table over ``train`` + ``control`` chains (never the held-out variants); a model
    trained on ``train`` (the library's sources and training variants) and a control trained on ``control``.
    Returns {"model": folder, "control": folder}."""
    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.table import SemanticTable, build_table, check_domain
    from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
    from overlay.train import TrainConfig
    from overlay.train import train as train_model

    config = config or PrepareConfig()
    log = log or (lambda *_: None)
    check_domain(domain)
    if not train or not control:
        raise ProbeError(f"need chains for both models (library training chains: {len(train)}, control chains: {len(control)})")
    out = Path(out)
    texts = [c.to_text() for c in train + control]
    tok = train_tokenizer(texts, vocab_size=config.vocab_size)
    stats = build_table(client, domain, (encode(tok, t) for t in texts), vocab_size=len(tok),
                        tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok),
                        max_order=config.max_order, source="track probe: library training chains + control chains")
    log(f"table {domain} v{stats.version}: {stats.sequences} chains, {stats.contexts} contexts")
    table = SemanticTable(client, domain)
    folders = {}
    for name, chains in (("model", train), ("control", control)):
        data = out / f"dataset-{name}"
        build_dataset(table, tok, chains, data, DatasetConfig(window=config.window, candidates=config.candidates,
                                                             seed=config.seed, dev_fraction=0.0))
        result = train_model(TrainConfig(
            data=str(data), out=str(out / name), arch="window", steps=config.steps, n_layer=config.n_layer, n_head=config.n_head,
            n_embd=config.n_embd, batch_size=config.batch_size, lr=config.lr, warmup=max(1, min(100, config.steps // 10)),
            eval_every=0, save_every=0, seed=config.seed, threads=config.threads, device="cpu"), progress=False)
        log(f"{name}: {len(chains)} chains, {result.rows_train} rows, loss {result.train_loss:.3f}, {result.seconds:.1f} s")
        folders[name] = Path(result.out)
    return folders


# ---------------------------------------------------------------------------------------------------------------
# Command line: overlay probe library | variants | prepare | tracks
# ---------------------------------------------------------------------------------------------------------------

probe_app = typer.Typer(help="Track probe: do held-out variants of trained chains re-enter their track?",
                        no_args_is_help=True)


def _console():
    from rich.console import Console

    return Console()


def _fail(message: str) -> None:
    _console().print(f"[bold red]error:[/] {' '.join(str(message).split())}")
    raise typer.Exit(2)


def _with_config(cls: type, extra: dict[str, tuple[Any, Any]]):
    """Decorator: a typer command whose options are ``extra`` plus the fields of dataclass ``cls`` (``config=``)."""
    import dataclasses
    import inspect

    from overlay.cliutil import dataclass_params

    def wrap(run):
        names = [f.name for f in dataclasses.fields(cls)]

        def command(**kwargs: Any) -> None:
            fields = {n: kwargs.pop(n) for n in names}
            try:
                config = cls(**fields)
            except ValueError as exc:
                _fail(str(exc))
            run(config=config, **kwargs)

        command.__signature__ = inspect.Signature(dataclass_params(cls, extra))  # type: ignore[attr-defined]
        command.__doc__ = run.__doc__
        return command
    return wrap


REDIS = (Optional[str], typer.Option(None, "--redis-url", envvar="OVERLAY_REDIS_URL",
                                     help="Redis URL; default: the embedded server."))


def _library_command(data: Path = typer.Option(..., "--data", help="GSM8K JSONL file."),
                     out: Path = typer.Option(..., "--out", help="YAML library to write."),
                     limit: int = typer.Option(50, "--limit", help="How many tracks."),
                     start: int = typer.Option(0, "--start", help="Skip the first N records.")) -> None:
    """Turn GSM8K records into a template library: question numbers used in the annotations become slots."""
    try:
        lib = library_from_gsm8k(data, limit, start)
    except OSError as exc:
        _fail(str(exc))
    if not lib.tracks:
        _fail(f"no record of {data} could be turned into a track ({len(lib.skipped)} skipped)")
    lib.save(out)
    reasons = Counter(r for _, r in lib.skipped)
    _console().print(f"[green]library[/] {out}: {len(lib.tracks)} tracks, {len(lib.skipped)} records skipped"
                     + (f" ({'; '.join(f'{r}: {n}' for r, n in reasons.most_common(3))})" if reasons else ""))


probe_app.command("library")(_library_command)


@probe_app.command("variants")
@_with_config(VariantConfig, {"library": (Path, typer.Option(..., "--library", help="YAML/JSONL library.")),
                              "out": (Path, typer.Option(..., "--out", help="Folder for train.jsonl / heldout.jsonl."))})
def _variants_command(library: Path, out: Path, config: VariantConfig) -> None:
    """Write the library's training chains (sources + training variants) and held-out variants as GSM8K JSONL."""
    try:
        vset = generate_variants(load_library(library), config)
    except (ProbeError, VariantError) as exc:
        _fail(str(exc))
    paths = vset.write(out)
    _console().print(f"[green]variants[/] {len(vset.train)} training chains → {paths['train']}, "
                     f"{len(vset.heldout)} held out → {paths['heldout']}")


def _load_control(path: Path, start: int, limit: int, exclude: set[str]) -> list[Chain]:
    from overlay.chains import load_chains

    chains = load_chains(path, "gsm8k").chains
    return [c for c in chains if c.line > start and c.question not in exclude][:limit]


@probe_app.command("prepare")
@_with_config(PrepareConfig, {
    "library": (Path, typer.Option(..., "--library", help="YAML/JSONL library.")),
    "control_data": (Path, typer.Option(..., "--control-data", help="GSM8K JSONL the control model is trained on.")),
    "out": (Path, typer.Option(..., "--out", help="Folder for the datasets, model/ and control/.")),
    "domain": (str, typer.Option("probe", "--domain", help="Table domain to build.")),
    "control_start": (int, typer.Option(1000, "--control-start", help="Use control records after this line.")),
    "control_limit": (int, typer.Option(0, "--control-limit", help="Control chains; 0 = as many as training chains.")),
    "variants": (int, typer.Option(6, "--variants")), "heldout": (int, typer.Option(2, "--heldout")),
    "variability": (float, typer.Option(0.5, "--variability")),
    "volatility": (float, typer.Option(0.5, "--volatility")), "variant_seed": (int, typer.Option(0, "--variant-seed")),
    "redis_url": REDIS})
def _prepare_command(library: Path, control_data: Path, out: Path, domain: str, control_start: int, control_limit: int,
                     variants: int, heldout: int, variability: float, volatility: float, variant_seed: int,
                     redis_url: Optional[str],
                     config: PrepareConfig) -> None:
    """Train a model on the library's training chains and a control on other chains, over one shared table."""
    from overlay import store
    from overlay.chains import ChainFormatError

    console = _console()
    try:
        vset = generate_variants(load_library(library), VariantConfig(variants=variants, heldout=heldout, volatility=volatility,
                                                                           edits=PROBE_EDITS, seed=variant_seed,
                                                                           variability=variability))
        vset.write(out)
        train = [v.chain for v in vset.train]
        exclude = {v.chain.question for v in vset.variants}
        control = _load_control(control_data, control_start, control_limit or len(train), exclude)
        folders = prepare_models(store.connect(redis_url), domain, train, control, out, config, log=console.print)
    except (ProbeError, VariantError, ChainFormatError, ValueError, OSError, store.StoreUnavailable) as exc:
        _fail(str(exc))
    console.print(f"[green]ready[/]: overlay probe tracks --model {folders['model']} --control {folders['control']} "
                  f"--library {library} --domain {domain} --split {out / 'variants.json'} --out {out / 'report'}")


def infer_domain(model_dir: str | Path) -> str:
    """The table domain a selector was trained against (train_result.json → dataset manifest → table)."""
    try:
        result = json.loads((Path(model_dir) / "train_result.json").read_text())
        manifest = json.loads((Path(result["config"]["data"]) / "manifest.json").read_text())
        return manifest["table"]["domain"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise ProbeError(f"cannot tell which table {model_dir} was trained with: give the table domain") from None


def load_models(model_dir: str | Path, control_dir: str | Path | None = None) -> dict[str, tuple[Any, Any]]:
    """{"model": (model, tokenizer)[, "control": ...]} loaded from selector folders."""
    from overlay.selector import load_selector

    models = {"model": load_selector(model_dir)}
    if control_dir:
        models["control"] = load_selector(control_dir)
    return models


@probe_app.command("tracks")
@_with_config(ProbeConfig, {
    "model": (Path, typer.Option(..., "--model", help="Selector trained on the library's training chains.")),
    "library": (Path, typer.Option(..., "--library", help="YAML/JSONL library (or GSM8K JSONL).")),
    "out": (Path, typer.Option(..., "--out", help="Report folder: probe.json, probe.md, PNG figures.")),
    "control": (Optional[Path], typer.Option(None, "--control", help="Control selector trained without the library.")),
    "domain": (Optional[str], typer.Option(None, "--domain", help="Table domain; default: the model's training table.")),
    "split": (Optional[Path], typer.Option(None, "--split", help="variants.json from `probe variants`/`prepare`: "
                                           "the exact held-out variants (default: regenerate from --seed).")),
    "threads": (int, typer.Option(1, "--threads", help="torch CPU threads.")),
    "redis_url": REDIS})
def _tracks_command(model: Path, library: Path, out: Path, control: Optional[Path], domain: Optional[str],
                    split: Optional[Path], threads: int, redis_url: Optional[str], config: ProbeConfig) -> None:
    """Probe held-out variants: track-entry rate, followed length, divergence, layer similarity, figures."""
    import torch

    from overlay import store
    from overlay.table import SemanticTable, TableNotFound

    console = _console()
    if threads:
        torch.set_num_threads(threads)
    try:
        lib = load_library(library)
        models = load_models(model, control)
        table = SemanticTable(store.connect(redis_url), domain or infer_domain(model))
        results = probe_tracks(table, models, lib, out, config, log=console.print,
                               split=VariantSet.load(split) if split else None)
    except (ProbeError, VariantError, ValueError, OSError, TableNotFound, store.StoreUnavailable) as exc:
        _fail(str(exc))
    console.print((out / "probe.md").read_text())
    console.print(f"[green]report[/] {out}: probe.json, probe.md, summary.png, {len(results['examples'])} example figure(s)")


# ---------------------------------------------------------------------------------------------------------------
# The Track Probe node's job (components/overlay/track_probe.py stays thin)
# ---------------------------------------------------------------------------------------------------------------


def probe_node(library: str | None, model_dir: str | None, control_dir: str | None = None, domain: str | None = None,
               out_dir: str | None = None, prefix_steps: str = "0,1", next_steps: int = 2, redis_url: str | None = None,
               variants: int = 6, heldout: int = 2, seed: int = 0, limit: int = 0, figures: int = 2,
               split: str | None = None) -> tuple[dict[str, Any], str, str]:
    """Run the probe with a node's settings (empty fields: $OVERLAY_MODEL_DIR, $OVERLAY_DOMAIN or the model's own
    table, $OVERLAY_REDIS_URL); returns (summary, Markdown report, status line)."""
    import os

    from overlay import store
    from overlay.langflow_support import ENV_DOMAIN, ENV_MODEL_DIR, NodeError, connect, setting
    from overlay.table import SemanticTable

    path = (library or "").strip()
    if not path:
        raise NodeError("no library given: fill Library Path with a YAML/JSONL track library or a GSM8K JSONL file")
    model = setting(model_dir, ENV_MODEL_DIR, "model folder")
    config = ProbeConfig(prefix_steps=str(prefix_steps or "0,1"), next_steps=int(next_steps), variants=int(variants),
                         heldout=int(heldout), seed=int(seed), limit=int(limit), figures=int(figures))
    lib = load_library(path)
    name = (domain or "").strip() or os.environ.get(ENV_DOMAIN, "").strip() or infer_domain(model)
    table = SemanticTable(connect(redis_url), name)
    out = (Path(out_dir.strip()) if (out_dir or "").strip()
           else store.data_dir() / "reports" / time.strftime("probe-%Y%m%d-%H%M%S"))
    results = probe_tracks(table, load_models(model, (control_dir or "").strip() or None), lib, out, config,
                           split=VariantSet.load(split.strip()) if (split or "").strip() else None)
    j = config.prefixes()[0]
    summary = {"report": str(out), "prefix_steps": j, "next_steps": config.next_steps,
               "heldout_variants": results["library"]["heldout"], "tracks": results["library"]["tracks"],
               "figures": [str(out / "summary.png")] + [str(out / e["png"]) for e in results["examples"]], "models": {}}
    for n, m in results["models"].items():
        h = m["heldout"][str(j)]
        summary["models"][n] = {k: h[k] for k in ("entry_rate", "exact_entry_rate", "followed_steps", "expected_steps",
                                                  "followed_units", "diverged_at_tag")} | {
            "layer_similarity": m["layer_similarity"], "layer_similarity_other_track": m["layer_similarity_other_track"],
            "anchor_attention": m["anchor_attention"], "anchor_share": m["anchor_share"]}
    status = "; ".join(f"{n}: entry {m['entry_rate']:.2f}, followed {m['followed_steps']:.2f}/{m['expected_steps']:.2f} steps"
                       for n, m in summary["models"].items())
    return summary, (out / "probe.md").read_text(), f"{status} on {results['library']['heldout']} held-out variants ({out})"
