"""Typer options generated from dataclass configs (TRL style), shared by every ``overlay`` sub-command."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import typer


def dataclass_params(cls: type, extra: dict[str, tuple[Any, Any]] | None = None) -> list[inspect.Parameter]:
    """Keyword parameters for ``extra`` (name → (annotation, default)) then one option per dataclass field.

    Booleans get ``--name/--no-name`` so a field that defaults to True can be switched off.
    """
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for n, (a, d) in (extra or {}).items()]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f.name.replace("_", "-")
        decl = f"--{flag}/--no-{flag}" if hints[f.name] is bool else f"--{flag}"
        option = typer.Option(f.default, decl, help=f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=option))
    return params
