"""PNG of the recovery loss curves (training loss per step, held-out loss at each evaluation)."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curves(history: dict, path: str | Path, title: str = "LoRA recovery") -> Path:
    """Training loss against step, with the held-out loss as markers on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = history.get("train", [])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="training loss")
    heldout = history.get("heldout", [])
    if heldout:
        ax.plot([r["step"] for r in heldout], [r["loss"] for r in heldout], marker="o", label="held-out loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
