"""PNG plots logged to MLflow: triage counts, impact-weight histogram, loss curves, TPA."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(values: dict[str, float], title: str, ylabel: str, path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(list(values), list(values.values()), color="#4C72B0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def histogram(values: list[float], title: str, xlabel: str, path: str | Path, bins: int = 30) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=bins, color="#55A868")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def curves(history: list[dict], keys: list[str], title: str, path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h and "step" in h]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def grouped_bars(
    values: dict[str, dict[str, float]], title: str, ylabel: str, path: str | Path, errors: dict[str, dict[str, float]] | None = None
) -> Path:
    """Bars grouped by category, one colour per series: ``values[series][category]``, with
    ``errors[series][category]`` as error bars (e.g. 95% interval half-widths) where given."""
    plt = _plt()
    categories = list(dict.fromkeys(c for v in values.values() for c in v))
    series = list(values)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(categories) * max(len(series), 1) * 0.6 + 2), 3.6))
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        ys = [values[name].get(c, float("nan")) for c in categories]
        err = [(errors or {}).get(name, {}).get(c) or 0.0 for c in categories]
        ax.bar(xs, ys, width, label=name, yerr=err if any(err) else None, capsize=3)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20 if len(categories) > 4 else 0, fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
