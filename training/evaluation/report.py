"""The evaluation's human side: a markdown table and PNG plots (matplotlib, when installed)."""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embed.items import Item

logger = logging.getLogger(__name__)

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#e7ba52")  # one per model of `evaluate`
GALLERY_ITEMS, GALLERY_NEIGHBOURS = 8, 5


def write_report(metrics: Mapping[str, Any], out_dir: Path, vectors: np.ndarray | None = None,
                 items: Sequence[Item] = (), labels: Mapping[str, Sequence[str]] | None = None,
                 cold_ids: Sequence[str] = ()) -> list[Path]:
    """Write `report.md`, `recall_at_k.png` and, given the native vectors, `embeddings_2d.png` and
    `neighbours.png`; returns the paths.

    Args:
        metrics: what `run_evaluation` puts in metrics.json.
        vectors, items: the native model's item vectors, row i is `items[i]`.
        labels: per-item labels to colour the projection by, e.g. {"category": [...], "colour": [...]}.
        cold_ids: cold-start items, the gallery's queries (the first `GALLERY_ITEMS` with an image).
    """
    report = out_dir / "report.md"
    written = [report]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        report.write_text(markdown_report(metrics, []))
        return written
    written.append(plot_recall_curves(metrics, out_dir / "recall_at_k.png"))
    if vectors is not None:
        written.append(plot_projection(vectors, labels or {}, out_dir / "embeddings_2d.png"))
        if cold_ids:
            written.append(plot_neighbours(vectors, items, cold_ids, out_dir / "neighbours.png"))
    report.write_text(markdown_report(metrics, [p.name for p in written[1:]]))
    return written


def markdown_report(metrics: Mapping[str, Any], images: Sequence[str] = ()) -> str:
    """The metrics as markdown: Recall@K / NDCG@K with 95% CIs, the oracle ceilings, the reference model
    minus each other one, per user group."""
    ks, models = metrics["ks"], metrics["models"]
    scored = {m: row for m, row in models.items() if "skipped" not in row}
    lines = [f"# Cold-start evaluation ({metrics['preset']}, seeds {metrics['seeds']})", "",
             f"{metrics['n_users']} test users, {metrics['n_cold_items']} cold items in a catalog of "
             f"{metrics['n_items']}. Mean over users, 95% bootstrap CI in brackets.", ""]
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    lines += _table(["model", *names, "parameters", "seconds"],
                    [[model, *(_cell(row, n) for n in names), f"{row['parameters']:,}" if "parameters" in row else "",
                      str(row.get("seconds", ""))] for model, row in scored.items()])
    lines += [f"\n- **{m}** skipped: {row['skipped']}" for m, row in models.items() if "skipped" in row]
    lines += _oracle_table(metrics.get("oracles", {}), names)
    paired = metrics.get("paired", {})
    reference = metrics.get("paired_reference") or "native"
    if paired:
        diffs = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks if k == 20]
        lines += ["", f"## {reference} minus each other model (paired bootstrap over users)", "",
                  f"Positive: {reference} is ahead. 95% CI of the mean per-user difference, the same resampled "
                  f"users for both models; `P(ahead)` is the share of resamples with {reference} ahead on "
                  "recall@20.", ""]
        lines += _table(["baseline", *(f"Δ {n}" for n in diffs), "P(ahead)"],
                        [[name, *(_diff_cell(row, n) for n in diffs), f"{row.get('recall@20_ahead', 0):.2f}"]
                         for name, row in paired.items()])
    lines += _group_table(scored, ks)
    if images:
        lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in images)]
    protocol = metrics.get("protocol", {})
    if protocol:
        lines += ["", "## Protocol", "", *(f"- {key}: {value}" for key, value in protocol.items())]
    return "\n".join(lines) + "\n"


