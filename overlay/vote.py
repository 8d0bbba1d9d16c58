"""Answer voting and best-of-N: decode several chains per question and choose one answer.

A chain *passes* when it is well-formed, has an answer, and made at least one CHECK with every CHECK consistent (every
training chain ends its work with a CHECK, so a chain without one checked nothing). Consistent CHECKs only restate the
chain's own arithmetic, so a wrong chain passes too; a verifier (``overlay.verifier``) scores whether the answer is
right. Choices: ``vote``, the majority answer among passing chains (when none passes, among all chains with an
answer; the result says so); ``verifier``, the answered chain the verifier scores highest (best-of-N);
``verifier-vote``, the answer whose chains' verifier scores sum highest. With no answer at all, the first chain's
result stands. Answers are compared as the evaluation compares them (``answers_match``), and
ties go to the answer whose best chain has the higher mean log-prob, the accumulator's score per chosen token.
Chain 0 decodes with the config as given (greedy at temperature 0), so one sample is exactly today's decode; the
others sample, each with its own seed derived from the config's, so a vote is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from overlay.chains import answers_match
from overlay.decode import DecodeConfig, DecodeResult, OverlayDecoder

if TYPE_CHECKING:
    from overlay.verifier import Verifier

MAX_SAMPLES = 64
SAMPLE_TEMPERATURE = 0.7  # what samples use when the config is greedy (temperature 0)
SAMPLE_TOP_P = 0.95
CHOICES = ("vote", "verifier", "verifier-vote")
RULES = {
    "checks": "majority among the chains whose checks are all consistent",
    "verifier": "the answered chain the verifier scores highest",
    "verifier-vote": "the answer whose chains' verifier scores sum highest",
    "answers": "no chain passed its checks: majority among all chains with an answer",
    "first": "no chain has an answer: the first chain's result",
}

Sampling = tuple[float, float, int]  # (temperature, top_p, seed) of one chain


def check_samples(samples: int) -> None:
    """Reject a number of samples the vote cannot use, saying what is allowed."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be between 1 and {MAX_SAMPLES} (1: one chain, no vote), got {samples}")


def sample_settings(config: DecodeConfig, samples: int) -> list[Sampling]:
    """Each chain's sampling: chain 0 the config's own; the others the config's temperature and top-p when it samples,
    else SAMPLE_TEMPERATURE and SAMPLE_TOP_P, each with a seed drawn from (config seed, chain index)."""
    check_samples(samples)
    temperature, top_p = ((config.temperature, config.top_p) if config.temperature > 0
                          else (SAMPLE_TEMPERATURE, SAMPLE_TOP_P))
    return [(config.temperature, config.top_p, config.seed)] + [
        (temperature, top_p, random.Random(f"{config.seed}:{i}").randrange(2**31)) for i in range(1, samples)]


def chain_score(result: DecodeResult) -> float:
    """The chain's mean log-prob per selector-chosen token (0.0 before any), as the accumulator reports it."""
    scored = result.trace.get("scored_tokens", 0)
    return result.trace.get("log_score", 0.0) / scored if scored else 0.0


def passes_checks(result: DecodeResult) -> bool:
    """True for a well-formed chain with an answer whose CHECKs (at least one) all pass."""
    return (result.answer is not None and result.well_formed and bool(result.verdicts)
            and all(v["verdict"] == "pass" for v in result.verdicts))


def same_answer(a: str | None, b: str | None) -> bool:
    """True when two answers agree as the evaluation compares them (two missing answers agree too)."""
    return (a is None and b is None) or (a is not None and b is not None and answers_match(a, b))


@dataclass
class VoteResult:
    """What the vote decided and what it saw: the answer, the chosen chain (the best-scoring chain giving the answer),
    the count per answer among the voting chains, how many chains passed their checks, the rule used, per chain the
    answer, checks, mean log-prob and (with a verifier) the verifier's probability that it is right."""

    answer: str | None
    chosen: int
    rule: str
    counts: dict[str, int]
    passed: int
    answers: list[str | None]
    passing: list[bool]
    scores: list[float]
    results: list[DecodeResult] = field(repr=False)
    sampling: list[Sampling] = field(default_factory=list)  # empty when vote() was not told how the chains were sampled
    verifier: list[float] = field(default_factory=list)  # empty when no verifier scored the chains

    @property
    def samples(self) -> int:
        """How many chains voted."""
        return len(self.answers)

    @property
    def chain(self) -> DecodeResult:
        """The chosen chain."""
        return self.results[self.chosen]

    def summary(self) -> str:
        """One line: the answer, its count, the rule, and how many chains passed their checks."""
        tally = ", ".join(f"{a} ×{n}" for a, n in self.counts.items())
        shown = f"{self.answer} ({tally})" if self.counts else "no answer"
        return (f"vote over {self.samples} chains: {shown}; {RULES[self.rule]}; {self.passed} of {self.samples} "
                f"had consistent checks; chosen: chain {self.chosen}")

    def chain_line(self, i: int) -> str:
        """One chain's line: its sampling, answer, checks, score, and whether it was chosen."""
        how = ""
        if self.sampling:
            temperature, top_p, seed = self.sampling[i]
            how = " (greedy)" if temperature == 0 else f" (temperature {temperature:g}, top-p {top_p:g}, seed {seed})"
        result = self.results[i]
        ok = sum(v["verdict"] == "pass" for v in result.verdicts)
        checks = f", checks {ok}/{len(result.verdicts)} consistent" if result.verdicts else ", no CHECK"
        checks += "" if result.well_formed else ", not well-formed"
        if self.verifier:
            checks += f", verifier {self.verifier[i]:.2f}"
        answer = self.answers[i] if self.answers[i] is not None else "no answer"
        mark = ", chosen" if i == self.chosen else ""
        return f"chain {i}{how}: {answer}{checks}, mean log-prob {self.scores[i]:.3f}{mark}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, per chain but without the chains themselves."""
        return {"answer": self.answer, "chosen": self.chosen, "rule": self.rule, "rule_text": RULES[self.rule],
                "counts": dict(self.counts), "passed": self.passed, "samples": self.samples, "answers": self.answers,
                "passing": self.passing, "scores": self.scores, "sampling": [list(s) for s in self.sampling],
                "verifier": self.verifier}


