"""PNG figures of a run: the synthetic image grid and the accuracy curve."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mct_ray.records import Summary  # noqa: E402

MAX_PER_CLASS = 10
MAX_CLASSES = 20


def _displayable(images: torch.Tensor, info: dict) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) in [0, 1]: undo normalisation, or min-max after ZCA."""
    x = images.float()
    if info.get("zca"):
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    else:
        mean = torch.tensor(info.get("mean", [0.0] * x.shape[1]))[None, :, None, None]
        std = torch.tensor(info.get("std", [1.0] * x.shape[1]))[None, :, None, None]
        x = x * std + mean
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_grid_png(syn, num_classes: int) -> bytes:
    """One column per class (at most 20), one row per image of that class (at most 10)."""
    x, labels = _displayable(syn.images, syn.info), syn.hard().labels
    classes = list(range(min(num_classes, MAX_CLASSES)))
    per_class = [torch.nonzero(labels == c).flatten()[:MAX_PER_CLASS] for c in classes]
    rows = max(1, max(len(p) for p in per_class))
    fig, axes = plt.subplots(rows, len(classes), figsize=(len(classes) * 0.9, rows * 0.9),
                             squeeze=False)
    for col, idx in enumerate(per_class):
        for row in range(rows):
            ax = axes[row][col]
            ax.axis("off")
            if row < len(idx):
                img = x[idx[row]].numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                          cmap="gray" if img.shape[-1] == 1 else None)
        axes[0][col].set_title(str(col), fontsize=8)
    return _png(fig)


def curve_png(summary: Summary, cfg) -> bytes:
    """Accuracy against iteration. Iteration 0 is the initial set (real images drawn with the
    run's seed, trained at the initial step size distill.lr_teacher); the dashed line is
    other random real images trained at the experts' rate expert.lr, as the papers' Random
    column: the two differ by the images and by the step size."""
    rows = summary.outcome.rows
    its = [r.iteration for r in rows]
    mean = [100 * r.acc_mean for r in rows]
    std = [100 * r.acc_std for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    ax.plot(its, mean, marker="o", label=f"{summary.method.upper()} synthetic set "
            f"(iteration 0: the initial real images, step size {cfg.distill.lr_teacher:g})")
    ax.fill_between(its, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.2)
    if summary.random.mean is not None:
        ax.axhline(100 * summary.random.mean, color="gray", ls="--",
                   label=f"other random real images, step size {cfg.expert.lr:g} (Random)")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary.dataset}, ipc {summary.ipc}: mean ± std of "
                 f"{cfg.eval.num_eval} networks")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)
