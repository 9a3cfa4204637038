"""The experiment reports' PNG figures (matplotlib, from the `bench` extra; drawn off-screen)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install -e '.[bench]' (make setup installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retrieval_plot(path: Path, curves: dict[str, list[float]], guess: float, title: str) -> Path:
    """Accuracy (%) against the position of the queried pair, one line per model; `guess` is the accuracy of
    answering with any value of the context, which needs no retrieval."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, accuracy in curves.items():
        positions = range(1, len(accuracy) + 1)
        ax.plot(positions, [100 * a for a in accuracy], marker="o", markersize=4, label=label)
    ax.axhline(100 * guess, color="gray", linestyle="--", linewidth=1, label="any value of the context")
    ax.set_xlabel("position of the queried key-value pair in the context (1 = first)")
    ax.set_ylabel("retrieval accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_plot(path: Path, losses: dict[str, list[tuple[int, float]]], title: str, ylabel: str,
              rates: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Validation loss against step, one line per arm; with `rates`, a panel below of the masking rate each arm
    trained with."""
    plt = pyplot()
    if rates:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=120, sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.2]})
    else:
        fig, top = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in losses.items():
        top.plot(*zip(*points), marker="o", markersize=3, label=label)
    top.set_ylabel(ylabel)
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    top.legend()
    if rates:
        for label, points in rates.items():
            bottom.plot(*zip(*points), label=label)
        bottom.set_ylabel("masking rate")
        bottom.grid(alpha=0.3)
    (bottom if rates else top).set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
