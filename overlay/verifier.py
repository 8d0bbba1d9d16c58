"""The chain verifier: the probability that a finished chain's answer is right.

A CHECK restates its own calculation, so it passes on a wrong chain; the verifier judges the answer instead, from
what the chain and its decoding already hold: agreement with the retrieved tracks (weighted by the chooser's p), the
followed track, the selector's confidence, the arithmetic, the answer's plausibility against the question's numbers
and, for the chains of a vote, agreement with the other samples. It is a logistic model over those features (a few
microseconds per chain), trained on chains the selector samples for *training* questions, each labelled by the gold
answer; a training question is routed without its own track (nor its family), as a new question would be. Two
weight vectors: one for a chain alone, one for a chain among samples of the same question (vote share features).
Saved the Hugging Face way beside the selector: ``<model>/verifier/config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from overlay.chains import Chain, answers_match
from overlay.roles import masked_question, question_numbers
from overlay.router import ChainCheck

if TYPE_CHECKING:
    from overlay.decode import DecodeResult, OverlayDecoder
    from overlay.tracks import Retrieved, TrackMemory

MODEL_TYPE = "overlay-chain-verifier"
FOLDER = "verifier"  # the verifier's folder inside a selector's folder
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FEATURES = ("answered", "well_formed", "ended", "tracks_agree", "track_agree_best_p", "best_track_p", "followed_p",
            "followed_agrees", "left_track", "top_track_agrees", "mean_logprob", "min_logprob", "track_share",
            "actions", "tool_errors", "checks_consistent", "check_gives_answer", "answer_negative", "answer_broken",
            "numbers_used", "answer_is_question_number", "magnitude")
PEER_FEATURES = ("vote_share", "vote_top")
LOGPROB_FLOOR = -10.0
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class VerifierError(ValueError):
    """A verifier folder that cannot be loaded, or training data that cannot fit one; the message says why."""


def _value(text: str | None) -> float | None:
    """The first number of a text as a float (commas and '$' dropped), or None."""
    match = _NUMBER.search((text or "").replace(",", "").replace("$", ""))
    return float(match.group(0)) if match else None


def _share(answer: str | None, answers: Sequence[str | None]) -> tuple[float, float]:
    """(share of ``answers`` equal to ``answer``, 1.0 when no other answer is more frequent)."""
    if answer is None or not answers:
        return 0.0, 0.0
    count = sum(answers_match(a, answer) for a in answers if a is not None)
    best = max(sum(answers_match(a, b) for a in answers if a is not None) for b in answers if b is not None)
    return count / len(answers), float(count >= best)


def chain_features(result: DecodeResult, answers: Sequence[str | None] | None = None) -> np.ndarray:
    """FEATURES then PEER_FEATURES of one finished chain; ``answers`` are the answers of all the chains sampled for its
    question (this one included), or None for a chain alone (the peer features are then 0)."""
    answer = result.answer
    same = (lambda a: answers_match(a, answer)) if answer is not None else (lambda a: False)
    tracks = [t for t in result.tracks if t.get("answer") is not None]
    total_p = sum(t["p"] for t in tracks)
    agreeing = [t for t in tracks if same(t["answer"])]
    followed = next((t for t in result.tracks if t.get("followed")), None)
    top = next((t for t in result.tracks if t.get("rank") == 0), None)
    chosen = [s for s in result.trace.get("steps", []) if not s.get("injected")]
    scores = [max(LOGPROB_FLOOR, s["score"]) for s in chosen]
    checks = ChainCheck.of(result.verdicts)
    last_check = next((s["text"] for s in reversed(result.steps) if s["tag"] == "CHECK"), None)
    given = _value(last_check.rsplit("=", 1)[-1]) if last_check and "=" in last_check else None
    value = _value(answer)
    numbers = [float(n.value) for n in question_numbers(result.question)]
    used = {float(x) for s in result.steps if s["tag"] == "ACTION" for x in _NUMBER.findall(s["text"].replace(",", ""))}
    whole_question = all(n == int(n) for n in numbers)
    largest = max((abs(n) for n in numbers), default=0.0)
    row = [
        float(answer is not None), float(result.well_formed), float(result.stop_reason in ("eos", "answer")),
        sum(t["p"] for t in agreeing) / total_p if total_p else 0.0,
        max((t["p"] for t in agreeing), default=0.0),
        max((t["p"] for t in tracks), default=0.0),
        followed["p"] if followed else 0.0,
        float(followed is not None and same(followed.get("answer"))),
        float(bool(followed and followed.get("left_track"))),
        float(top is not None and same(top.get("answer"))),
        result.trace.get("log_score", 0.0) / max(1, result.trace.get("scored_tokens", 0)),
        min(scores, default=0.0),
        sum(s.get("source") == "track" for s in chosen) / max(1, len(chosen)),
        min(len(result.tool_calls), 8) / 4,
        float(any(not c.get("ok") for c in result.tool_calls)),
        float(checks.all_consistent),
        float(value is not None and given is not None and math.isclose(value, given, rel_tol=1e-6)),
        float(value is not None and value < 0),
        float(value is not None and whole_question and value != int(value)),
        sum(n in used for n in numbers) / len(numbers) if numbers else 0.0,
        float(value is not None and value in numbers),
        max(-3.0, min(3.0, math.log10(abs(value) + 1) - math.log10(largest + 1))) if value is not None else 0.0,
    ]
    peers = _share(answer, answers) if answers is not None else (0.0, 0.0)
    return np.asarray(row + list(peers), dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -30, 30)))


def fit_logistic(rows: np.ndarray, labels: np.ndarray, steps: int = 3000, lr: float = 0.5,
                 l2: float = 1e-3) -> np.ndarray:
    """Logistic regression by gradient descent on standardised rows with a bias column last (as the track chooser)."""
    w = np.zeros(rows.shape[1])
    for _ in range(steps):
        p = _sigmoid(rows @ w)
        w -= lr * (rows.T @ (p - labels) / len(labels) + l2 * w)
    return w


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (the chance a right chain outscores a wrong one, ties half); None without both."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass
class Verifier:
    """The fitted verifier: standardisation and weights for a chain alone (FEATURES) and among samples (FEATURES +
    PEER_FEATURES), a bias last in each; ``threshold`` splits likely right from likely wrong; ``info`` says what it
    was trained on and how well it ranked held-out chains."""

    mean: np.ndarray
    std: np.ndarray
    alone: np.ndarray
    peers: np.ndarray
    threshold: float = 0.5
    info: dict[str, Any] = field(default_factory=dict)

    def _p(self, x: np.ndarray, with_peers: bool) -> np.ndarray:
        """Probabilities for feature rows (FEATURES + PEER_FEATURES each)."""
        z = (x - self.mean) / self.std
        z = np.concatenate([z, np.ones((len(z), 1))], 1)
        if with_peers:
            return _sigmoid(z @ self.peers)
        return _sigmoid(np.delete(z, range(len(FEATURES), len(FEATURES) + len(PEER_FEATURES)), 1) @ self.alone)

    def score(self, result: DecodeResult) -> float:
        """The probability that a chain alone answers right."""
        return float(self._p(chain_features(result)[None], False)[0])

    def score_group(self, results: Sequence[DecodeResult]) -> list[float]:
        """The probability that each chain answers right, seen among the other chains of the same question (one
        chain alone is scored as such)."""
        if len(results) == 1:
            return [self.score(results[0])]
        answers = [r.answer for r in results]
        return self._p(np.stack([chain_features(r, answers) for r in results]), True).tolist()

    def check(self, results: Sequence[DecodeResult]) -> list[ChainCheck]:
        """Score chains of one question together and record each one's check (CHECK consistency and the verifier's
        verdict) in its trace under ``check``; returns the checks."""
        out = []
        for result, p in zip(results, self.score_group(results)):
            check = ChainCheck.of(result.verdicts, p, self.threshold)
            result.trace["check"] = check.to_dict()
            out.append(check)
        return out

    def config(self) -> dict[str, Any]:
        """What config.json holds: the model type, feature names, threshold and training record."""
        return {"model_type": MODEL_TYPE, "features": list(FEATURES), "peer_features": list(PEER_FEATURES),
                "threshold": self.threshold, "info": self.info}

    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` then ``config.json`` into ``folder``, each through a temporary file and a rename,
        so a reader never sees half a file; returns the folder."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
        save_file({"mean": self.mean, "std": self.std, "alone": self.alone, "peers": self.peers}, str(tmp))
        tmp.replace(folder / WEIGHTS_NAME)
        tmp = folder / f".{CONFIG_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.config(), indent=1))
        tmp.replace(folder / CONFIG_NAME)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Verifier:
        """Load a saved verifier, saying what is missing or wrong instead of failing later with misaligned weights."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_file.is_file():
            raise VerifierError(f"no verifier at {folder}: {CONFIG_NAME} is missing (train one with `overlay verifier "
                                f"train --model <selector folder>`)")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VerifierError(f"{config_file} is not valid JSON ({exc}): train the verifier again") from None
        if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
            raise VerifierError(f"{config_file} is not a chain verifier's config (model_type must be {MODEL_TYPE!r})")
        if config.get("features") != list(FEATURES) or config.get("peer_features") != list(PEER_FEATURES):
            raise VerifierError(f"{config_file} was trained on other features than this release computes: train the "
                                f"verifier again")
        if not weights_file.is_file():
            raise VerifierError(f"no verifier weights at {weights_file}: train the verifier again")
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as exc:
            raise VerifierError(f"{weights_file} cannot be read ({exc}): train the verifier again") from None
        width = len(FEATURES) + len(PEER_FEATURES)
        shapes = {"mean": width, "std": width, "alone": len(FEATURES) + 1, "peers": width + 1}
        if any(name not in tensors or tensors[name].shape != (n,) for name, n in shapes.items()):
            raise VerifierError(f"{weights_file} does not hold this verifier's weights ({', '.join(shapes)} of "
                                f"sizes {', '.join(map(str, shapes.values()))}): train the verifier again")
        threshold = config.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise VerifierError(f"{config_file}: threshold must be a number between 0 and 1, got {threshold!r}")
        return cls(tensors["mean"], tensors["std"], tensors["alone"], tensors["peers"], float(threshold),
                   dict(config.get("info") or {}))


