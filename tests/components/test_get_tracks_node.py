"""GetTracks node: output methods called directly on a real table with its track memory in a real Redis, and the
shipped get_tracks flow run by `lfx run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.langflow_support import NodeError, track_line
from overlay.roles import execute, question_numbers
from overlay.table import build_table
from overlay.tracks import TrackMemory
from overlay_components.overlay.get_tracks import GetTracksComponent

ROOT = Path(__file__).resolve().parents[2]
VARIANT = ("Natalia sold clips to 24 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
UNROUTABLE = "What is the capital of France?"
COLUMNS = ["rank", "similarity", "binding", "answer", "p", "verdict", "track", "question"]


def node(model, **values) -> GetTracksComponent:
    """A GetTracks node on the test table."""
    return GetTracksComponent(**({"domain": model.domain, "redis_url": model.redis_url, "k": 5} | values))


def test_tracks_are_the_memorys_tracks_with_the_choosers_verdict(overlay_model):
    best, found = TrackMemory(overlay_model.client, overlay_model.domain).choose(VARIANT, 5)
    component = node(overlay_model, question=VARIANT)
    frame = component.get_tracks()
    assert list(frame.columns) == COLUMNS
    assert frame["track"].tolist() == [r.track.id for r in found] and frame["rank"].tolist() == [1, 2, 3, 4, 5]
    assert frame["answer"].tolist() == [r.answer for r in found]
    assert frame["p"].tolist() == [round(r.p, 4) for r in found]
    assert best is not None and best.track.question.startswith("Natalia sold clips to 48")
    verdicts = dict(zip(frame["track"], frame["verdict"]))
    assert verdicts[best.track.id] == "followed" and list(verdicts.values()).count("followed") == 1
    assert set(verdicts.values()) <= {"followed", "refused", "not chosen"}
    assert component.status == f"5 tracks from lf-test v1; the chooser follows track {best.rank + 1} (p {best.p:.3f})"


def test_verdict_shows_the_followed_chain_with_the_questions_numbers(overlay_model):
    best, found = TrackMemory(overlay_model.client, overlay_model.domain).choose(VARIANT, 5)
    text = node(overlay_model, question=VARIANT).get_verdict().text
    lines = text.splitlines()
    assert lines[0].startswith(f"**Follows track {best.rank + 1}: answer 36** (p ")
    steps = execute(best.track.chain, best.binding, question_numbers(VARIANT))[1]
    shown = [line for line in lines if line.startswith("- **")]
    assert len(shown) == len(steps) and shown[-1] == "- **\\<ANSWER\\>** 36"
    assert "- **\\<ACTION\\>** CALL calc(24/2)" in shown and "- **\\<RESULT\\>** **12** (tool result)" in shown
    assert lines[-len(found):] == [line for line in lines if line[:3] in {f"{i}. " for i in range(1, 6)}]
    assert lines[-len(found)].startswith("1. followed: similarity ")


def test_a_question_no_track_fits_is_refused(overlay_model):
    best, found = TrackMemory(overlay_model.client, overlay_model.domain).choose(UNROUTABLE, 5)
    assert best is None and found
    component = node(overlay_model, question=UNROUTABLE)
    assert set(component.get_tracks()["verdict"]) == {"refused"}
    assert component.status.endswith("the chooser refuses every track")
    text = component.get_verdict().text
    assert text.startswith("**No track followed**: ") and "the table and the selector decode alone" in text
    assert "\\<ANSWER\\>" not in text


def test_a_question_without_known_words_finds_no_track(overlay_model):
    component = node(overlay_model, question="zzz qqq 3")
    assert component.get_tracks().empty
    assert component.get_verdict().text.startswith("**No track found**")


def test_domain_and_redis_come_from_the_environment_when_empty(overlay_model, monkeypatch):
    monkeypatch.setenv("OVERLAY_DOMAIN", overlay_model.domain)
    monkeypatch.setenv("OVERLAY_REDIS_URL", overlay_model.redis_url)
    assert len(GetTracksComponent(question=VARIANT, k=3).get_tracks()) == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"domain": ""}, "no domain given: fill the node's Domain field or set OVERLAY_DOMAIN"),
        ({"domain": "unknown"}, "no complete table for domain 'unknown'"),
        ({"domain": "bad domain!"}, "invalid domain name"),
        ({"version": 99}, "version 99 of 'lf-test' is missing"),
        ({"k": 0}, "Tracks (K) must be at least 1"),
        ({"question": ""}, "the question is empty"),
        ({"question": " \n\t "}, "the question is empty"),
        ({"question": "x" * 20_001}, "the limit is 20000"),
        ({"redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
    ],
)
def test_bad_settings_give_one_readable_line(overlay_model, monkeypatch, values, message):
    monkeypatch.delenv("OVERLAY_DOMAIN", raising=False)
    for output in ("get_tracks", "get_verdict"):
        with pytest.raises(NodeError) as info:
            getattr(node(overlay_model, **({"question": VARIANT} | values)), output)()
        error = info.value
        assert message in str(error) and "\n" not in str(error) and error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__


def test_a_table_without_tracks_says_how_to_get_them(redis_client):
    build_table(redis_client, "no-tracks", [[4, 5, 6, 7]], vocab_size=10)
    component = GetTracksComponent(question=VARIANT, domain="no-tracks", redis_url=f"unix://{redis_client.socket_file}")
    with pytest.raises(NodeError, match=r"table no-tracks v1 has no track memory: rebuild it with the Table Builder"):
        component.get_tracks()


def test_domain_dropdown_offers_the_complete_tables(overlay_model):
    component = GetTracksComponent()
    template = component.to_frontend_node()["data"]["node"]["template"]
    assert template["domain"]["combobox"] and template["domain"]["refresh_button"]
    template["redis_url"]["value"] = overlay_model.redis_url
    assert overlay_model.domain in component.update_build_config(template, "", "domain")["domain"]["options"]


def test_track_line_says_which_track_the_decoder_followed_or_that_none_was():
    row = {"rank": 0, "similarity": 0.91234, "p": 0.97, "answer": "72", "followed": True, "followed_decisions": 14,
           "left_track": False}
    other = {"rank": 1, "similarity": 0.4, "p": 0.2, "answer": "3", "followed": False}
    assert track_line([row, other]) == "Track: followed track 1 (similarity 0.912, p 0.970) for 14 decisions"
    assert track_line([row | {"left_track": True}]).endswith("for 14 decisions, then left it")
    assert track_line([row | {"followed": False}, other]) == (
        "Track: the chooser refused all 2 retrieved tracks (best p 0.970); the table and the selector decoded alone")
    assert track_line([other | {"answer": None}]) == (
        "Track: none of the 1 retrieved tracks could be followed; the table and the selector decoded alone")
    assert track_line([]) == ""


def test_lfx_run_of_the_shipped_flow_answers_with_the_verdict(overlay_model):
    env = os.environ | overlay_model.env()
    done = subprocess.run([Path(sys.executable).parent / "lfx", "run", ROOT / "flows" / "get_tracks.json", VARIANT,
                           "--format", "text"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = GetTracksComponent().k  # the flow holds the node's default K
    assert done.stdout.strip() == node(overlay_model, question=VARIANT, k=shipped).get_verdict().text
