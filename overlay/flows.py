"""The shipped Langflow flows, generated from the component classes: ``overlay flows export`` / ``check``.

Each flow is built with lfx's flow builder: our nodes come from ``Component().to_frontend_node()`` (so the
code embedded in a node is exactly its component file), the Chat Input/Output nodes from lfx's bundled
registry. Ids come from names and positions are fixed, so exporting twice gives identical files and ``check``
can say when a flow has drifted from its components.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

FLOWS_DIR = Path("flows")

flows_app = typer.Typer(help="Export the shipped Langflow flows from the components, or check them for drift.",
                        no_args_is_help=True)


@dataclass
class FlowSpec:
    """One flow: nodes (key → component type), edges (src, output, dst, input), canvas positions, node settings."""

    name: str
    description: str
    nodes: dict[str, str]
    edges: list[tuple[str, str, str, str]]
    positions: dict[str, tuple[int, int]]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def file(self) -> str:
        """File name under flows/."""
        return f"{self.name}.json"


FLOWS = (
    FlowSpec(
        name="overlay_reasoning",
        description="Question → Chain Decoder (GetNeighbours, IT-LM Selector, Accumulator, Tag Router) → "
                    "chain, with the per-token trace as a second output. Configure with OVERLAY_DOMAIN, "
                    "OVERLAY_MODEL_DIR and OVERLAY_REDIS_URL, or tweaks.",
        nodes={"question": "ChatInput", "table": "OverlayGetNeighbours", "selector": "OverlaySelector",
               "accumulator": "OverlayScoreAccumulator", "router": "OverlayTagRouter", "decoder": "OverlayDecoder",
               "chain": "ChatOutput", "trace": "TextOutput"},
        edges=[("question", "message", "decoder", "question"), ("table", "table", "decoder", "table"),
               ("selector", "selector", "decoder", "selector"),
               ("accumulator", "accumulator", "decoder", "accumulator"), ("router", "router", "decoder", "router"),
               ("decoder", "chain", "chain", "input_value"), ("decoder", "trace", "trace", "input_value")],
        positions={"table": (0, 0), "selector": (0, 500), "accumulator": (0, 1000), "router": (0, 1500),
                   "question": (560, 420), "decoder": (560, 820), "chain": (1120, 760), "trace": (1120, 1140)},
        settings={"chain": {"sender_name": "Overlay"}},
    ),
    FlowSpec(
        name="inspect_neighbours",
        description="Context text → GetNeighbours → the table's next-token candidates with weights and orders.",
        nodes={"context": "ChatInput", "neighbours": "OverlayGetNeighbours", "candidates": "ChatOutput"},
        edges=[("context", "message", "neighbours", "context"),
               ("neighbours", "candidates", "candidates", "input_value")],
        positions={"context": (0, 0), "neighbours": (520, 0), "candidates": (1040, 0)},
        settings={"candidates": {"sender_name": "Overlay"}},
    ),
    FlowSpec(
        name="get_tracks",
        description="Question → GetTracks → the training chains (tracks) it resembles, bound to its numbers, and the "
                    "chooser's verdict with the chain it would follow. Configure with OVERLAY_DOMAIN and "
                    "OVERLAY_REDIS_URL, or tweaks.",
        nodes={"question": "ChatInput", "tracks": "OverlayGetTracks", "verdict": "ChatOutput"},
        edges=[("question", "message", "tracks", "question"), ("tracks", "verdict", "verdict", "input_value")],
        positions={"question": (0, 0), "tracks": (520, 0), "verdict": (1040, 0)},
        settings={"verdict": {"sender_name": "Overlay"}},
    ),
    FlowSpec(
        name="build_table",
        description="Dataset path → Table Builder → a new version of the domain's semantic-weight table in Redis.",
        nodes={"path": "ChatInput", "builder": "OverlayTableBuilder", "report": "ChatOutput"},
        edges=[("path", "message", "builder", "path"), ("builder", "build", "report", "input_value")],
        positions={"path": (0, 0), "builder": (520, 0), "report": (1040, 0)},
        settings={"report": {"sender_name": "Overlay"}},
    ),
    FlowSpec(
        name="chain_feedback",
        description='Feedback as JSON ({"chain_id" or "text", "verdict": "correct" or "wrong", "answer", "apply"}) → '
                    "Chain Feedback → recorded in the domain's feedback log; with \"apply\": true also learned into a "
                    "new table version. Configure with OVERLAY_DOMAIN and OVERLAY_REDIS_URL, or tweaks.",
        nodes={"request": "ChatInput", "feedback": "OverlayChainFeedback", "report": "ChatOutput"},
        edges=[("request", "message", "feedback", "request"), ("feedback", "feedback", "report", "input_value")],
        positions={"request": (0, 0), "feedback": (520, 0), "report": (1040, 0)},
        settings={"report": {"sender_name": "Overlay"}},
    ),
)


def components() -> tuple[type, ...]:
    """Every node class of the bundle (one per file), imported on use so the `overlay` CLI starts without lfx."""
    import importlib
    import pkgutil

    from lfx.custom.custom_component.component import Component

    import overlay_components.overlay as bundle

    found = []
    for info in sorted(pkgutil.iter_modules(bundle.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{bundle.__name__}.{info.name}")
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, Component) and obj.__module__ == module.__name__]
    return tuple(found)


def component_source(cls: type) -> str:
    """The text of the file a component class is defined in (what Langflow executes)."""
    return Path(inspect.getfile(cls)).read_text(encoding="utf-8")


def registry() -> dict[str, dict]:
    """Node templates by type: lfx's bundled built-ins plus our components, each with its file as code."""
    from lfx.graph.flow_builder.builder import load_local_registry

    nodes = dict(load_local_registry())
    for cls in components():
        node = cls().to_frontend_node()["data"]["node"]
        node["template"]["code"]["value"] = component_source(cls)
        node["field_order"] = [i.name for i in cls.inputs]
        nodes[cls.name] = node
    return nodes