def verifier_dir(model_dir: str | Path) -> Path:
    """Where a selector folder keeps its verifier."""
    return Path(model_dir) / FOLDER


def find_verifier(model_dir: str | Path) -> Verifier | None:
    """The verifier saved beside a selector, or None when it has none (a broken one raises VerifierError)."""
    folder = verifier_dir(model_dir)
    return Verifier.load(folder) if folder.exists() else None


class WithoutOwnTrack:
    """A track memory that never returns the asked question's own track, its family (its variants) or a track with the
    same number-masked question: a training question is routed as a new question would be, so the verifier learns
    from chains like those it will judge rather than from chains that copy their own stored answer."""

    def __init__(self, memory: TrackMemory) -> None:
        self.memory = memory

    def get_tracks(self, question: str, k: int) -> list[Retrieved]:
        """GetTracks without the question's own tracks, bound, followed and scored by the memory's chooser."""
        from overlay.tracks import PER_FAMILY, retrieved

        own = masked_question(question).lower()
        hits = self.memory.search(question, k + 2 * PER_FAMILY)
        families = {t.family for t, _ in hits if masked_question(t.question).lower() == own}
        kept = [(t, s) for t, s in hits if t.family not in families and masked_question(t.question).lower() != own]
        found = retrieved(question, kept[:k], self.memory.idf)
        self.memory.chooser.score(found)
        return found

    def choose(self, question: str, k: int) -> tuple[Retrieved | None, list[Retrieved]]:
        """(the chooser's track or None, all retrieved tracks), as ``TrackMemory.choose``."""
        found = self.get_tracks(question, k)
        return self.memory.chooser.choose(found), found