def check_choice(choose: str, verifier: object | None) -> None:
    """Reject an unknown choice, or a verifier choice without a verifier, saying what is allowed."""
    if choose not in CHOICES:
        raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {choose!r}")
    if choose != "vote" and verifier is None:
        raise ValueError(f"choosing by {choose} needs a trained verifier (overlay verifier train)")


def vote(results: list[DecodeResult], sampling: list[Sampling] | None = None, verifier: Sequence[float] | None = None,
         choose: str = "vote") -> VoteResult:
    """Choose an answer among decoded chains. ``vote``: the majority among the chains that pass their checks (else
    among all answered chains, else chain 0's result); ties and the chosen chain go to the higher mean log-prob, then
    to the earlier chain. ``verifier`` (the verifier's probability per chain) allows ``choose`` = ``verifier`` (the
    highest-scored answered chain) or ``verifier-vote`` (the answer with the highest sum of scores; its best chain)."""
    if not results:
        raise ValueError("vote needs at least one decoded chain")
    if sampling is not None and len(sampling) != len(results):
        raise ValueError(f"{len(sampling)} sampling settings for {len(results)} chains")
    check_choice(choose, verifier)
    if verifier is not None and len(verifier) != len(results):
        raise ValueError(f"{len(verifier)} verifier scores for {len(results)} chains")
    scores = [chain_score(r) for r in results]
    passing = [passes_checks(r) for r in results]
    answered = any(r.answer is not None for r in results)
    if choose != "vote" and answered:
        rule = choose
    else:
        rule = "checks" if any(passing) else "answers" if answered else "first"
    voters = [i for i, r in enumerate(results) if (passing[i] if rule == "checks" else r.answer is not None)]
    groups: list[list[int]] = []  # chains giving the same answer, in order of first appearance
    for i in voters:
        group = next((g for g in groups if answers_match(results[i].answer, results[g[0]].answer)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    weight = (lambda i: verifier[i]) if rule in ("verifier", "verifier-vote") else (lambda i: 1.0)
    best = [max(g, key=lambda i: (weight(i), scores[i], -i)) for g in groups]
    counts = {results[b].answer: len(g) for g, b in zip(groups, best)}
    if not groups:
        chosen = 0
    elif rule == "verifier":
        chosen = max(best, key=lambda i: (weight(i), scores[i], -i))
    else:
        chosen = max(zip(groups, best), key=lambda gb: (sum(weight(i) for i in gb[0]), scores[gb[1]], -gb[1]))[1]
    return VoteResult(results[chosen].answer, chosen, rule, counts, sum(passing), [r.answer for r in results], passing,
                      scores, list(results), list(sampling or []), list(verifier) if verifier is not None else [])


def decode_voted(decoder: OverlayDecoder, question: str, samples: int, config: DecodeConfig | None = None,
                 first: DecodeResult | None = None, verifier: Verifier | None = None,
                 choose: str = "vote") -> tuple[DecodeResult, VoteResult]:
    """Decode ``samples`` chains for one question together and choose (``vote``); returns the chosen chain and the vote.

    ``config``'s temperature, top-p and seed choose each chain's sampling (default: the decoder's config; the decoder's
    config sets everything else). ``first``, when given, is chain 0 already decoded with that config (the evaluation's
    greedy chain), so it is not decoded again. With a ``verifier`` each chain is scored among the others and its check
    (CHECK consistency and the verifier's verdict) recorded in its trace; ``choose`` says how the answer is chosen.
    """
    check_choice(choose, verifier)
    settings = sample_settings(config or decoder.config, samples)
    if first is not None and first.question != " ".join(question.split()):
        raise ValueError(f"the first chain answers another question: {first.question[:60]!r}")
    states = []
    for sampling in settings[0 if first is None else 1:]:
        states.append(decoder.new_state(question, sampling))
    results = ([first] if first is not None else []) + decoder.run_batch(states)
    scores = [c.p for c in verifier.check(results)] if verifier is not None else None
    result = vote(results, settings, scores, choose)
    return result.chain, result