def _oracle_table(oracles: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The data's ceilings, scored like the models: how much any encoder, and early fusion, could win."""
    if not oracles:
        return []
    lines = ["", "## Oracle ceilings of the data", "",
             "The protocol scored with item vectors built from the true traits that preferences are drawn "
             "from (colour, pattern, shape from the image; brand, material, price band from the text; a "
             "missing modality contributes nothing). `additive`: each modality's one-hots side by side, what "
             "a sum of separate per-modality vectors can express; `conjunction`: plus the image x text outer "
             "product, what early fusion can express. Their difference is the most fusion can gain here.", ""]
    scored = {name: row for name, row in oracles.items() if "skipped" not in row}
    lines += _table(["oracle", *names], [[name, *(_cell(row, n) for n in names)] for name, row in scored.items()])
    return lines + [f"\n- **{name}** oracle skipped: {row['skipped']}" for name, row in oracles.items()
                    if "skipped" in row]


def _group_table(models: Mapping[str, Any], ks: Sequence[int]) -> list[str]:
    groups = sorted({g for row in models.values() for g in row.get("groups", {})})
    if not groups:
        return []
    k = 20 if 20 in ks else ks[0]
    first = next(iter(models.values()))["groups"]
    lines = ["", f"## Recall@{k} by trait kind of the users' preferences", "",
             "Synthetic users like conjunctions of an image-side trait and a text-only trait (brand, material or "
             "price band, so every group needs the text). `image_trait`: the image-side trait is colour, pattern "
             "or shape, visible only in the image; `shared_trait`: it is the category, in image and text; "
             "`mixed`: some of each.", ""]
    return lines + _table(["model", *(f"{g} (n={first.get(g, {}).get('n_users', 0)})" for g in groups)],
                          [[model, *(_cell(row.get("groups", {}).get(g, {}), f"recall@{k}") for g in groups)]
                           for model, row in models.items()])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _cell(row: Mapping[str, Any], name: str) -> str:
    if name not in row:
        return ""
    lo, hi = row.get(f"{name}_ci", (row[name], row[name]))
    return f"{row[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def _diff_cell(row: Mapping[str, Any], name: str) -> str:
    if f"{name}_diff" not in row:
        return ""
    lo, hi = row[f"{name}_diff_ci"]
    return f"{row[f'{name}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def plot_recall_curves(metrics: Mapping[str, Any], path: Path) -> Path:
    """Recall@K against K per model, with 95% CI error bars."""
    import matplotlib.pyplot as plt

    ks = metrics["ks"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (model, row) in enumerate(metrics["models"].items()):
        if "skipped" in row:
            continue
        mean = np.asarray([row[f"recall@{k}"] for k in ks])
        ci = np.asarray([row[f"recall@{k}_ci"] for k in ks])
        ax.errorbar(ks, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], label=model, marker="o", capsize=3,
                    color=_COLOURS[i % len(_COLOURS)])
    for style, (name, row) in zip(("--", ":"), metrics.get("oracles", {}).items(), strict=False):
        if "skipped" not in row:  # the data's ceilings, for scale
            ax.plot(ks, [row[f"recall@{k}"] for k in ks], linestyle=style, color="grey", label=f"oracle: {name}")
    ax.set(xlabel="K", ylabel="Recall@K (cold items)", xticks=ks,
           title=f"Cold-start recall, {metrics['preset']} ({metrics['n_users']} users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_projection(vectors: np.ndarray, labels: Mapping[str, Sequence[str]], path: Path) -> Path:
    """A 2D PCA projection of item vectors, one panel per label kind (e.g. category, colour)."""
    import matplotlib.pyplot as plt

    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (n_items, 2)
    kinds = list(labels) or ["items"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        if kind not in labels:
            ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6)
        else:
            names = np.asarray(labels[kind])
            for i, name in enumerate(sorted(set(labels[kind]))):
                sel = names == name
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=name, color=_COLOURS[i % len(_COLOURS)])
            ax.legend(markerscale=2, fontsize=7, ncol=2)
        ax.set(xlabel="PC 1", ylabel="PC 2", title=f"Item embeddings (native), PCA, by {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gallery_neighbours(vectors: np.ndarray, items: Sequence[Item], cold_ids: Sequence[str]
                       ) -> list[tuple[int, list[int]]]:
    """Rows of up to `GALLERY_ITEMS` cold items with an image and the rows of their top-5 neighbours
    (inner product, the item itself and items without a vector excluded)."""
    row = {it.item_id: i for i, it in enumerate(items)}
    queries = [row[c] for c in cold_ids if c in row and items[row[c]].images][:GALLERY_ITEMS]
    scores = vectors[queries] @ vectors.T  # (queries, items)
    scores[:, ~(np.abs(vectors).sum(axis=1) > 0)] = -np.inf
    scores[np.arange(len(queries)), queries] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :GALLERY_NEIGHBOURS]
    return [(q, top[i].tolist()) for i, q in enumerate(queries)]


def plot_neighbours(vectors: np.ndarray, items: Sequence[Item], cold_ids: Sequence[str], path: Path) -> Path:
    """The neighbour gallery: per row a cold item's image and title, then its top-5 neighbours'."""
    import matplotlib.pyplot as plt

    rows = gallery_neighbours(vectors, items, cold_ids)
    cols = 1 + GALLERY_NEIGHBOURS
    fig, axes = plt.subplots(max(1, len(rows)), cols, figsize=(2.2 * cols, 2.5 * max(1, len(rows))), squeeze=False)
    for r, (query, neighbours) in enumerate(rows):
        for c, i in enumerate([query, *neighbours]):
            ax = axes[r][c]
            ax.axis("off")
            if items[i].images:
                ax.imshow(_thumbnail(items[i].images[0]))
            else:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", color="grey")
            title = items[i].title or "(no text)"
            ax.set_title(("COLD: " if c == 0 else f"{c}. ") + "\n".join(textwrap.wrap(title, 24)[:2]), fontsize=7,
                         color="#d62728" if c == 0 else "black")
    fig.suptitle("Cold-start items (left) and their 5 nearest neighbours under the native encoder", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _thumbnail(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
