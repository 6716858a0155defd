"""A head on an encoder, trained on the one loop: :class:`HeadTask`, and :func:`fit` with model selection.

:class:`HeadTask` is eva's generic head module on ssl-path's loop: an encoder from any ref (through
:func:`ssl_path.encoder.load`), a head (``nn.Module``) and a criterion. The head says what it reads
(``head.reads``): ``"maps"``, the outputs of ``head.blocks`` as spatial maps
(:func:`ssl_path.encoder.feature_maps`), plus the image itself for a full-resolution stem;
``"embedding"``, the encoder's pooled output; or ``"encoder"``, the task's ``encode`` itself, for a
detector whose own transform decides what the encoder sees and which returns its own losses. How much of the encoder learns is
:class:`finetune.config.EncoderTuning`: frozen, the last N blocks, all of it with layer-wise lr
decay, or LoRA adapters (peft). The encoder and the head have their own peak lr.

:func:`fit` trains in rounds of ``select.val_every`` epochs, each an ordinary resumable run of the
loop up to the round's last step; after each round it scores the validation split, keeps the best
weights in ``RUN_DIR/checkpoints/best.pt`` (a full checkpoint: its encoder loads as a ref) and stops
when ``select.patience`` rounds have passed without a better score. Validation scores go to
``RUN_DIR/validation.jsonl``; a run killed anywhere and started again resumes exactly, keeping the
scores up to its checkpoint's step.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from finetune.config import EncoderTuning, SelectionConfig
from finetune.data import SKIPPED
from ssl_path import encoder as encoder_lib
from ssl_path.core.distributed import DistInfo, barrier, from_rank_0
from ssl_path.core.errors import UserError
from ssl_path.core.io import atomic_path
from ssl_path.encoder.checkpoint import CHECKPOINT_DIR, checkpoint_path, read_training_checkpoint, save_checkpoint
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.loop import StreamFactory, train
from ssl_path.training.metrics_log import read_metrics
from ssl_path.training.optim import param_groups
from ssl_path.training.task import TrainingTask

BEST = "best.pt"
VALIDATION_LOG = "validation.jsonl"
VALIDATION_PNG = "validation.png"


def best_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / BEST


def load_encoder(ref: str, tuning: EncoderTuning) -> tuple[nn.Module, encoder_lib.EncoderInfo, dict[str, Any]]:
    """The encoder ``ref`` names, at any input size its patch size divides, its info and rebuild kwargs."""
    kwargs = encoder_lib.model_kwargs(ref)
    extra: dict[str, Any] = {"dynamic_img_size": True}
    if tuning.mode != "frozen" and tuning.drop_path_rate > 0:
        extra["drop_path_rate"] = tuning.drop_path_rate
    try:
        model, info = encoder_lib.load(ref, **extra)
    except encoder_lib.ModelArgumentError:  # not a ViT: no dynamic size, no drop path
        model, info = encoder_lib.load(ref)
    return model, info, kwargs


class HeadTask(TrainingTask):
    """``encoder`` -> ``head`` -> ``criterion(logits, batch["target"])``; see the module docstring."""

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        info: encoder_lib.EncoderInfo,
        model_kwargs: dict[str, Any],
        head: nn.Module,
        criterion: nn.Module,
        tuning: EncoderTuning,
    ) -> None:
        super().__init__()
        self.name = name
        self.info, self.model_kwargs, self.tuning = info, dict(model_kwargs), tuning
        self.encoder, self.head, self.criterion = encoder, head, criterion
        _tune(self.encoder, tuning, info)

    @property
    def frozen(self) -> bool:
        return self.tuning.mode == "frozen"

    def train(self, mode: bool = True) -> HeadTask:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder computes the features it was published with
        return self

    def encode(self, images: Tensor) -> Any:
        """What the head reads of ``images``: block maps or the pooled embedding."""
        with torch.no_grad() if self.frozen else nullcontext():
            if self.head.reads in ("maps", "encoder"):
                return encoder_lib.feature_maps(self.encoder, images, self.head.blocks)
            return self.encoder(images)

    def logits(self, images: Tensor) -> Any:
        """The head's output: logits, or for a head that reads the encoder (a detector), its detections."""
        if self.head.reads == "encoder":
            return self.head(self.encode, images)
        return self.head(self.encode(images), images)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.head.reads == "encoder":  # a detector computes its own losses: their sum, each logged
            losses = self.head(self.encode, batch["image"], batch["target"])
            return {"loss": sum(losses.values()), **{name: value.detach() for name, value in losses.items()}}
        return {"loss": self.criterion(self.logits(batch["image"]), batch["target"])}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """The head at ``optim.lr``; the encoder at ``encoder.lr`` for its last block, decaying by
        ``optim.layerwise_decay`` per block towards the patch embedding."""
        ratio = self.tuning.lr / optim.lr if optim.lr > 0 else 0.0
        encoder_groups = param_groups(self.encoder, optim.layerwise_decay, optim.patch_embed_lr_mult)
        for group in encoder_groups:
            # param_groups gives the final norm 1 and the last block decay^1; both learn at encoder.lr.
            group["lr_multiplier"] = min(group["lr_multiplier"] / optim.layerwise_decay, 1.0) * ratio
            group["tag"] = "encoder"
        head_groups = param_groups(self.head)
        for group in head_groups:
            group["tag"] = "head"
        return [g for g in encoder_groups + head_groups if g["params"]]

    def encoder_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The fine-tuned encoder as a checkpoint entry (LoRA merged into its weights)."""
        encoder = copy.deepcopy(self.encoder)
        if model_state is not None:
            prefix = "encoder."
            encoder.load_state_dict({k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)})
        if self.tuning.mode == "lora":
            encoder = _merge_lora(encoder)
        return encoder_lib.encoder_state(encoder, self.info.architecture, self.model_kwargs)

    def fsdp_units(self) -> list[nn.Module]:
        return [*getattr(self.encoder, "blocks", []), self.encoder, self.head]

    def compile_parts(self, **options: Any) -> None:
        self.encoder.compile(**options)
        self.head.compile(**options)


def _tune(encoder: nn.Module, tuning: EncoderTuning, info: encoder_lib.EncoderInfo) -> None:
    """Set which encoder weights learn, and add LoRA adapters for ``lora``."""
    if tuning.mode == "full":
        encoder.requires_grad_(True)
        return
    encoder.requires_grad_(False)
    if tuning.mode.startswith("last-"):
        blocks = getattr(encoder, "blocks", None)
        if blocks is None or tuning.last_n > len(blocks):
            raise UserError(f"encoder.mode {tuning.mode}: {info.ref} has {info.num_blocks} blocks")
        for block in list(blocks)[-tuning.last_n :]:
            block.requires_grad_(True)
        for name in ("norm", "fc_norm"):
            module = getattr(encoder, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(True)
    elif tuning.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        names = {n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in tuning.lora_targets if t not in names]
        if missing:
            raise UserError(
                f"encoder.lora_targets {missing[0]!r} names no linear layer of {info.ref} ({', '.join(sorted(names))})"
            )
        config = LoraConfig(
            r=tuning.lora_rank,
            lora_alpha=tuning.lora_alpha,
            lora_dropout=tuning.lora_dropout,
            target_modules=list(tuning.lora_targets),
        )
        inject_adapter_in_model(config, encoder)
        for name, param in encoder.named_parameters():
            param.requires_grad_("lora_" in name)


def _merge_lora(encoder: nn.Module) -> nn.Module:
    """The encoder with every LoRA layer merged into its base layer and the adapter removed (peft's merge)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(encoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, child, module.get_base_layer())
    return encoder


# ----------------------------------------------------------------------------- training with selection


def fit(
    task: HeadTask,
    stream: StreamFactory,
    run_dir: Path,
    optim: OptimConfig,
    train_cfg: TrainConfig,
    select: SelectionConfig,
    config: dict[str, Any],
    validate: Callable[[HeadTask], dict[str, Any]],
    score_key: str,
    dist_info: DistInfo = DistInfo(),
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any] | None:
    """Train ``task`` into ``run_dir`` with validation every ``select.val_every`` epochs and early
    stopping; returns the best validation record and leaves ``task`` holding the best weights, or
    returns None where ``max_steps`` paused the run before its end (the same call resumes it).

    ``validate(task) -> {score_key: float, ...}`` scores the validation split (higher is better).
    """
    run_dir = Path(run_dir)
    total = train_cfg.total_steps
    end = total if max_steps is None else min(total, max_steps)
    every = max(1, int(round(select.val_every * train_cfg.steps_per_epoch)))
    history = _resumed_history(run_dir)
    step = history[-1]["step"] if history else 0
    started = step
    while step < end and not _patience_spent(history, select.patience, score_key):
        # Rounds end at multiples of ``every`` and at the last step, whatever --max-steps says, so a
        # paused run validates where an uninterrupted one does.
        target = min(total, (step // every + 1) * every)
        # only the first round may resume a run saved by another command; the others continue this one
        train(task, stream, run_dir, optim, train_cfg, config, dist_info, max_steps=min(target, end),
              progress=progress, desc=task.name, skipped_key=SKIPPED, announce_resume=step == started)  # fmt: skip
        if target > end:
            return None  # paused (--max-steps) within a round
        task.eval()
        record = {"step": target, **validate(task)}
        record = from_rank_0(record)  # rank 0's scores decide for every rank, so that all stop alike
        score = record.get(score_key)
        if score is None or not math.isfinite(score):
            raise UserError(f"validation gave no {score_key} at step {target}; is the validation split empty?")
        best = max((r[score_key] for r in history), default=-math.inf)
        history.append(record)
        if dist_info.is_main:
            if score > best:
                _save_best(task, run_dir, target, config, record)
            with (run_dir / VALIDATION_LOG).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                print(f"validation at step {target}: {score_key} {score:.4f} (best {max(best, score):.4f})")
        barrier()  # every rank validated the same weights alike; best.pt is written before any reads it
        step = target
    if dist_info.is_main and history:
        plot_validation(run_dir, score_key)
    if step < total and not _patience_spent(history, select.patience, score_key):
        return None  # paused (--max-steps) at the end of a round
    best = read_training_checkpoint(best_path(run_dir))
    task.load_state_dict(best["model"])
    task.eval()
    return dict(best["validation"])


def plot_validation(run_dir: Path, score_key: str) -> Path:
    """``validation.png``: every numeric validation score against the step, the selected one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / VALIDATION_LOG)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key in [k for k, v in records[-1].items() if k != "step" and isinstance(v, (int, float))]:
        ax.plot(steps, [r.get(key) for r in records], marker=".", lw=1.2, label=key)
    best = max(records, key=lambda r: r[score_key])
    ax.axvline(best["step"], color="grey", ls="--", lw=0.8, label=f"selected: step {best['step']}")
    ax.set(xlabel="step", ylabel="validation score", title=f"{Path(run_dir).name}: validation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / VALIDATION_PNG
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def _patience_spent(history: Sequence[dict[str, Any]], patience: int, key: str) -> bool:
    if patience == 0 or not history:
        return False
    scores = [r[key] for r in history]
    return len(scores) - 1 - scores.index(max(scores)) >= patience


def _resumed_history(run_dir: Path) -> list[dict[str, Any]]:
    """Validation records up to the last checkpoint's step (later ones belong to work a kill undid)."""
    log = run_dir / VALIDATION_LOG
    if not log.is_file():
        return []
    last = checkpoint_path(run_dir)
    step = int(read_training_checkpoint(last)["step"]) if last.is_file() else 0
    kept = [r for r in read_metrics(log) if r.get("step", 0) <= step]
    with atomic_path(log) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _save_best(task: HeadTask, run_dir: Path, step: int, config: dict[str, Any], record: dict[str, Any]) -> None:
    state = task.state_dict()
    checkpoint = {
        "method": task.name,
        "step": step,
        "config": config,
        "model": state,
        "encoder": task.encoder_state(state),
        "validation": record,
        "torch": str(torch.__version__),
    }
    save_checkpoint(checkpoint, best_path(run_dir))


def load_best(run_dir: Path) -> dict[str, Any]:
    """The best checkpoint of a finished fine-tuning run."""
    path = best_path(run_dir)
    if not path.is_file():
        raise UserError(f"{run_dir}: no {CHECKPOINT_DIR}/{BEST} (is it a finished fine-tuning run?)")
    return read_training_checkpoint(path)
