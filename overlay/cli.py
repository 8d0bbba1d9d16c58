"""The ``overlay`` command line (typer): tables, and the quickstart main job."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional

import redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from overlay import store
from overlay import table as tbl
from overlay.cliutil import dataclass_params
from overlay.configs import DatasetConfig, ImproveConfig, TrainConfig
from overlay.flows import flows_app
from overlay.probe import probe_app
from overlay.tracks import TOP_K
from overlay.variants import VariantConfig, VariantError, stellator
from overlay.verifier import VerifierConfig


class StoreGuard(TyperGroup):
    """The root command group: a Redis store lost while any command runs ends it with one line, not a traceback."""

    def invoke(self, ctx: typer.Context) -> Any:
        """Run the command; map a lost connection (refused, reset, timed out) to the one-line error."""
        try:
            return super().invoke(ctx)
        except store.StoreUnavailable as exc:
            fail(str(exc))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            fail(f"lost the Redis store while the command ran ({type(exc).__name__}: {exc}): check that the server "
                 f"runs (without --redis-url or ${store.ENV_URL} the embedded one is started) and run the command again")


app = typer.Typer(help="Token-level reasoning overlays: Redis semantic-weight tables and a small selector LM.", no_args_is_help=True,
                  cls=StoreGuard)
table_app = typer.Typer(help="Build, inspect and drop semantic-weight tables.", no_args_is_help=True)
dataset_app = typer.Typer(help="Build token-level training datasets (Parquet shards).", no_args_is_help=True)
app.add_typer(table_app, name="table")
app.add_typer(dataset_app, name="dataset")
app.add_typer(flows_app, name="flows")
app.add_typer(probe_app, name="probe")
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

REDIS_OPT = typer.Option(None, "--redis-url", envvar=store.ENV_URL, help="Redis URL; default: the embedded server.")
TRACKS_OPT = typer.Option(TOP_K, "--tracks", help="GetTracks: retrieve this many tracks per question; the chooser's "
                          "track is followed (0: no track, the table and the selector alone).")
# One rule for every command that reads a domain: --domain, else $OVERLAY_DOMAIN, else the quickstart's domain.
# Only `table build` and `table drop`, which replace or delete a table, need the domain named.
ENV_DOMAIN = "OVERLAY_DOMAIN"
DEFAULT_DOMAIN = "gsm8k-sample"
DOMAIN = typer.Option(DEFAULT_DOMAIN, "--domain", envvar=ENV_DOMAIN, help="Table domain.")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
# Where a dataset's records keep their parts (load_chains' field mapping), shared by every command that reads one.
FIELD_OPTS: dict[str, tuple[Any, Any]] = {
    "question_field": (Optional[list[str]], typer.Option(
        None, "--question-field", help="Field holding the question; repeat it or give a comma list to join several "
                                       "fields with spaces (default: question).")),
    "steps_field": (str, typer.Option("steps", "--steps-field", help="jsonl: field holding the steps (list or lines).")),
    "answer_field": (str, typer.Option("answer", "--answer-field", help="Field holding the final answer.")),
    "equation_field": (str, typer.Option("equation", "--equation-field",
                                         help="jsonl: field with an equation, used when the steps hold no arithmetic.")),
}


def fail(message: str) -> NoReturn:
    """Print a one-line error on stderr (never wrapped) and exit with status 2 (bad input), never a traceback."""
    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}")
    raise typer.Exit(2)


def dataset_file(path: Path) -> Path:
    """Check a ``--data`` value before loading: a directory is called a directory, not a missing file."""
    if path.is_dir():
        fail(f"--data {path} is a directory: give a JSONL file of records")
    return path


def iso_time(stamp: str) -> str:
    """A Unix time stamp as ISO 8601 local time with its UTC offset."""
    return datetime.fromtimestamp(float(stamp)).astimezone().isoformat(timespec="seconds")


def client_or_fail(url: Optional[str]):
    """Connect to Redis or exit with the store's clear message."""
    try:
        return store.connect(url)
    except (store.StoreUnavailable, ValueError) as exc:
        fail(str(exc))


def open_table(client, domain: str, version: Optional[int] = None) -> tbl.SemanticTable:
    """Open a domain's table or exit naming what exists."""
    try:
        return tbl.SemanticTable(client, domain, version)
    except (tbl.TableNotFound, ValueError) as exc:
        fail(str(exc))


def field_map(question_field: Optional[list[str]], steps_field: str, answer_field: str,
              equation_field: str) -> dict[str, Any]:
    """load_chains' field arguments from the --*-field options; repeated and comma-separated question fields join."""
    questions = [f.strip() for value in question_field or ["question"] for f in value.split(",") if f.strip()]
    return {"question_field": questions, "steps_field": steps_field, "answer_field": answer_field,
            "equation_field": equation_field or None}


def load_or_fail(data: Path, fmt: str, fields: dict[str, Any], limit: Optional[int] = None):
    """Convert a dataset file to chains, or exit with one line saying why no record converted; warns on one line when
    the field mapping looks wrong (most answers not numbers, or most records noisy)."""
    from overlay.chains import load_chains

    try:
        report = load_chains(data, fmt, limit=limit, **fields)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if not report.chains:
        fail(f"{data}: no record could be converted to a chain ({report.summary()})")
    warn_mapping(data, report, fields)
    return report


