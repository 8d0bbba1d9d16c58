"""What the question-aware selector reads besides token ids: the chain's step state, and the numbers it may copy.

Both are pure functions of the token ids, computed the same way for training rows and while decoding, so the
selector never sees a state at decode time that training did not produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from overlay.chains import ACTION, ANSWER, CHECK, RESULT, SPECIAL_TOKENS, THOUGHT

TAG_CODES = {SPECIAL_TOKENS.index(t): code for t, code in ((THOUGHT, 1), (ACTION, 2), (CHECK, 3), (ANSWER, 4), (RESULT, 5))}
N_TAGS = 6
RESULT_ID = SPECIAL_TOKENS.index(RESULT)
DIGITS = "0123456789"


@dataclass(frozen=True)
class StepState:
    """The router's view after a token: the step's tag code, steps opened so far, tool results so far, and
    whether the token is the content of a tool result (those tokens stay in the selector's memory)."""

    tag: int = 0
    steps: int = 0
    results: int = 0
    in_result: bool = False

    def after(self, token: int) -> StepState:
        """The state once ``token`` has been read."""
        code = TAG_CODES.get(token)
        if code is not None:
            return StepState(code, self.steps + 1, self.results + (token == RESULT_ID), False)
        return StepState(self.tag, self.steps, self.results, self.tag == 5)

    def features(self, max_steps: int, max_results: int) -> tuple[int, int, int]:
        """(tag, step index, result count) clamped to the embedding tables' sizes."""
        return self.tag, min(self.steps, max_steps - 1), min(self.results, max_results - 1)


def step_states(stream: Sequence[int]) -> list[StepState]:
    """The state after each token of a chain stream (training computes all at once; decoding one by one)."""
    out, state = [], StepState()
    for token in stream:
        state = state.after(token)
        out.append(state)
    return out


class NumberSpans:
    """Finds whole numbers in token ids (digits are single tokens; '.' and ',' join digits) and spells values.

    A number is copied whole: its value drops thousands separators (``1,000`` → ``1000``), so a copy emits the
    digits the chains use.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        stripped = [t.strip() for t in texts]
        self.digit = [len(t) == 1 and t in DIGITS for t in stripped]
        self.joiner = [t in (".", ",") and t == raw for t, raw in zip(stripped, texts)]
        self.text = stripped
        self.ids = {t: i for i, t in enumerate(stripped) if len(t) == 1 and (t in DIGITS or t == ".")
                    and texts[i] == t}

    def in_number(self, token: int) -> bool:
        """True for a digit or a separator token (a copy may not start right after one)."""
        return self.digit[token] or self.joiner[token]

    def spans(self, ids: Sequence[int], start: int = 0) -> list[tuple[int, int, str]]:
        """(first, end, value) of every whole number in ids[start:], positions absolute, end exclusive."""
        out, i, n = [], start, len(ids)
        while i < n:
            if not self.digit[ids[i]] or (i > start and self.in_number(ids[i - 1])):
                i += 1
                continue
            j = i + 1
            while j < n and (self.digit[ids[j]] or (self.joiner[ids[j]] and j + 1 < n and self.digit[ids[j + 1]])):
                j += 1
            out.append((i, j, "".join(self.text[t] for t in ids[i:j] if self.text[t] != ",")))
            i = j
        return out

    def tokens(self, value: str) -> list[int]:
        """The token ids that spell a value."""
        return [self.ids[ch] for ch in value]

    def number_at(self, ids: Sequence[int], pos: int) -> tuple[int, str] | None:
        """(end, value) of the whole number that starts at ``pos``, or None when no number starts there."""
        if not self.digit[ids[pos]] or (pos > 0 and self.in_number(ids[pos - 1])):
            return None
        first, end, value = self.spans(ids[pos:pos + 64])[0]
        return pos + end, value


def token_texts(tokenizer) -> list[str]:
    """Each id's text, the ``▁`` word-start marker shown as a space and an ASCII fallback byte ``<0x41>`` as its
    character (what the decoder appends to the chain and routes)."""
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [chr(int(t[3:5], 16)) if len(t) == 6 and t.startswith("<0x") and int(t[3:5], 16) < 0x80
            else t.replace("\u2581", " ") for t in texts]
