"""Collapse you can see: the statistics a self-distillation method logs, and the watch over them.

Self-distillation fails quietly: the loss settles, the run finishes, and the encoder maps every tile
to one point. Two failures show in what a step computes anyway:

- *uniform targets*: the teacher's centred target distributions go flat, so the student learns
  nothing (the DINO loss returns to ln K); seen as the mean entropy of the targets, as a fraction of
  ln K (1.0 is uniform);
- *one direction*: every tile gets the same head output or class token; seen as the mean pairwise
  cosine similarity of the batch's vectors (1.0 is one direction).

A method returns these among its step's terms under the names of :data:`MONITORED`; the loop logs
them like any term, and :class:`CollapseWatch` reads each logged record and says, once per kind, in
one line, when one stayed past its threshold for a window of steps. ``loss.png`` draws them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Signal", "MONITORED", "WINDOW_STEPS", "target_entropy", "mean_pairwise_cosine", "CollapseWatch"]


@dataclass(frozen=True)
class Signal:
    """A logged statistic and when it means collapse: at or above ``threshold`` for the whole window."""

    what: str  # what collapsed, for the warning line
    symptom: str
    threshold: float
    consequence: str  # what it costs the encoder, measured (benchmarks/RESULTS.md, issue 16)


MONITORED: dict[str, Signal] = {
    "dino_target_entropy": Signal(
        "the DINO class-token term",
        "teacher targets near uniform",
        0.95,
        "it no longer trains the class token; iBOT and KoLeo may still teach the trunk",
    ),
    "ibot_target_entropy": Signal(
        "the iBOT patch term", "teacher targets near uniform", 0.95, "it no longer trains the patch tokens"
    ),
    "head_cosine": Signal(
        "the head",
        "every tile maps to one bottleneck direction",
        0.95,
        "the DINO term no longer trains the class token",
    ),
    "cls_cosine": Signal(
        "the trunk", "every tile gets the same class token", 0.98, "the encoder's features cannot tell tiles apart"
    ),
}
# How long a signal must hold before the watch speaks: long enough that a noisy step or the first
# steps after init (a random ViT's class tokens are near-identical) do not count; a quarter of a
# shorter run.
WINDOW_STEPS = 50


@torch.no_grad()
def target_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the distributions in the rows of ``probs`` [..., K], as a fraction of ln K."""
    probs = probs.float().reshape(-1, probs.shape[-1])
    n_prototypes = probs.shape[-1]
    if probs.shape[0] == 0 or n_prototypes < 2:
        return probs.new_tensor(0.0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.mean() / math.log(n_prototypes)


@torch.no_grad()
def mean_pairwise_cosine(vectors: Tensor) -> Tensor:
    """Mean cosine similarity over distinct pairs of the rows of ``vectors`` [N, D] (0 for N < 2)."""
    n = vectors.shape[0]
    if n < 2:
        return vectors.new_tensor(0.0, dtype=torch.float32)
    unit = F.normalize(vectors.float(), dim=-1)
    # Sum over all pairs from the summed vector: |sum u|^2 = N + sum_{i != j} u_i . u_j, in O(N D).
    total = unit.sum(dim=0).square().sum()
    return (total - n) / (n * (n - 1))


class CollapseWatch:
    """Reads logged records; returns one warning line per signal the first time it holds for a window."""

    def __init__(self, total_steps: int) -> None:
        self.window_steps = max(1, min(WINDOW_STEPS, total_steps // 4))
        self._since: dict[str, int] = {}  # signal -> first step of its current run above threshold
        self._warned: set[str] = set()

    def observe(self, record: dict[str, Any]) -> list[str]:
        step = int(record.get("step", 0))
        lines = []
        for key, signal in MONITORED.items():
            value = record.get(key)
            if not isinstance(value, (int, float)) or not value >= signal.threshold:
                self._since.pop(key, None)
                continue
            first = self._since.setdefault(key, step)
            if step - first >= self.window_steps and key not in self._warned:
                self._warned.add(key)
                lines.append(
                    f"warning: {signal.what} has collapsed: {signal.symptom} ({key} {value:.3f} >= "
                    f"{signal.threshold} since step {first}); {signal.consequence}; see loss.png and the "
                    "config's notes on small data"
                )
        return lines
