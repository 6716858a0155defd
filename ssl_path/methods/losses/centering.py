"""Teacher-side centring: turning teacher logits into target distributions that cannot collapse.

Self-distillation (DINO, iBOT, DINOv2) trains a student to match a momentum teacher; left alone, the
teacher's outputs collapse to one prototype (or to a uniform distribution). Two remedies live here:

- :class:`SoftmaxCentering`, DINO's original recipe (Caron et al. 2021, "Emerging Properties in
  Self-Supervised Vision Transformers", arXiv:2104.14294): subtract an EMA of the mean teacher logit
  (against a dominant prototype) and sharpen with a low temperature (against uniformity).
- :func:`sinkhorn_knopp`, the SwAV equipartition (Caron et al. 2020, "Unsupervised Learning of Visual
  Features by Contrasting Cluster Assignments", arXiv:2006.09882) adopted by DINOv2 (Oquab et al.
  2023, arXiv:2304.07193): a few Sinkhorn-Knopp iterations make the batch's soft assignments use every
  prototype equally, with no state to carry between steps.

Both are teacher-side only: no gradient flows through them. Both compute in float32 whatever the
logits' dtype. Under ``torch.distributed`` (when it is initialised) the batch statistics are summed
over all ranks, so every rank sees the same global normalisation; otherwise everything is local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["sinkhorn_knopp", "SoftmaxCentering"]

# Floor for sums we divide by: a prototype or a sample whose mass underflowed to 0 must give 0, not NaN.
_TINY = torch.finfo(torch.float32).tiny


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place cross-rank ``"sum"`` or ``"max"``, a no-op in a single process."""
    if _distributed():
        # ReduceOp is looked up only here: builds without distributed support do not define it.
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temperature: float,
    n_iterations: int = 3,
    n_samples: int | Tensor | None = None,
) -> Tensor:
    """Sinkhorn-Knopp soft assignments of ``teacher_logits`` [B, K] -> float32 probabilities [B, K].

    Starts from ``Q = exp(logits / temperature)`` seen as [K prototypes, B samples] and alternately
    rescales prototypes to equal mass (1/K each) and samples to equal mass (1/B_total each), all sums
    taken over every rank. The result's rows sum to 1, and its columns to about ``B_total / K``.

    ``n_samples`` is the global number of samples (all ranks together), for callers whose ranks hold
    different counts, e.g. masked patches; it defaults to ``B * world_size``.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    n_local, n_prototypes = teacher_logits.shape
    scaled = teacher_logits.float() / temperature

    # Shift each prototype by its global maximum before exp so nothing overflows. This is exact: the
    # first Sinkhorn step divides every prototype by its own sum, which cancels any per-prototype
    # factor; and unlike one scalar shift it leaves every prototype at least one entry of exp(0) = 1,
    # so no prototype underflows to all zeros. A rank with no samples contributes -inf to the max.
    if n_local > 0:
        peak = scaled.amax(dim=0)
    else:
        peak = scaled.new_full((n_prototypes,), float("-inf"))
    _all_reduce_(peak, "max")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    q = torch.exp(scaled - peak).t()  # [K, B]: rows are prototypes, columns are samples

    if n_samples is None:
        n_total = torch.tensor(float(n_local * _world_size()), device=q.device)
    else:
        n_total = torch.as_tensor(n_samples, device=q.device).float()

    mass = _all_reduce_(q.sum())
    q /= mass.clamp_min(_TINY)
    for _ in range(n_iterations):
        # Prototype sums span the whole global batch, hence the all-reduce; sample sums are local.
        per_prototype = _all_reduce_(q.sum(dim=1, keepdim=True))
        q /= per_prototype.clamp_min(_TINY)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(_TINY)
        q /= n_total
    q *= n_total  # each sample's assignment becomes a distribution over prototypes
    return q.t()


class SoftmaxCentering(nn.Module):
    """DINO's teacher centring: ``softmax((logits - center) / temperature)`` with an EMA ``center``.

    ``forward`` uses the current centre and leaves it alone; call :meth:`update` afterwards with the
    same logits, so a batch's targets never depend on that batch's own mean (as in DINO).
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Float32 target distributions over the last dimension of ``teacher_logits`` [..., K]."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        centred = teacher_logits.float() - self.center.float()
        return torch.softmax(centred / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """Move the centre towards the mean of ``teacher_logits`` [..., K] over all rows of all ranks."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        # Sum and count travel in one all-reduce; counting (rather than assuming B * world_size)
        # keeps the mean exact when ranks hold different numbers of rows, e.g. masked patches.
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        _all_reduce_(stats)
        count = stats[-1]
        batch_mean = (stats[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        old_center = self.center.float()
        new_center = old_center * self.momentum + batch_mean * (1.0 - self.momentum)
        # An empty global batch keeps the old centre; torch.where avoids a host sync on the count.
        self.center.copy_(torch.where(count > 0, new_center, old_center))

    def extra_repr(self) -> str:
        return f"dim={self.center.shape[-1]}, momentum={self.momentum}"