def warn_mapping(data: Path, report: Any, fields: Optional[dict[str, Any]]) -> None:
    """Print one warning line on stderr when the converted chains' answers say the field mapping looks wrong."""
    from overlay.dataset import answer_warning

    warning = answer_warning(report.chains, report.noisy, (fields or {}).get("answer_field", "answer"))
    if warning:
        err_console.print(f"[bold yellow]warning:[/] {escape(f'{data}: {warning}')}")


def dataclass_command(target: typer.Typer, name: str, cls: type, run: Callable[..., None],
                      extra: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Register a command whose options are the fields of a dataclass config (TRL style), plus ``extra``."""

    def command(**kwargs: Any) -> None:
        run(**kwargs)

    command.__signature__ = inspect.Signature(dataclass_params(cls, extra))  # type: ignore[attr-defined]
    command.__doc__ = run.__doc__
    target.command(name)(command)


def build_from_file(client, data: Path, fmt: str, domain: str, *, max_order: int = 3, vocab_size: int = 2000,
                    tokenizer_path: Optional[Path] = None, limit: Optional[int] = None,
                    fields: Optional[dict[str, Any]] = None) -> tbl.BuildStats:
    """Build a new table version from a dataset file with a progress bar, printing what was written."""
    from overlay.chains import ChainFormatError
    from overlay.pipeline import build_table_from_file

    used_before = client.info("memory").get("used_memory", 0)
    with Progress(TextColumn("[bold]building table"), BarColumn(), TextColumn("{task.completed}/{task.total} keys"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("build", total=None)
        try:
            report, stats = build_table_from_file(
                client, data, fmt, domain, max_order=max_order, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                limit=limit, fields=fields, on_flush=lambda done, total: bar.update(task, completed=done, total=total))
        except (ChainFormatError, ValueError, OSError) as exc:
            fail(str(exc))
    console.print(report.summary())
    warn_mapping(data, report, fields)
    used_after = client.info("memory").get("used_memory", 0)
    console.print(
        f"[green]built[/] {domain} v{stats.version}: {stats.sequences} chains, {stats.tokens} tokens, "
        f"{stats.contexts} contexts, {stats.entries} entries, "
        f"{tbl.versions(client, domain).get(stats.version, {}).get('tracks', 0)} tracks in {stats.seconds:.1f} s; "
        f"Redis memory +{(used_after - used_before) / 2**20:.1f} MiB"
    )
    return stats


@table_app.command("build")
def table_build(
    data: Path = typer.Option(..., "--data", help="JSONL file of records.", callback=dataset_file),
    fmt: str = typer.Option("gsm8k", "--format", help="gsm8k or jsonl."),
    domain: str = typer.Option(..., "--domain", help="Domain to build; required, as a build replaces its table."),
    max_order: int = typer.Option(3, "--max-order", help="Longest context length N."),
    vocab_size: int = typer.Option(2000, "--vocab-size", help="Tokenizer vocabulary size when training one."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Use this tokenizer.json instead of training one."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N records."),
    question_field: Optional[list[str]] = FIELD_OPTS["question_field"][1],
    steps_field: str = FIELD_OPTS["steps_field"][1],
    answer_field: str = FIELD_OPTS["answer_field"][1],
    equation_field: str = FIELD_OPTS["equation_field"][1],
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Build a new version of a domain's table; the active pointer flips only when it is complete."""
    if fmt not in ("gsm8k", "jsonl"):
        fail(f"--format must be gsm8k or jsonl, not {fmt!r}")
    try:
        tbl.check_domain(domain)
    except ValueError as exc:
        fail(str(exc))
    build_from_file(client_or_fail(redis_url), data, fmt, domain, max_order=max_order, vocab_size=vocab_size,
                    tokenizer_path=tokenizer, limit=limit,
                    fields=field_map(question_field, steps_field, answer_field, equation_field))


def show_neighbours(table: tbl.SemanticTable, text: str, k: int) -> None:
    """Tokenise a context text and print its candidates with weights and the order used."""
    from overlay.tokenizer import encode

    if not text.strip():
        fail("the context text is empty: give at least one word")
    tok = table.tokenizer()
    ids = encode(tok, text)
    unknown = sum(1 for i in ids if i == tok.unk_token_id)
    if unknown:
        console.print(f"[yellow]note:[/] {unknown} unknown token(s) in the context; lookups back off past them")
    nb = table.neighbours(ids, k)
    console.print(f"GetNeighbours({text[-60:]!r}): {len(nb)} candidates, order used: {nb.order}")
    out = Table()
    for col in ("rank", "token", "id", "weight", "count", "order"):
        out.add_column(col)
    for rank, (i, w, c, o) in enumerate(zip(nb.ids, nb.weights, nb.counts, nb.orders), 1):
        out.add_row(str(rank), repr(tok.convert_ids_to_tokens(i)), str(i), f"{w:.3f}", str(c), str(o))
    console.print(out)


@table_app.command("neighbours")
def table_neighbours(
    context: str = typer.Argument(..., help="Context text; its last tokens are looked up."),
    domain: str = DOMAIN,
    k: int = typer.Option(16, "-k", "--k", help="Number of candidates."),
    version: Optional[int] = typer.Option(None, "--version"),
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Print GetNeighbours' candidates for a context: token, weight, count and the order used."""
    if k < 1:
        fail("-k must be at least 1")
    show_neighbours(open_table(client_or_fail(redis_url), domain, version), context, k)


@table_app.command("tracks")
def table_tracks(
    question: str = typer.Argument(..., help="The question to route."),
    domain: str = DOMAIN,
    k: int = typer.Option(5, "-k", "--k", help="Number of tracks."),
    version: Optional[int] = typer.Option(None, "--version"),
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """GetTracks: the training chains a question resembles, bound to its numbers, each followed with the calculator,
    and the chooser's verdict (the track it would follow, or a refusal)."""
    from overlay.roles import execute, question_numbers
    from overlay.tracks import TrackError, TrackMemory

    if k < 1:
        fail("-k must be at least 1")
    table = open_table(client_or_fail(redis_url), domain, version)
    try:
        memory = TrackMemory(table.client, domain, table.version)
        best, found = memory.choose(question, k)
    except TrackError as exc:
        fail(str(exc))
    out = Table(title=f"GetTracks({question[:60]!r}) on {domain} v{table.version}")
    for col in ("rank", "similarity", "binding", "answer", "p", "track question"):
        out.add_column(col)
    for r in found:
        out.add_row(str(r.rank + 1), f"{r.similarity:.3f}", f"{r.binding.confidence:.2f}", str(r.answer), f"{r.p:.3f}",
                    escape(r.track.question[:90]))
    console.print(out)
    if best is None:
        console.print(f"chooser: no track reaches p ≥ {memory.chooser.threshold:g}; the table and the selector decode alone")
        return
    console.print(f"chooser: follows rank {best.rank + 1} (p {best.p:.3f}):")
    for tag, text in execute(best.track.chain, best.binding, question_numbers(question))[1]:
        console.print(f"  {escape(tag)} {escape(text)}")


@table_app.command("list")
def table_list(redis_url: Optional[str] = REDIS_OPT) -> None:
    """List domains with their versions and which one is active; says which building versions were abandoned."""
    client = client_or_fail(redis_url)
    out = Table(title="semantic-weight tables")
    for col in ("domain", "version", "status", "contexts", "entries", "tracks", "active"):
        out.add_column(col)
    abandoned: dict[str, list[int]] = {}
    for domain in tbl.list_domains(client):
        active = tbl.active_version(client, domain)
        known = tbl.versions(client, domain)
        gone = tbl.abandoned_versions(client, domain, known)
        if gone:
            abandoned[domain] = gone
        for v, meta in known.items():
            status = meta.get("status", "?") + (" (abandoned)" if v in gone else "")
            out.add_row(domain, str(v), status, meta.get("contexts", "-"), meta.get("entries", "-"),
                        meta.get("tracks", "-"), "*" if v == active else "")
    console.print(out)
    for domain, gone in abandoned.items():
        console.print(f"{domain}: v{', v'.join(map(str, gone))} abandoned (its build or learn was stopped before it "
                      f"completed); the next build or learn of {domain} removes it, or now: overlay table drop {domain} --old")


@table_app.command("info")
def table_info(domain: str = typer.Argument(DEFAULT_DOMAIN, envvar=ENV_DOMAIN, help="Table domain."),
               version: Optional[int] = typer.Option(None, "--version"), redis_url: Optional[str] = REDIS_OPT) -> None:
    """Show a table version's meta data."""
    table = open_table(client_or_fail(redis_url), domain, version)
    for key, value in sorted(table.info().items()):
        console.print(f"{key:>16}: {iso_time(value) if key == 'created' else value}")


@table_app.command("drop")
def table_drop(domain: str = typer.Argument(...),
               version: Optional[int] = typer.Option(None, "--version", help="Drop only this (non-active) version."),
               old: bool = typer.Option(False, "--old", help="Drop every version except the active one."),
               redis_url: Optional[str] = REDIS_OPT) -> None:
    """Drop a whole domain, one old version, or all old versions."""
    try:
        dropped = tbl.drop_table(client_or_fail(redis_url), domain, version, keep_active=old)
    except (tbl.TableNotFound, ValueError) as exc:
        fail(str(exc))
    console.print(f"dropped {domain} versions {dropped or 'none'}")


@table_app.command("recall")
def table_recall(
    data: Path = typer.Option(..., "--data", help="Held-out JSONL records.", callback=dataset_file),
    domain: str = DOMAIN,
    fmt: str = typer.Option("gsm8k", "--format"),
    ks: str = typer.Option("8,32,128", "--k", help="Comma-separated K values."),
    question_field: Optional[list[str]] = FIELD_OPTS["question_field"][1],
    steps_field: str = FIELD_OPTS["steps_field"][1],
    answer_field: str = FIELD_OPTS["answer_field"][1],
    equation_field: str = FIELD_OPTS["equation_field"][1],
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Candidate recall@K on held-out chains: the ceiling of what any selector can reach."""
    from overlay.tokenizer import encode

    table = open_table(client_or_fail(redis_url), domain)
    tok = table.tokenizer()
    report = load_or_fail(data, fmt, field_map(question_field, steps_field, answer_field, equation_field))
    start = time.perf_counter()
    recall = tbl.candidate_recall(table, (encode(tok, c.to_text()) for c in report.chains), [int(k) for k in ks.split(",")])
    for k, r in recall.items():
        console.print(f"recall@{k}: {r:.4f}")
    console.print(f"({len(report.chains)} chains in {time.perf_counter() - start:.1f} s)")


@table_app.command("feedback")
def table_feedback(
    domain: str = typer.Argument(DEFAULT_DOMAIN, envvar=ENV_DOMAIN, help="Table domain."),
    chain_id: Optional[str] = typer.Option(None, "--chain-id", help="Id a chain was decoded under "
                                           "(generate --session, the Chain Decoder's Chain ID)."),
    text: Optional[str] = typer.Option(None, "--text", help="Or the chain's text: <Q> … <ANSWER> … <EOS>."),
    verdict: str = typer.Option(..., "--verdict", help="correct (raise the chain) or wrong (lower it)."),
    answer: Optional[str] = typer.Option(None, "--answer", help="With --verdict wrong: the right answer (recorded; "
                                         "no corrected chain is made up)."),
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Record people's verdict on a chain in the domain's feedback log; `table learn` applies it."""
    from overlay.learn import append_feedback, pending_feedback

    client = client_or_fail(redis_url)
    try:
        entry = append_feedback(client, domain, chain_id=chain_id, text=text, verdict=verdict, answer=answer)
        pending = len(pending_feedback(client, domain))
    except (tbl.TableNotFound, ValueError, store.StoreUnavailable) as exc:
        fail(str(exc))
    what = f"chain {chain_id}" if chain_id else "the chain text"
    right = f", right answer {' '.join(answer.split())}" if answer else ""
    console.print(f"recorded verdict {verdict.strip().lower()} on {what} as {entry} in {domain}'s feedback log{right}; "
                  f"{pending} pending: apply with `overlay table learn {domain}`")


@table_app.command("learn")
def table_learn(domain: str = typer.Argument(DEFAULT_DOMAIN, envvar=ENV_DOMAIN, help="Table domain."),
                redis_url: Optional[str] = REDIS_OPT) -> None:
    """Apply pending feedback as one new table version (correct chains raised, wrong ones lowered)."""
    from overlay.learn import apply_feedback

    client = client_or_fail(redis_url)
    with Progress(TextColumn("[bold]learning"), BarColumn(), TextColumn("{task.completed}/{task.total} keys"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("learn", total=None)
        try:
            report = apply_feedback(client, domain,
                                    on_flush=lambda done, total: bar.update(task, completed=done, total=total))
        except (tbl.TableNotFound, ValueError, store.StoreUnavailable) as exc:
            fail(str(exc))
    console.print(report.summary())
    if report.items:
        out = Table()
        for col in ("feedback id", "verdict", "chain id", "right answer", "chain"):
            out.add_column(col)
        for item in report.items:
            shown = item.text if len(item.text) <= 60 else item.text[:57] + "..."
            out.add_row(item.id, item.verdict, item.chain_id or "-", item.answer or "-", escape(shown))
        console.print(out)


def _dataset_build(data: Path, fmt: str, domain: str, out: Path, limit: Optional[int], redis_url: Optional[str],
                   question_field: Optional[list[str]], steps_field: str, answer_field: str, equation_field: str,
                   variants: int, **config: Any) -> None:
    """Cut chains into token-level windows with the table's candidates, written as Parquet shards; with --variants,
    every source chain plus the stellator variants of those that can become tracks."""
    from overlay.dataset import DatasetConfig, build_dataset, with_variants

    try:
        cfg = DatasetConfig(**config)
    except ValueError as exc:
        fail(str(exc))
    report = load_or_fail(data, fmt, field_map(question_field, steps_field, answer_field, equation_field), limit)
    chains = report.chains
    if variants:
        chains, lines = with_variants(chains, variants, cfg.seed)
        for line in lines:
            console.print(escape(line))
    table = open_table(client_or_fail(redis_url), domain)
    start = time.perf_counter()
    try:
        manifest = build_dataset(table, table.tokenizer(), chains, out, cfg)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"[green]dataset[/] {out}: {manifest.rows} rows in {len(manifest.shards)} shard(s), "
                  f"table recall in rows {manifest.present_rate:.3f}, {time.perf_counter() - start:.1f} s")


def _train(**kwargs: Any) -> None:
    """Train the IT-LM selector (or a LoRA adapter with --lora --domain NAME) on a dataset folder."""
    from overlay.train import config_from_kwargs, train

    try:
        result = train(config_from_kwargs(**kwargs))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    console.print(
        f"[green]trained[/] {result.out}{' adapter ' + result.adapter if result.adapter else ''}: step {result.step}, "
        f"eval accuracy {result.eval_accuracy}, {result.tokens_per_s:.0f} tokens/s, {result.seconds:.1f} s, "
        f"{result.params} params ({result.trainable_params} trainable)"
    )


def load_selector_or_fail(model: Path, domain: str, adapter: Optional[str]) -> tuple[Any, Any, str]:
    """(selector, tokenizer, adapter name) of a model folder, with the domain's adapter unless told otherwise
    (``--adapter none``: the base alone), or exit with one line."""
    from overlay.decode import adapter_for
    from overlay.selector import load_selector

    adapter = adapter_for(model, domain) if adapter is None else ("" if adapter == "none" else adapter)
    try:
        selector, tok = load_selector(model)
        if adapter:
            from overlay.train import load_adapters

            selector = load_adapters(model, [adapter])
    except (ValueError, OSError) as exc:
        fail(str(exc))
    return selector, tok, adapter


def verifier_or_fail(model: Path, path: Optional[Path], choose: str, samples: int):
    """The verifier for --choose: the one given by --verifier, else the model folder's own (None when it has none
    and the choice does not need one); exits with one line when it is missing, broken or cannot be used."""
    from overlay.verifier import Verifier, VerifierError, find_verifier, verifier_dir
    from overlay.vote import CHOICES

    if choose not in CHOICES:
        fail(f"--choose must be one of {', '.join(CHOICES)}, got {choose!r}")
    if choose != "vote" and samples < 2:
        fail(f"--choose {choose} picks one of several chains: give --samples N (N ≥ 2) too")
    try:
        verifier = Verifier.load(path) if path is not None else find_verifier(model)
    except VerifierError as exc:
        fail(str(exc))
    if verifier is None and choose != "vote":
        fail(f"--choose {choose} needs a verifier and {verifier_dir(model)} has none: train one with `overlay verifier "
             f"train --model {model} --data <training file>` or give --verifier")
    return verifier


def _eval(model: Path, data: Path, fmt: str, domain: str, out: Path, k_candidates: int, limit: Optional[int],
          generate: int, redis_url: Optional[str], fields: dict[str, Any], peer: Optional[Path] = None,
          variants: int = 0, variants_data: Optional[Path] = None, max_tokens: int = 256,
          adapter: Optional[str] = None, samples: int = 1, tracks: int = TOP_K, choose: str = "vote",
          verifier_path: Optional[Path] = None) -> None:
    """Evaluate next-token accuracy on held-out chains; optionally decode N questions (and held-out variants) with
    the overlay, the full-context peer and the table alone, and choose among ``samples`` overlay chains per question
    (vote, verifier best-of-N or verifier-weighted vote; pass@N beside)."""
    from overlay.evaluate import evaluate, write_report
    from overlay.generation import generation_markdown, heldout_variants, verification_success
    from overlay.selector import load_selector
    from overlay.vote import check_samples

    try:
        check_samples(samples)
    except ValueError as exc:
        fail(f"--{exc}")
    if samples > 1 and not (generate or variants):
        fail("--samples votes over decoded chains: give --generate N or --variants N too")
    verifier = verifier_or_fail(model, verifier_path, choose, samples) if samples > 1 or choose != "vote" else None
    selector, tok, adapter = load_selector_or_fail(model, domain, adapter)
    try:
        peer_model = load_selector(peer)[0] if peer else None
    except (ValueError, OSError) as exc:
        fail(str(exc))
    report = load_or_fail(data, fmt, fields, limit)
    table = open_table(client_or_fail(redis_url), domain)
    try:
        results = evaluate(table, selector, tok, report.chains, K=k_candidates)
    except ValueError as exc:
        fail(str(exc))
    from overlay.decode import DecodeConfig

    try:
        config = DecodeConfig(max_tokens=max_tokens, k_candidates=k_candidates, tracks=tracks)
    except ValueError as exc:
        fail(str(exc))
    markdown = ""
    if generate:
        results["generation"] = verification_success(table, selector, tok, report.chains[:generate], config,
                                                     peer=peer_model, progress=True, keep=5, adapter=adapter,
                                                     samples=samples, verifier=verifier, choose=choose)
        markdown += generation_markdown(results["generation"], f"Chains decoded end to end, {data.name}")
    if variants:
        chains = heldout_variants(str(variants_data or data), variants)
        results["variants"] = verification_success(table, selector, tok, chains, config, peer=peer_model,
                                                   progress=True, keep=5, adapter=adapter, samples=samples,
                                                   verifier=verifier, choose=choose)
        markdown += generation_markdown(results["variants"], f"Held-out variants of the first {variants} records")
    paths = write_report(results, out)
    if markdown:
        with (out / "eval.md").open("a") as md:
            md.write(markdown)
    console.print((out / "eval.md").read_text())
    console.print(f"report: {', '.join(str(p) for p in paths)}")


DATA_OPT = (Path, typer.Option(..., "--data", help="JSONL file of records.", callback=dataset_file))
FMT_OPT = (str, typer.Option("gsm8k", "--format", help="gsm8k or jsonl."))
DOMAIN_OPT = (str, DOMAIN)
LIMIT_OPT = (Optional[int], typer.Option(None, "--limit", help="Use only the first N records."))
URL_OPT = (Optional[str], REDIS_OPT)
dataclass_command(dataset_app, "build", DatasetConfig, _dataset_build,
                  {"data": DATA_OPT, "fmt": FMT_OPT, "domain": DOMAIN_OPT,
                   "variants": (int, typer.Option(0, "--variants", help="Stellator: also train on N consistent variants "
                                                  "of each chain (numbers, names and wording changed, results recomputed).")),
                   "out": (Path, typer.Option(..., "--out", help="Dataset folder to write.")),
                   "limit": LIMIT_OPT, "redis_url": URL_OPT, **FIELD_OPTS})
dataclass_command(app, "train", TrainConfig, _train)


def _dataset_variants(data: Path, fmt: str, out: Path, limit: Optional[int], question_field: Optional[list[str]],
                      steps_field: str, answer_field: str, equation_field: str, **config: Any) -> None:
    """Stellator data: consistent variants of every chain (results, CHECKs and ANSWER recomputed), written as
    train.jsonl (sources + training variants), heldout.jsonl (never trained) and stats.json."""

    report = load_or_fail(data, fmt, field_map(question_field, steps_field, answer_field, equation_field), limit)
    try:
        vset, stats = stellator(report.chains, VariantConfig(**config))
    except VariantError as exc:
        fail(str(exc))
    paths = vset.write(out)
    stats |= {"data": str(data), "format": fmt}
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=1))
    tmp.replace(out / "stats.json")
    console.print(f"[green]variants[/] {stats['tracks']} of {stats['chains']} chains became tracks, "
                  f"{stats['chains_with_variants']} produced variants ({stats['variants_per_chain']} per chain); "
                  f"{stats['verified']} of {stats['train_chains'] + stats['heldout_chains']} chains verify")
    for what in ("chains_skipped", "draws_skipped"):
        shown = "; ".join(f"{r}: {n}" for r, n in list(stats[what].items())[:4]) or "none"
        console.print(f"{what.replace('_', ' ')}: {shown}")
    console.print(f"→ {paths['train']} ({len(vset.train)} chains), {paths['heldout']} ({len(vset.heldout)}), "
                  f"{out / 'stats.json'}")


def _improve(model: Path, data: Path, fmt: str, domain: str, out: Path, test: Optional[Path], limit: Optional[int],
             replay_data: Optional[Path], replay_limit: Optional[int], redis_url: Optional[str],
             question_field: Optional[list[str]], steps_field: str, answer_field: str, equation_field: str,
             **config: Any) -> None:
    """Self-improvement rounds: decode training questions, keep verified chains with the gold answer, learn them into a
    new table version and continue training the selector on them; resumes an interrupted run in --out."""
    from overlay.improve import run_improve

    try:
        cfg = ImproveConfig(**config)
    except ValueError as exc:
        fail(str(exc))
    fields = field_map(question_field, steps_field, answer_field, equation_field)
    chains = load_or_fail(data, fmt, fields, limit).chains
    tests = load_or_fail(test, fmt, fields).chains if test else None
    replay = load_or_fail(replay_data, fmt, fields, replay_limit).chains if replay_data else None
    client = client_or_fail(redis_url)
    try:
        rounds = run_improve(client, domain, model_dir_for(domain, model), chains, out, cfg, tests, log=console.print,
                             replay=replay)
    except (ValueError, FileNotFoundError, LookupError, store.StoreUnavailable) as exc:
        fail(str(exc))
    for r in rounds:
        test_part = f", test exact-match {r['test']['exact_match']:.3f}" if "test" in r else ""
        console.print(f"round {r['round']}: solved {r['solved']:.3f} of {r['questions']} training questions, "
                      f"{r['kept_chains']} chains kept, table v{r['table_version']}{test_part}")
    console.print(f"[green]state:[/] {out / 'state.json'}")


dataclass_command(dataset_app, "variants", VariantConfig, _dataset_variants,
                  {"data": DATA_OPT, "fmt": FMT_OPT,
                   "out": (Path, typer.Option(..., "--out", help="Folder for train.jsonl, heldout.jsonl, stats.json.")),
                   "limit": LIMIT_OPT, **FIELD_OPTS})


@app.command("eval")
def eval_command(
    model: Path = typer.Option(..., "--model", help="Selector model folder."),
    data: Path = DATA_OPT[1], fmt: str = FMT_OPT[1], domain: str = DOMAIN_OPT[1],
    out: Path = typer.Option(Path("eval-report"), "--out", help="Report folder (JSON, Markdown, PNG)."),
    k_candidates: int = typer.Option(32, "--k", help="Candidates per token (K)."),
    limit: Optional[int] = LIMIT_OPT[1],
    generate: int = typer.Option(0, "--generate", help="Also decode the first N questions and report verification success."),
    peer: Optional[Path] = typer.Option(None, "--peer", help="Full-context peer folder (train --arch peer) decoded beside."),
    variants: int = typer.Option(0, "--variants", help="Also decode held-out variants of the first N training records."),
    variants_data: Optional[Path] = typer.Option(None, "--variants-data", help="GSM8K-format training file for --variants."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Token limit per decoded chain."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter of the model folder to use "
                                          "(default: the domain's, when the folder has one; 'none': the base alone)."),
    samples: int = typer.Option(1, "--samples", help="Also decode N overlay chains per question (chain 0 greedy, the "
                                "others sampled), choose an answer among them (--choose) and report it beside greedy, "
                                "the plain vote and pass@N; 1: greedy alone."),
    choose: str = typer.Option("vote", "--choose", help="How --samples chooses the answer: vote (majority of chains with "
                               "consistent checks), verifier (the chain the verifier scores highest: best-of-N) or "
                               "verifier-vote (answers weighted by verifier score)."),
    verifier: Optional[Path] = typer.Option(None, "--verifier", help="Verifier folder (default: the model folder's "
                                            "verifier/, when it has one; then every choice is reported)."),
    tracks: int = TRACKS_OPT,
    question_field: Optional[list[str]] = FIELD_OPTS["question_field"][1],
    steps_field: str = FIELD_OPTS["steps_field"][1],
    answer_field: str = FIELD_OPTS["answer_field"][1],
    equation_field: str = FIELD_OPTS["equation_field"][1],
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Evaluate a selector against the table-only and full-vocabulary baselines on held-out chains."""
    _eval(model, data, fmt, domain, out, k_candidates, limit, generate, redis_url,
          field_map(question_field, steps_field, answer_field, equation_field), peer, variants, variants_data, max_tokens,
          adapter, samples, tracks, choose, verifier)


def _verifier_train(model: Path, data: Path, fmt: str, domain: str, out: Optional[Path], limit: Optional[int],
                    adapter: Optional[str], tracks: int, redis_url: Optional[str], question_field: Optional[list[str]],
                    steps_field: str, answer_field: str, equation_field: str, **config: Any) -> None:
    """Train the chain verifier: decode N chains per training question with the selector (each question routed
    without its own track), label them by the gold answer, fit, and save it beside the selector (MODEL/verifier);
    prints its ranking of held-out chains (AUC) and its cost per chain."""
    import torch

    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.tracks import open_tracks
    from overlay.verifier import VerifierError, train_verifier, verifier_dir

    try:
        cfg = VerifierConfig(**config)
        decode_config = DecodeConfig(max_tokens=cfg.max_tokens, tracks=tracks)
    except ValueError as exc:
        fail(str(exc))
    torch.set_num_threads(cfg.threads)
    chains = load_or_fail(data, fmt, field_map(question_field, steps_field, answer_field, equation_field), limit).chains
    selector, tok, adapter = load_selector_or_fail(model, domain, adapter)
    table = open_table(client_or_fail(redis_url), domain)
    decoder = OverlayDecoder(table, selector, tok, decode_config, adapter=adapter, tracks=open_tracks(table))
    try:
        verifier = train_verifier(decoder, chains, cfg, progress=True)
    except VerifierError as exc:
        fail(str(exc))
    verifier.info |= {"model": str(model), "adapter": adapter or None, "domain": domain,
                      "table_version": table.version, "data": str(data)}
    folder = verifier.save(out or verifier_dir(model))
    info = verifier.info

    def shown(key: str, fmt: str = "{:.3f}") -> str:
        return "n/a" if info.get(key) is None else fmt.format(info[key])

    console.print(f"[green]verifier[/] {folder}: {info['chains']} chains of {info['questions']} questions "
                  f"({info['right']} right; greedy {info['greedy']:.3f}, pass@{cfg.samples} {info['pass_at_n']:.3f}), "
                  f"decoded in {info['decode_seconds']:.1f} s")
    console.print(f"held out: {info['held_out_chains']} chains of {info['held_out_questions']} questions "
                  f"({info['held_out_right']} right): AUC {shown('auc_peers')} among samples, {shown('auc_alone')} "
                  f"alone; accuracy at {cfg.threshold:g}: {shown('accuracy_peers')} / {shown('accuracy_alone')}")
    console.print(f"cost: {shown('ms_per_chain_peers', '{:.3f}')} ms per chain, "
                  f"{shown('cost_share_of_decode', '{:.2%}')} of decoding it ({shown('decode_ms_per_chain', '{:.1f}')} ms)")


verifier_app = typer.Typer(help="The chain verifier: scores whether a decoded chain's answer is right.",
                           no_args_is_help=True)
app.add_typer(verifier_app, name="verifier")
dataclass_command(verifier_app, "train", VerifierConfig, _verifier_train,
                  {"model": (Path, typer.Option(..., "--model", help="Selector model folder.")),
                   "data": DATA_OPT, "fmt": FMT_OPT, "domain": DOMAIN_OPT,
                   "out": (Optional[Path], typer.Option(None, "--out", help="Verifier folder to write (default: "
                                                        "MODEL/verifier, where eval and the nodes look).")),
                   "limit": LIMIT_OPT,
                   "adapter": (Optional[str], typer.Option(None, "--adapter", help="LoRA adapter of the model folder "
                                                           "(default: the domain's; 'none': the base alone).")),
                   "tracks": (int, TRACKS_OPT), "redis_url": URL_OPT, **FIELD_OPTS})


TAG_STYLE = {"<THOUGHT>": "bold cyan", "<ACTION>": "bold yellow", "<RESULT>": "bold green", "<CHECK>": "bold magenta",
             "<ANSWER>": "bold blue", "<Q>": "bold white", "<EOS>": "dim"}


def print_chain(result) -> None:
    """Print a decoded chain with each tag coloured, tool calls, check verdicts and the score summary."""
    from rich.text import Text

    text = Text()
    for word in result.text.split(" "):
        text.append(word + " ", style=TAG_STYLE.get(word, ""))
    console.print(text)
    for call in result.tool_calls:
        status = f"[green]{call['output']}[/]" if call["ok"] else f"[red]error: {call['error']}[/]"
        console.print(f"  tool {call['tool']}({call['args']}) → {status}")
    for v in result.verdicts:
        colour = {"pass": "green", "fail": "red"}.get(v["verdict"], "yellow")
        console.print(f"  check {v['claim']!r}: [{colour}]{v['verdict']}[/] ({v['reason']})")
    trace = result.trace
    console.print(f"answer: [bold]{result.answer}[/]  stop: {result.stop_reason}  tokens: {result.tokens}  "
                  f"log-score: {trace['log_score']:.2f}  decode: {result.seconds * 1000 / max(1, result.tokens):.2f} ms/token")
    for error in result.errors:
        console.print(f"  [yellow]note:[/] {error}")
    console.print(track_line(result.tracks))


def track_line(tracks: list[dict[str, Any]]) -> str:
    """Which retrieved track the chain followed (rank, similarity, the chooser's p, decisions taken from it), or that
    the chooser refused them all."""
    if not tracks:
        return "track: none retrieved (no track memory, or nothing alike)"
    followed = next((t for t in tracks if t.get("followed")), None)
    if followed is None:
        best = max(tracks, key=lambda t: t["p"])
        return f"track: all {len(tracks)} retrieved refused (best p {best['p']:.2f}); the table and the selector decoded alone"
    left = ", then left it" if followed.get("left_track") else ""
    return (f"track: followed rank {followed['rank'] + 1} of {len(tracks)} (similarity {followed['similarity']:.2f}, "
            f"p {followed['p']:.2f}) for {followed.get('followed_decisions', 0)} decisions{left}: "
            f"{escape(followed['question'][:80])}")


def model_dir_for(domain: str, model: Optional[Path]) -> Path:
    """The model folder to use: the one given, else the one quickstart/train put under the data directory."""
    return model or store.data_dir() / "models" / domain


@app.command()
def generate(
    question: str = typer.Argument(..., help="The question to reason about."),
    domain: str = DOMAIN,
    model: Optional[Path] = typer.Option(None, "--model", help="Selector folder (default: $OVERLAY_HOME/models/DOMAIN)."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Write the full JSON trace here."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    session: Optional[str] = typer.Option(None, "--session", help="Session id: continue this chain in a later call."),
    tracks: int = TRACKS_OPT,
    samples: int = typer.Option(1, "--samples", help="Decode N chains (chain 0 as set, the others sampled with seeds "
                                "from --seed) and answer by majority among those whose checks all pass."),
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """Answer a question with the overlay: table candidates, selector choices, tool calls and checks."""
    import json

    from overlay.decode import load_decoder
    from overlay.vote import check_samples, decode_voted

    try:
        check_samples(samples)
    except ValueError as exc:
        fail(f"--{exc}")
    if samples > 1 and session:
        fail("--session continues one chain: it cannot be combined with --samples above 1")
    folder = model_dir_for(domain, model)
    start = time.perf_counter()
    client_or_fail(redis_url)
    try:
        decoder = load_decoder(domain, str(folder), redis_url, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, tracks=tracks)
        loaded = time.perf_counter() - start  # load_decoder also warms the decoder up
        if samples > 1:
            result, vote = decode_voted(decoder, question, samples)
        else:
            result, vote = decoder.generate(question, session_id=session), None
    except (ValueError, FileNotFoundError, LookupError, store.StoreUnavailable) as exc:
        fail(str(exc))
    console.print(f"loaded in {loaded:.2f} s (selector, table, warm-up)")
    if vote is not None:
        console.print(escape(vote.summary()))
        for i in range(vote.samples):
            console.print("  " + escape(vote.chain_line(i)))
        console.rule(f"chosen: chain {vote.chosen}")
    print_chain(result)
    if trace:
        trace.write_text(json.dumps(result.to_dict() | ({"vote": vote.to_dict()} if vote else {}), indent=1))
        console.print(f"trace: {trace}")


@app.command()
def quickstart(
    data_dir: Path = typer.Option(EXAMPLES, "--data-dir", help="Folder with gsm8k_train_sample.jsonl and gsm8k_test_sample.jsonl."),
    domain: str = DOMAIN,
    steps: int = typer.Option(300, "--steps", help="Selector training steps."),
    fresh: bool = typer.Option(False, "--fresh", help="Rebuild everything instead of reusing what exists."),
    redis_url: Optional[str] = REDIS_OPT,
) -> None:
    """The main job on the shipped sample: table, dataset, selector, evaluation, three traced answers, report."""
    import json

    from overlay.pipeline import QuickstartConfig, run_quickstart

    client_or_fail(redis_url)
    try:
        report = run_quickstart(data_dir, QuickstartConfig(domain=domain, steps=steps), fresh=fresh,
                                redis_url=redis_url, log=console.print)
    except (ValueError, FileNotFoundError, LookupError, store.StoreUnavailable) as exc:
        fail(str(exc))
    console.print((report / "eval.md").read_text().split("\n### ")[0])
    from overlay.decode import DecodeResult

    results = json.loads((report / "eval.json").read_text())
    variants = results["variants"]
    right = round(variants["overlay"]["exact_match"] * variants["questions"])
    console.print(f"[bold]held-out variants answered right: {right} of {variants['questions']}[/] (overlay following "
                  f"the tracks; table alone {round(variants['table_only']['exact_match'] * variants['questions'])}"
                  + (f", chosen track alone {round(variants['track_only']['exact_match'] * variants['questions'])}"
                     if "track_only" in variants else "") + ")")

    for ex in json.loads((report / "examples.json").read_text()):
        ex.pop("well_formed")
        expected, label = ex.pop("expected"), ex.pop("label")
        console.rule(f"{label}: expected answer {expected}")
        print_chain(DecodeResult(**ex))
    console.print(f"[bold green]report:[/] {report}")



dataclass_command(app, "improve", ImproveConfig, _improve,
                  {"model": (Optional[Path], typer.Option(None, "--model", help="Selector folder to start from "
                                                          "(default: the domain's model)")),
                   "data": DATA_OPT, "fmt": FMT_OPT, "domain": DOMAIN_OPT,
                   "out": (Path, typer.Option(..., "--out", help="Run folder (state.json, round-N/); resumed if it exists.")),
                   "test": (Optional[Path], typer.Option(None, "--test", help="Test JSONL: exact-match after each round.")),
                   "replay_data": (Optional[Path], typer.Option(None, "--replay-data", help="The chains the start model "
                                                                "was trained on, replayed each round (default: --data's).")),
                   "replay_limit": (Optional[int], typer.Option(None, "--replay-limit", help="Only the first N of them.")),
                   "limit": LIMIT_OPT, "redis_url": URL_OPT, **FIELD_OPTS})


@app.command("info")
def info(redis_url: Optional[str] = REDIS_OPT) -> None:
    """Which paths run here: the data folder, the Redis store a command would use (not started), and the selector's
    per-token step (the compiled C kernel, or the slower NumPy path and why)."""
    from importlib.metadata import version

    from overlay.selector import qa_kernel

    console.print(f"langflow-overlay {version('langflow-overlay')}")
    console.print(f"data folder: {store.data_dir()}")
    console.print(f"redis: {store.redact(redis_url) if redis_url else 'embedded (' + str(store.data_dir() / 'overlay.rdb') + ')'}")
    if qa_kernel.load() is not None:
        console.print(f"selector step: compiled C kernel (cache {qa_kernel.cache_dir()})")
    else:
        console.print(f"selector step: NumPy, about 2x slower ({escape(qa_kernel.reason())})")


if __name__ == "__main__":
    app()
