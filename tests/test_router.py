"""Tests for overlay.router: step parsing, CHECK verification and the incremental Router."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.router import (
    Router,
    RouterEvent,
    Step,
    extract_answer,
    parse_steps,
    verify_check,
)

CHAIN = (
    "<Q> Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? "
    "<THOUGHT> Natalia sold 48/2 clips in May. <ACTION> CALL calc(48/2) <RESULT> 24 "
    "<THOUGHT> Natalia sold 48+24 clips altogether in April and May. <ACTION> CALL calc(48+24) <RESULT> 72 "
    "<CHECK> calc(48+24) = 72 <ANSWER> 72 <EOS>"
)
TAG_RE = re.compile(r"<[A-Z]+>")
TAGS = ["<Q>", "<THOUGHT>", "<ACTION>", "<RESULT>", "<CHECK>", "<ANSWER>", "<EOS>", "<BOS>", "<PAD>", "<UNK>"]


def tokens(text: str) -> list[tuple[str, bool]]:
    """Split a chain on whitespace, flagging tag tokens as the decoder would."""
    return [(token, bool(TAG_RE.fullmatch(token))) for token in text.split()]


def run(router: Router, items: list[tuple[str, bool]]) -> list[RouterEvent]:
    """Feed tokens and collect the events."""
    return [event for token, is_tag in items if (event := router.feed(token, is_tag)) is not None]


def test_parse_steps_example_chain() -> None:
    steps = parse_steps(CHAIN)
    assert [step.tag for step in steps] == [
        "Q", "THOUGHT", "ACTION", "RESULT", "THOUGHT", "ACTION", "RESULT", "CHECK", "ANSWER", "EOS",
    ]
    assert steps[0].text.startswith("Natalia sold clips") and steps[0].start == 0
    assert steps[2] == Step("ACTION", "CALL calc(48/2)", CHAIN.index("<ACTION>"), CHAIN.index("<RESULT>"))
    assert steps[3].text == "24" and steps[7].text == "calc(48+24) = 72" and steps[8].text == "72"
    assert steps[-1].text == "" and steps[-1].end == len(CHAIN)


def test_parse_steps_edge_cases() -> None:
    assert parse_steps("") == []
    assert parse_steps("   ") == []
    assert parse_steps("hello") == [Step("", "hello", 0, 5)]
    pre = parse_steps("  intro <THOUGHT> a <FOO> b <BOS><PAD> c")
    assert pre == [Step("", "intro", 2, 8), Step("THOUGHT", "a <FOO> b c", 8, 40)]
    assert [s.tag for s in parse_steps("<ANSWER>5<EOS>tail")] == ["ANSWER", "EOS"]
    assert parse_steps("<ANSWER>5<EOS>tail")[1].text == "tail"


chain_text = st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=12)), max_size=20).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), chain_text))
def test_parse_steps_never_raises_and_covers(text: str) -> None:
    steps = parse_steps(text)
    boundaries = [m for m in re.finditer(r"<(Q|THOUGHT|ACTION|RESULT|CHECK|ANSWER|EOS)>", text)]
    assert [s.tag for s in steps if s.tag] == [m.group(1) for m in boundaries]
    if not steps:
        assert " ".join(re.sub(r"<(BOS|PAD)>", "", text).split()) == ""
        return
    assert re.sub(r"<(BOS|PAD)>", "", text[: steps[0].start]).strip() == ""
    assert "".join(text[s.start : s.end] for s in steps) == text[steps[0].start :]
    for step in steps:
        content = text[step.start + (len(step.tag) + 2 if step.tag else 0) : step.end]
        assert step.text == " ".join(re.sub(r"<(BOS|PAD)>", "", content).split())


@pytest.mark.parametrize(
    ("claim", "verdict"),
    [
        ("calc(48+24) = 72", "pass"),
        ("48+24 = 72", "pass"),
        ("72 = 72.0", "pass"),
        ("1/3 = 0.3333333333", "pass"),
        ("1,000 + 1 = 1,001", "pass"),
        ("calc(48+24) == 72", "pass"),
        ("calc(48+24) = 73", "fail"),
        ("2*3 = 7", "fail"),
        ("1000000 = 1000001", "pass"),
        ("100 = 100.01", "fail"),
        ("", "unverifiable"),
        ("the answer is right", "unverifiable"),
        ("x = 5", "unverifiable"),
        ("1 = 1 = 1", "unverifiable"),
        ("calc(1/0) = 0", "unverifiable"),
        ("calc(9**9**9) = 1", "unverifiable"),
    ],
)
def test_verify_check(claim: str, verdict: str) -> None:
    got, reason = verify_check(claim)
    assert got == verdict and reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", "72"),
        ("The answer is 1,234 clips", "1234"),
        ("$3.50 each, 4 total", "3.50"),
        ("-5 degrees", "-5"),
        ("none", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_router_example_chain() -> None:
    router = Router()
    events = run(router, tokens(CHAIN))
    assert [e.kind for e in events] == ["inject", "inject", "verdict", "answer"]
    assert [e.inject_text for e in events[:2]] == ["<RESULT> 24", "<RESULT> 72"]
    assert events[0].step.tag == "ACTION" and events[0].step.text == "CALL calc(48/2)"
    assert events[2].verdict == "pass"
    assert router.answer == "72" and router.done
    assert [v.verdict for v in router.verdicts] == ["pass"]
    assert [(c.tool, c.output) for c in router.tool_calls] == [("calc", "24"), ("calc", "72")]
    assert router.counts == {"Q": 1, "THOUGHT": 2, "ACTION": 2, "RESULT": 2, "CHECK": 1, "ANSWER": 1, "EOS": 1}
    assert router.errors == []
    assert [(s.tag, s.text) for s in router.steps] == [(s.tag, s.text) for s in parse_steps(CHAIN)]
    assert router.steps[2].start == [t for t, _ in tokens(CHAIN)].index("<ACTION>")


def test_router_failing_check_and_unverifiable() -> None:
    router = Router()
    events = run(router, tokens("<CHECK> calc(48+24) = 73 <CHECK> it is fine <ANSWER> 73 <EOS>"))
    assert [(e.kind, e.verdict) for e in events] == [("verdict", "fail"), ("verdict", "unverifiable"), ("answer", None)]
    assert router.answer == "73"


def test_router_raising_tool_keeps_working() -> None:
    def boom(args: str) -> str:
        raise RuntimeError("kaboom <ANSWER> 1")

    router = Router(tools={"boom": boom, "calc": lambda args: "5"})
    events = run(router, tokens("<ACTION> CALL boom(1) <RESULT> <ACTION> CALL calc(2+3) <RESULT> 5 <ANSWER> 5 <EOS>"))
    assert events[0].kind == "error"
    assert events[0].inject_text == "<RESULT> error: tool 'boom' raised RuntimeError: kaboom ANSWER 1"
    assert events[1].kind == "inject" and events[1].inject_text == "<RESULT> 5"
    assert router.answer == "5" and len(router.errors) == 1 and "boom" in router.errors[0]
    assert [c.ok for c in router.tool_calls] == [False, True]


def test_router_malformed_steps_and_stream_end() -> None:
    router = Router()
    assert router.feed("hello") is None and router.current_tag == ""
    assert router.feed("<FOO>", is_tag=True).kind == "error"
    assert router.feed("<PAD>", is_tag=True) is None
    router.feed("<ACTION>", is_tag=True)
    router.feed("CALL")
    event = router.feed("<ANSWER>", is_tag=True)
    assert event.kind == "error" and event.inject_text.startswith("<RESULT> error:")
    assert router.feed("no") is None
    assert router.finish().kind == "error"
    assert router.feed("more").kind == "error"
    assert router.steps[0] == Step("", "hello <FOO>", 0, 3)
    assert len(router.errors) == 4


def test_router_with_decoded_pieces() -> None:
    router = Router(sep="")
    pieces = ["<ACTION>", " CALL", " calc", "(4", "8/", "2)", "<RESULT>"]
    events = [router.feed(piece, piece.startswith("<")) for piece in pieces]
    assert events[-1].inject_text == "<RESULT> 24"


MID_ACTION = [token for token, _ in tokens(CHAIN)].index("calc(48/2)")


@pytest.mark.parametrize("cut", [0, 5, MID_ACTION, MID_ACTION + 1, 41, 60, 66])
def test_router_resume_mid_chain(cut: int) -> None:
    items = tokens(CHAIN)
    uninterrupted = Router()
    run(uninterrupted, items)
    first = Router()
    events = run(first, items[:cut])
    resumed = Router.from_dict(json.loads(json.dumps(first.to_dict())))
    events += run(resumed, items[cut:])
    assert resumed.to_dict() == uninterrupted.to_dict()
    assert [e.kind for e in events] == ["inject", "inject", "verdict", "answer"]


@pytest.mark.parametrize("tag", ["ACTION", "CHECK"])
def test_a_chain_cut_inside_an_action_or_check_says_so(tag: str) -> None:
    """A stream that ends inside an ACTION or CHECK (the token limit) records the step as cut, not as a malformed call
    or an unverifiable claim."""
    router = Router()
    router.feed(f"<{tag}>", is_tag=True)
    for piece in ("CALL calc(144-" if tag == "ACTION" else "calc(144-144) =").split():
        router.feed(piece)
    event = router.finish()
    assert event.kind == "error" and router.done
    assert router.tool_calls == [] and router.verdicts == []
    assert router.steps[-1].tag == tag
    assert router.errors == [f"step 0 ({tag}): the chain was cut inside this {tag} "
                             f"({router.steps[-1].text!r}) by its end (the token limit or another stop), so it was not "
                             f"{'run' if tag == 'ACTION' else 'verified'}"]
