"""The track probe's report: one "token → attention → embedding shift → output" figure per example, the summary
figure across models and prefixes, and the Markdown tables (overlay/probe.py computes what they show)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


KIND_COLOURS = {"tag": "#1f77b4", "number": "#d62728", "operator": "#9467bd", "word": "#333333"}
MODEL_COLOURS = ["#2ca02c", "#ff7f0e", "#17becf", "#8c564b"]
TAG_COLOURS = {"THOUGHT": "#9edae5", "ACTION": "#c5b0d5", "CHECK": "#f7b6d2", "ANSWER": "#dbdb8d"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _boundary(positions: list[int], token: int | None) -> float | None:
    """x of the boundary before ``token``: the column predicting it is the one before (token - 1)."""
    if token is None:
        return None
    if token - 1 in positions:
        return positions.index(token - 1) + 0.5
    return positions.index(token) - 0.5 if token in positions else None


def example_figure(ex: dict, path: str | Path) -> Path:
    """One example as "token → attention → embedding shift → output": heatmaps of attention on anchor tokens and of
    the hidden-state shift from the source chain per layer, for each model, over p(expected next token)."""
    import numpy as np

    plt = _plt()
    names = list(ex["models"])
    P = len(ex["tokens"])
    rows = [("attention", n) for n in names] + [("shift", n) for n in names] + [("output", None)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(10.0, 0.2 * P + 2.5), 1.55 * len(rows) + 2.2))
    x = np.arange(P)
    cut = _boundary(ex["positions"], ex["prefix_end"])
    for ax, (what, name) in zip(axes, rows):
        if what == "output":
            for c, n in enumerate(names):
                m = ex["models"][n]
                colour = MODEL_COLOURS[c % len(MODEL_COLOURS)]
                ax.plot(x, m["p_next"], "-o", ms=3, lw=1.2, color=colour, label=f"{n}: p(expected next token)")
                bad = [i for i, ok in enumerate(m["top1_ok"]) if not ok]
                ax.plot(bad, [m["p_next"][i] for i in bad], "x", ms=7, color=colour)
            ax.set_ylim(-0.05, 1.1)
            ax.set_ylabel("output\np(next)")
            ax.legend(loc="lower left", fontsize=7, ncol=len(names))
        else:
            m = ex["models"][name]
            data = np.array(m["anchor_attention"] if what == "attention" else
                            [[np.nan if v is None else v for v in row] for row in m["shift"]], dtype=float)
            top = 1.0 if what == "attention" else max(0.05, float(np.nanmax(data)) if np.isfinite(data).any() else 0.05)
            first = 1 if what == "attention" else 0
            im = ax.imshow(data, aspect="auto", interpolation="nearest", vmin=0, vmax=top,
                           cmap="viridis" if what == "attention" else "magma_r",
                           extent=(-0.5, P - 0.5, first + data.shape[0] - 0.5, first - 0.5))
            ax.set_yticks(range(first, first + data.shape[0]))
            label = "attention\non anchors" if what == "attention" else "embedding shift\n1 − cos(source)"
            ax.set_ylabel(f"{name}\n{label}\nlayer", fontsize=8)
            cax = ax.inset_axes([1.005, 0.0, 0.012, 1.0])
            fig.colorbar(im, cax=cax)
        for c, n in enumerate(names):
            at = _boundary(ex["positions"], ex["models"][n]["diverged_position"])
            if at is not None:
                ax.axvline(at + 0.08 * c, color=MODEL_COLOURS[c % len(MODEL_COLOURS)], lw=1.8, ls=":")
        if cut is not None:
            ax.axvline(cut, color="grey", lw=1, ls="--")
        ax.set_xlim(-0.5, P - 0.5)
        if what != "output":
            ax.set_xticks([])
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(ex["tokens"], rotation=90, fontsize=7)
    for label, kind in zip(axes[-1].get_xticklabels(), ex["kinds"]):
        label.set_color(KIND_COLOURS[kind])
    verdict = "; ".join(f"{n}: {'entered' if m['entered'] else 'left'} after {m['followed_steps']} step(s)"
                        for n, m in ex["models"].items())
    fig.suptitle(f"track {ex['track']} variant {ex['variant']} (prefix: question + {ex['prefix_steps']} step(s))\n"
                 f"{'; '.join(ex['edits'])[:150]}\n{verdict}   [dashed: prefix end, dotted: divergence, x: greedy miss]",
                 fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.93, top=1 - 1.1 / fig.get_figheight(), bottom=0.9 / fig.get_figheight(),
                        hspace=0.12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def summary_figure(results: dict, path: str | Path) -> Path:
    """Entry rate, followed steps, divergence tags, layer similarity and anchor attention, model vs control."""
    import numpy as np

    plt = _plt()
    names = list(results["models"])
    js = list(results["models"][names[0]]["heldout"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.8 / len(names)
    for c, n in enumerate(names):
        colour = MODEL_COLOURS[c % len(MODEL_COLOURS)]
        h = results["models"][n]["heldout"]
        xs = np.arange(len(js)) + c * width
        axes[0, 0].bar(xs, [h[j]["entry_rate"] for j in js], width, color=colour, label=f"{n} (modulo slots)")
        axes[0, 0].bar(xs, [h[j]["exact_entry_rate"] for j in js], width * 0.5, color="black", alpha=0.35,
                       label="exact" if c == 0 else None)
        axes[0, 1].bar(xs, [h[j]["followed_steps"] for j in js], width, color=colour, label=n)
        axes[0, 1].plot(xs, [h[j]["expected_steps"] for j in js], "_", ms=20, color="black",
                        label="steps to follow" if c == 0 else None)
        layers = results["models"][n]["layer_similarity"]
        axes[1, 0].plot(range(len(layers)), [np.nan if v is None else v for v in layers], "-o", color=colour,
                        label=f"{n}: to own source")
        other = results["models"][n]["layer_similarity_other_track"]
        if other:
            axes[1, 0].plot(range(len(other)), [np.nan if v is None else v for v in other], "--s", color=colour, alpha=0.6,
                            label=f"{n}: to another track")
        att = results["models"][n]["anchor_attention"]
        axes[1, 1].plot(range(1, len(att) + 1), att, "-o", color=colour, label=n)
        axes[1, 1].axhline(results["models"][n]["anchor_share"], color=colour, ls=":", lw=1)
    for ax, title, xl in ((axes[0, 0], "track-entry rate (held-out variants)", "prefix steps j"),
                          (axes[0, 1], "steps followed before diverging", "prefix steps j")):
        ax.set_xticks(np.arange(len(js)) + 0.4 - width / 2)
        ax.set_xticklabels(js)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylim(0, 1.05)
    j0 = js[0]
    tags = sorted({t for n in names for t in results["models"][n]["heldout"][j0]["diverged_at_tag"]})
    bottom = np.zeros(len(names))
    for t in tags:
        vals = np.array([results["models"][n]["heldout"][j0]["diverged_at_tag"].get(t, 0) for n in names], dtype=float)
        axes[0, 2].bar(names, vals, bottom=bottom, label=f"<{t}>" if t else "text before a tag",
                       color=TAG_COLOURS.get(t, "#c49c94"))
        bottom += vals
    done = [results["models"][n]["heldout"][j0]["n"] - bottom[i] for i, n in enumerate(names)]
    axes[0, 2].bar(names, done, bottom=bottom, color="lightgrey", label="followed to the end")
    axes[0, 2].set_title(f"where continuations left the track (j={j0}): expected step tag")
    axes[0, 2].legend(fontsize=7)
    axes[1, 0].set_title("hidden-state cosine, variant vs source, aligned tokens")
    axes[1, 0].set_xlabel("layer (0 = embeddings)")
    axes[1, 0].xaxis.get_major_locator().set_params(integer=True)
    axes[1, 1].xaxis.get_major_locator().set_params(integer=True)
    axes[1, 0].legend(fontsize=7)
    axes[1, 1].set_title("attention mass on anchors (dotted: anchors' share)")
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].legend(fontsize=7)
    axes[1, 2].axis("off")
    lib = results["library"]
    lines = [f"library: {lib['tracks']} tracks, {lib['train_chains']} training chains, {lib['heldout']} held out",
             f"table: {results['table']['domain']} v{results['table']['version']}", ""]
    for n in names:
        h = results["models"][n]["heldout"][j0]
        s = results["models"][n].get("sources")
        lines += [f"{n}: entry {h['entry_rate']:.2f} (exact {h['exact_entry_rate']:.2f})",
                  f"   followed {h['followed_steps']:.2f}/{h['expected_steps']:.2f} steps, {h['followed_units']:.1f} units",
                  f"   seen sources: entry {s['entry_rate']:.2f}" if s else ""]
    axes[1, 2].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    """The probe's summary as Markdown tables."""
    names = list(results["models"])
    js = list(results["models"][names[0]]["heldout"])
    lib = results["library"]
    out = [f"# Track probe\n\n{lib['tracks']} tracks from {lib['path']}, {lib['train_chains']} training chains, "
           f"{lib['heldout']} held-out variants; table {results['table']['domain']} v{results['table']['version']}; "
           f"m = {results['config']['next_steps']} steps.\n"]
    for j in js:
        out += [f"\n## Held-out variants, prefix = question + {j} step(s)\n", "| measure | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        for key in ("entry_rate", "exact_entry_rate", "followed_steps", "expected_steps", "followed_units", "completed_rate"):
            out.append(f"| {key} | " + " | ".join(_fmt(results["models"][n]["heldout"][j][key]) for n in names) + " |")
        out.append("| diverged at (expected tag) | " + " | ".join(
            ", ".join(f"{k} {v}" for k, v in results["models"][n]["heldout"][j]["diverged_at_tag"].items()) or "–"
            for n in names) + " |")
    if all("sources" in results["models"][n] for n in names):
        out.append("| source chains (seen): entry_rate | " + " | ".join(
            _fmt(results["models"][n]["sources"]["entry_rate"]) for n in names) + " |")
    layers = max(len(results["models"][n]["layer_similarity"]) for n in names)
    out += ["\n## Inside the model\n", "| layer | " + " | ".join(f"{n} cos (own source) | {n} cos (other track)" for n in names)
            + " |", "|---|" + "---|---|" * len(names)]
    for layer in range(layers):
        cells = []
        for n in names:
            m = results["models"][n]
            cells += [_fmt(m["layer_similarity"][layer]),
                      _fmt(m["layer_similarity_other_track"][layer]) if m["layer_similarity_other_track"] else "–"]
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    out.append("\n| anchor attention per layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    models = [results["models"][n] for n in names]
    out.append("| mass | " + " | ".join(", ".join(f"{a:.3f}" for a in m["anchor_attention"]) for m in models) + " |")
    out.append("| anchors' share of the window | " + " | ".join(_fmt(m["anchor_share"]) for m in models) + " |")
    return "\n".join(out) + "\n"