def flow_id(name: str) -> str:
    """A stable id for a shipped flow, shaped as a version-4 UUID (Langflow reserves version 5 for its own use)."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"langflow-overlay/{name}".encode()).digest()[:16], version=4))


def node_id(flow: str, key: str, kind: str) -> str:
    """A stable Langflow-style node id, e.g. ``OverlayDecoder-a1b2c``."""
    return f"{kind}-{hashlib.sha256(f'{flow}/{key}'.encode()).hexdigest()[:5]}"


def build_flow(spec: FlowSpec, nodes: dict[str, dict] | None = None) -> dict[str, Any]:
    """Build one flow dict from its spec with lfx's flow builder."""
    from lfx.graph.flow_builder import add_component, add_connection, configure_component, empty_flow

    nodes = nodes or registry()
    flow = empty_flow(name=spec.name, description=spec.description)
    ids = {key: node_id(spec.name, key, kind) for key, kind in spec.nodes.items()}
    for key, kind in spec.nodes.items():
        add_component(flow, kind, nodes, component_id=ids[key])
        if key in spec.settings:
            configure_component(flow, ids[key], spec.settings[key])
    for src, output, dst, field_name in spec.edges:
        add_connection(flow, ids[src], output, ids[dst], field_name)
    for node in flow["data"]["nodes"]:
        key = next(k for k, v in ids.items() if v == node["id"])
        node["position"] = dict(zip(("x", "y"), spec.positions[key]))
    return {
        "id": flow_id(spec.name),
        "name": spec.name,
        "description": spec.description,
        "endpoint_name": spec.name.replace("_", "-"),
        "icon": "route",
        "icon_bg_color": None,
        "is_component": False,
        "locked": False,
        "mcp_enabled": False,
        "webhook": False,
        "tags": ["overlay"],
        "data": flow["data"],
    }


def render(flow: dict[str, Any]) -> str:
    """The exact text a flow file holds."""
    return json.dumps(flow, indent=2, ensure_ascii=False) + "\n"


def export_flows(folder: Path = FLOWS_DIR) -> list[Path]:
    """Write every shipped flow into folder; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes = registry()
    written = []
    for spec in FLOWS:
        path = folder / spec.file
        path.write_text(render(build_flow(spec, nodes)), encoding="utf-8")
        written.append(path)
    return written


def drift(folder: Path = FLOWS_DIR) -> list[str]:
    """What differs between the flows in folder and a fresh export (empty when none has drifted)."""
    nodes = registry()
    sources = {cls.name: (cls, component_source(cls)) for cls in components()}
    problems = []
    for spec in FLOWS:
        path = folder / spec.file
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"{path}: not valid JSON ({exc})")
            continue
        for node in saved.get("data", {}).get("nodes", []):
            kind = node.get("data", {}).get("type")
            if kind in sources and node["data"]["node"]["template"]["code"]["value"] != sources[kind][1]:
                source = inspect.getfile(sources[kind][0])
                problems.append(f"{path}: node {node['id']} embeds code that differs from {source}")
        if saved != build_flow(spec, nodes):
            problems.append(f"{path}: differs from a fresh export")
    return problems


@flows_app.command("export")
def export_command(folder: Path = typer.Option(FLOWS_DIR, "--dir", help="Folder to write the flows into.")) -> None:
    """Regenerate the shipped flows from the component sources."""
    for path in export_flows(folder):
        typer.echo(f"wrote {path}")


@flows_app.command("check")
def check_command(folder: Path = typer.Option(FLOWS_DIR, "--dir", help="Folder holding the flows.")) -> None:
    """Fail (exit 1) when a flow has drifted from its components; fix with `overlay flows export`."""
    problems = drift(folder)
    for problem in problems:
        typer.echo(f"drift: {problem}", err=True)
    if problems:
        typer.echo("run `overlay flows export` to regenerate the flows", err=True)
        raise typer.Exit(1)
    typer.echo(f"{len(FLOWS)} flows match their components")
