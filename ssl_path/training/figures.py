"""Image grids of a run: named panels of a few images side by side (a method's ``figure``), as a PNG.

A row per image, a column per panel; written atomically, so a reader never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ssl_path.core.io import atomic_path


def draw_panels(panels: dict[str, Tensor], path: Path, title: str = "") -> Path:
    """Draw ``panels`` (name -> [N, 3, H, W] in [0, 1], the same N for all) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    n_rows = panels[names[0]].shape[0]
    fig, axes = plt.subplots(n_rows, len(names), figsize=(2.2 * len(names), 2.2 * n_rows + 0.4), squeeze=False)
    for column, name in enumerate(names):
        for row in range(n_rows):
            ax = axes[row][column]
            ax.imshow(panels[name][row].permute(1, 2, 0).clamp(0, 1).float().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
