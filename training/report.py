"""The evaluation's human side: a markdown table and PNG plots (matplotlib, when installed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")


def write_report(metrics: Mapping[str, Any], out_dir: Path, vectors: np.ndarray | None = None,
                 labels: Sequence[str] | None = None) -> list[Path]:
    """Write `report.md`, `recall_at_k.png` and (given vectors) `embeddings_pca.png`; returns the paths.

    Args:
        metrics: what `run_evaluation` puts in metrics.json.
        vectors, labels: item vectors of the native model and a label per item (the category) for colour.
    """
    report = out_dir / "report.md"
    report.write_text(markdown_report(metrics))
    written = [report]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return written
    written.append(plot_recall_curves(metrics, out_dir / "recall_at_k.png"))
    if vectors is not None:
        written.append(plot_pca(vectors, labels, out_dir / "embeddings_pca.png"))
    return written


def markdown_report(metrics: Mapping[str, Any]) -> str:
    """The metrics as markdown: overall Recall@K / NDCG@K with 95% CIs, then per user group."""
    ks, models = metrics["ks"], metrics["models"]
    lines = [f"# Cold-start evaluation ({metrics['preset']}, seeds {metrics['seeds']})", "",
             f"{metrics['n_users']} test users, {metrics['n_cold_items']} cold items in a catalog of "
             f"{metrics['n_items']}. Mean over users, 95% bootstrap CI in brackets.", ""]
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    lines += _table(["model", *names, "seconds"],
                    [[model, *(_cell(row, n) for n in names), str(row.get("seconds", ""))]
                     for model, row in models.items()])
    groups = sorted({g for row in models.values() for g in row.get("groups", {})})
    if groups:
        k = 20 if 20 in ks else ks[0]
        first = next(iter(models.values()))["groups"]
        lines += ["", f"## Recall@{k} by user group", "",
                  "Users grouped by the image-side trait of their preferred conjunctions: `image_trait` "
                  "(colour, pattern or shape: visible only in the image), `shared_trait` (category: in image "
                  "and text), `mixed`.", ""]
        lines += _table(["model", *(f"{g} (n={first.get(g, {}).get('n_users', 0)})" for g in groups)],
                        [[model, *(_cell(row.get("groups", {}).get(g, {}), f"recall@{k}") for g in groups)]
                         for model, row in models.items()])
    protocol = metrics.get("protocol", {})
    if protocol:
        lines += ["", "## Protocol", "", *(f"- {key}: {value}" for key, value in protocol.items())]
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _cell(row: Mapping[str, Any], name: str) -> str:
    if name not in row:
        return ""
    lo, hi = row.get(f"{name}_ci", (row[name], row[name]))
    return f"{row[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def plot_recall_curves(metrics: Mapping[str, Any], path: Path) -> Path:
    """Recall@K against K per model, with 95% CI error bars."""
    import matplotlib.pyplot as plt

    ks = metrics["ks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (model, row) in enumerate(metrics["models"].items()):
        mean = np.asarray([row[f"recall@{k}"] for k in ks])
        ci = np.asarray([row[f"recall@{k}_ci"] for k in ks])
        ax.errorbar(ks, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], label=model, marker="o", capsize=3,
                    color=_COLOURS[i % len(_COLOURS)])
    ax.set(xlabel="K", ylabel="Recall@K (cold items)", xticks=ks,
           title=f"Cold-start recall, {metrics['preset']} ({metrics['n_users']} users)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pca(vectors: np.ndarray, labels: Sequence[str] | None, path: Path) -> Path:
    """A 2D PCA projection of item vectors, coloured by label (e.g. category)."""
    import matplotlib.pyplot as plt

    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (n_items, 2)
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6)
    else:
        names = np.asarray(labels)
        for i, name in enumerate(sorted(set(labels))):
            sel = names == name
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=name, color=_COLOURS[i % len(_COLOURS)])
        ax.legend(markerscale=2, fontsize=7, ncol=2)
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Item embeddings (native), PCA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