@dataclass
class VerifierConfig:
    """How a verifier is trained (one config per entry point; the CLI is built from it)."""

    samples: int = field(default=8, metadata={"help": "Chains decoded per training question (chain 0 greedy, the "
                                                      "others sampled, as a vote decodes them)."})
    questions: int = field(default=300, metadata={"help": "Training questions to decode (drawn with --seed)."})
    held_out: float = field(default=0.2, metadata={"help": "Share of the questions whose chains are held out to "
                                                           "measure the verifier's ranking (AUC)."})
    seed: int = field(default=0, metadata={"help": "Seed for drawing the questions and the held-out split."})
    threshold: float = field(default=0.5, metadata={"help": "Below this probability a chain is called likely wrong."})
    own_track: bool = field(default=False, metadata={"help": "Let a training question follow its own stored track "
                                                             "(by default it is routed as a new question)."})
    max_tokens: int = field(default=256, metadata={"help": "Token limit per decoded chain."})
    threads: int = field(default=1, metadata={"help": "CPU threads for the selector."})

    def __post_init__(self) -> None:
        """Reject settings that cannot train, naming the field."""
        from overlay.vote import check_samples

        check_samples(self.samples)
        if self.samples < 2:
            raise ValueError("samples must be at least 2: the verifier learns from several chains per question")
        if self.questions < 2 or not 0 < self.held_out < 1 or not 0 < self.threshold < 1:
            raise ValueError(f"questions must be ≥ 2, held_out and threshold between 0 and 1 (got {self.questions}, "
                             f"{self.held_out}, {self.threshold})")
        if self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {self.threads}")


def sample_chains(decoder: OverlayDecoder, chains: Sequence[Chain], samples: int,
                  progress: bool = False) -> list[list[DecodeResult]]:
    """``samples`` chains per question, decoded as a vote decodes them (chain 0 greedy, the others sampled)."""
    from tqdm.auto import tqdm

    from overlay.vote import decode_voted

    return [decode_voted(decoder, c.question, samples)[1].results
            for c in tqdm(chains, desc="sample", unit="q", disable=not progress or None)]


def fit_verifier(groups: Sequence[Sequence[DecodeResult]], golds: Sequence[str], held_out: Sequence[bool],
                 threshold: float = 0.5) -> Verifier:
    """Fit on the groups (chains of one question) not held out; measure both models' AUC, accuracy at the threshold
    and cost per chain on the held-out groups, recorded in ``info``."""
    peer_rows, labels, out = [], [], []
    for group, gold, hold in zip(groups, golds, held_out):
        answers = [r.answer for r in group]
        for r in group:
            peer_rows.append(chain_features(r, answers))
            labels.append(answers_match(r.answer, gold))
            out.append(hold)
    xp, y, test = np.stack(peer_rows), np.asarray(labels, float), np.asarray(out, bool)
    train = ~test
    if not train.any() or y[train].min() == y[train].max():
        right = int(y[train].sum())
        raise VerifierError(f"{right} of {int(train.sum())} training chains are right: the verifier needs right and "
                            f"wrong chains (decode more questions or more samples)")
    mean = xp[train].mean(0)
    std = np.where(xp[train].std(0) > 1e-9, xp[train].std(0), 1.0)
    z = np.concatenate([(xp - mean) / std, np.ones((len(xp), 1))], 1)
    alone_cols = [i for i in range(z.shape[1]) if not len(FEATURES) <= i < len(FEATURES) + len(PEER_FEATURES)]
    verifier = Verifier(mean, std, fit_logistic(z[train][:, alone_cols], y[train]), fit_logistic(z[train], y[train]),
                        threshold)
    info: dict[str, Any] = {"questions": len(groups), "chains": len(y), "right": int(y.sum()),
                            "held_out_questions": int(sum(held_out)), "held_out_chains": int(test.sum())}
    if test.any():
        held = [g for g, h in zip(groups, held_out) if h]
        start = time.perf_counter()
        alone = [verifier.score(r) for g in held for r in g]
        alone_s = (time.perf_counter() - start) / len(alone)
        start = time.perf_counter()
        peers = [p for g in held for p in verifier.score_group(g)]
        peers_s = (time.perf_counter() - start) / len(peers)
        decode_s = float(np.mean([r.seconds for g in held for r in g]))
        info |= {"auc_alone": auc(alone, y[test] > 0), "auc_peers": auc(peers, y[test] > 0),
                 "accuracy_alone": float(np.mean((np.asarray(alone) >= threshold) == (y[test] > 0))),
                 "accuracy_peers": float(np.mean((np.asarray(peers) >= threshold) == (y[test] > 0))),
                 "held_out_right": int(y[test].sum()), "ms_per_chain_alone": 1000 * alone_s,
                 "ms_per_chain_peers": 1000 * peers_s, "decode_ms_per_chain": 1000 * decode_s,
                 "cost_share_of_decode": peers_s / decode_s if decode_s else None}
    verifier.info = info
    return verifier


def train_verifier(decoder: OverlayDecoder, chains: Sequence[Chain], config: VerifierConfig,
                   progress: bool = False) -> Verifier:
    """Draw ``config.questions`` training chains, decode ``config.samples`` chains for each (routed without their own
    track unless ``config.own_track``), hold out a share of the questions, fit and measure the verifier."""
    if decoder.tracks is not None and not config.own_track:
        decoder.tracks = WithoutOwnTrack(decoder.tracks)
    rng = random.Random(config.seed)
    picked = rng.sample(list(chains), min(config.questions, len(chains)))
    start = time.perf_counter()
    groups = sample_chains(decoder, picked, config.samples, progress)
    seconds = time.perf_counter() - start
    held = set(rng.sample(range(len(picked)), max(1, round(config.held_out * len(picked)))))
    verifier = fit_verifier(groups, [c.answer for c in picked], [i in held for i in range(len(picked))],
                            config.threshold)
    verifier.info |= {"config": asdict(config), "decode_seconds": seconds,
                      "pass_at_n": sum(any(answers_match(r.answer, c.answer) for r in g)
                                       for g, c in zip(groups, picked)) / len(picked),
                      "greedy": sum(answers_match(g[0].answer, c.answer) for g, c in zip(groups, picked)) / len(picked)}
    return verifier
