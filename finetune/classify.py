"""``python -m finetune.classify``: a linear head on the encoder's embedding, trained with the encoder
frozen, partly or wholly tuned, or with LoRA; over label fractions and seeds.

    python -m finetune.classify --ckpt REF --train amibr:DATA?split=benchmark --out runs/amibr
        [--test SPEC] [--mode frozen|last-N|full|lora] [--fractions 0.01 0.1 0.5 1.0] [--seeds N]
        [--config classify] [key=value ...]
    python -m finetune.classify --eval runs/amibr/fraction_1/seed_0 --test SPEC [--out results.json]

Each (fraction, seed) is a run of its own, ``RUN_DIR/fraction_<f>/seed_<s>/`` (:mod:`finetune.stage`):
test and validation splits as there (the test never makes a choice), then a stratified ``fraction``
of the rest trains (:func:`ssl_path.evaluation.splits.sample_subset`, seed ``s``), while model selection
keeps the whole validation split, so every fraction is selected alike; say so next to its figures.
Class imbalance: ``classify.balance`` ``sampler`` (each epoch draws images in inverse proportion to
their class' size), ``loss`` (cross-entropy weighted so) or ``none``. Training views: random resized
crops (``classify.scale``), flips and 90-degree rotations; evaluation resizes to the input size.

``RUN_DIR/results.json`` has one row per fraction, ``fraction_<f>/<mode>``, each score the mean over
seeds with its standard deviation and 95 % interval (:mod:`ssl_path.evaluation.stats`): the schema and
row names of :mod:`probes.fewshot`, so probes and fine-tuning sit in one table and one model card.
``RUN_DIR/learning_curve.png`` draws balanced accuracy against the label fraction.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from finetune import stage
from finetune.config import resolve_config
from finetune.data import class_balanced_weights
from ssl_path.core.cli import Parser
from ssl_path.core.errors import ConfigError, UserError, run_cli
from ssl_path.core.io import atomic_path
from ssl_path.data.labelled import LabelledImages
from ssl_path.data.readers import LabelledSet, Record
from ssl_path.data.transforms.eval import eval_transform
from ssl_path.data.transforms.single_view import SingleViewAugment, SingleViewConfig
from ssl_path.encoder import EncoderInfo
from ssl_path.evaluation.metrics import SCORES, classification_metrics
from ssl_path.evaluation.results import make_results, write_results
from ssl_path.evaluation.stats import aggregate

BALANCES = ("sampler", "loss", "none")
NORMS = ("batch", "layer", "none")
PREDICTIONS = "predictions.csv"
CURVE = "learning_curve.png"
DEFAULT_FRACTIONS = (1.0,)


@dataclass(frozen=True)
class ClassifyConfig:
    input_size: int = 0  # 0: the encoder's
    balance: str = "sampler"
    scale: tuple[float, float] = (0.6, 1.0)  # random resized crop area
    dropout: float = 0.0
    norm: str = "batch"  # of the features before the linear layer: batch, layer or none
    batch_size_eval: int = 64

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ConfigError(f"classify.balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"classify.norm must be one of {', '.join(NORMS)}, not {self.norm!r}")
        if self.input_size < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("classify: input_size >= 0 and dropout in [0, 1) are required")


class LinearHead(nn.Module):
    """The pooled embedding -> class logits: a norm without affine terms, dropout, one linear layer.

    The norm standardises the features, which a frozen encoder's embedding needs: its dimensions differ
    in scale, which one learning rate cannot serve. ``batch`` is MAE's linear probe (batch norm; under
    DDP on GPUs it is synchronised across ranks, see :mod:`finetune.stage`; on CPU ranks it normalises
    each rank's share of the batch alone); ``layer`` is the same at any batch size; ``none``.
    On WBC classes with the tiny encoder, batch norm gave accuracy 0.75, layer norm 0.60 (RESULTS.md).
    """

    reads = "embedding"

    def __init__(self, embed_dim: int, n_classes: int, dropout: float = 0.0, norm: str = "batch") -> None:
        super().__init__()
        self.norm = {
            "batch": lambda: nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6),
            "layer": lambda: nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6),
            "none": nn.Identity,
        }[norm]()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, n_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # MAE's fine-tuning head init
        nn.init.zeros_(self.fc.bias)

    def forward(self, embedding: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.training and embedding.shape[0] == 1 and isinstance(self.norm, nn.BatchNorm1d):
            # One image has no batch statistics: standardise it with the running ones.
            norm = self.norm
            standard = nn.functional.batch_norm(embedding, norm.running_mean, norm.running_var, eps=norm.eps)
            return self.fc(self.drop(standard))
        return self.fc(self.drop(self.norm(embedding)))


def check(cfg: ClassifyConfig, data: LabelledSet, flag: str) -> None:
    unlabelled = sum(label is None for label in data.labels())
    if unlabelled:  # first: they may be why the set has a class too few
        raise UserError(f"{flag} {data.source}: {unlabelled} images have no label; every image needs one")
    if len(data.classes) < 2:
        raise UserError(f"{flag} {data.source}: {len(data.classes)} class; classification needs at least 2")


def _size(cfg: ClassifyConfig, info: EncoderInfo) -> int:
    return cfg.input_size or info.input_size[-1]


def build(cfg: ClassifyConfig, info: EncoderInfo, data: LabelledSet) -> tuple[nn.Module, nn.Module]:
    size = _size(cfg, info)
    if size % info.patch_size:
        raise UserError(f"classify.input_size {size} is not a multiple of the patch size {info.patch_size}")
    weight = None
    if cfg.balance == "loss" and data.records:
        counts = np.bincount([t for t in data.targets() if t >= 0], minlength=len(data.classes))
        weight = torch.tensor(len(data) / (len(data.classes) * np.maximum(counts, 1)), dtype=torch.float32)
    head = LinearHead(info.embed_dim, len(data.classes), cfg.dropout, cfg.norm)
    return head, nn.CrossEntropyLoss(weight=weight)


def train_data(cfg: ClassifyConfig, data: LabelledSet, info: EncoderInfo, seed: int) -> tuple[Any, Any]:
    size = _size(cfg, info)
    view = SingleViewAugment(SingleViewConfig(size=size, scale=cfg.scale, mean=info.mean, std=info.std), seed)
    images = LabelledImages(
        data, eval_transform(size, info.mean, info.std), size, augment=lambda path, i, epoch: view(path, i, epoch)
    )
    return images, class_balanced_weights(data.targets()) if cfg.balance == "sampler" else None


@torch.no_grad()
def predict(
    cfg: ClassifyConfig, task: nn.Module, data: LabelledSet
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(class ids, probabilities [N, C]) of ``data``'s readable images, and (path, reason) of the others."""
    size = _size(cfg, task.info)
    images = LabelledImages(data, eval_transform(size, task.info.mean, task.info.std), size)
    device = next(task.parameters()).device
    rows, probs, skipped = [], [], []
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size_eval)
    for batch in loader:
        keep = [i for i, e in enumerate(batch["error"]) if not e]
        skipped += [(p, e) for p, e in zip(batch["path"], batch["error"]) if e]
        if keep:
            logits = task.logits(batch["image"][keep].to(device))
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            rows.append(np.asarray(batch["target"])[keep])
    if not rows:
        raise stage.no_readable_image(data, skipped)
    return np.concatenate(rows), np.concatenate(probs), skipped


def validate(cfg: ClassifyConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    truth, probs, skipped = predict(cfg, task, data)
    scores = classification_metrics(truth, probs.argmax(1), probs, classes=data.classes)
    return {k: scores[k] for k in ("balanced_accuracy", "auroc", "accuracy")} | (
        {"skipped": skipped} if skipped else {}
    )


def evaluate(
    cfg: ClassifyConfig, task: nn.Module, data: LabelledSet, selection: dict[str, Any], run_dir: Path | None, name: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    classes = selection["classes"]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c in data.labels() if c not in index})
    if unknown:
        raise UserError(f"test classes {unknown} are not among the trained classes {classes}")
    aligned = replace(data, classes=tuple(classes))
    truth, probs, skipped = predict(cfg, task, aligned)
    row = classification_metrics(truth, probs.argmax(1), probs, classes=classes)
    return {selection["mode"]: row}, skipped


def predict_files(
    cfg: ClassifyConfig,
    task: nn.Module,
    paths: Sequence[Path],
    selection: dict[str, Any],
    out: Path,
    advance: Callable[[int], object],
) -> int:
    """``out/predictions.csv``: path, predicted class, and the probability of every class."""
    classes = selection["classes"]
    unlabelled = LabelledSet([Record(path=str(p)) for p in paths], classes, name=out.name, source=str(out))
    size = _size(cfg, task.info)
    images = LabelledImages(unlabelled, eval_transform(size, task.info.mean, task.info.std), size)
    device = next(task.parameters()).device
    written = 0
    with atomic_path(out / PREDICTIONS) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction", *(f"p_{c}" for c in classes), "error"])
        for batch in torch.utils.data.DataLoader(images, batch_size=cfg.batch_size_eval):
            with torch.no_grad():
                probs = torch.softmax(task.logits(batch["image"].to(device)).float(), 1).cpu().numpy()
            for path, error, p in zip(batch["path"], batch["error"], probs):
                if error:  # a row still, so that the CSV lists every image asked for
                    print(f"warning: skipped {path}: {error}", file=sys.stderr)
                    writer.writerow([path, "", *([""] * len(classes)), error])
                else:
                    writer.writerow([path, classes[int(p.argmax())], *(f"{v:.6f}" for v in p), ""])
                    written += 1
            advance(len(batch["path"]))
    return written


def no_choice(cfg: ClassifyConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    return {}


HEAD = stage.Head(
    name="classify",
    task="image-classification",
    title="Fine-tuned classifier",
    config=ClassifyConfig,
    default_config="classify",
    score="balanced_accuracy",
    figures=(),
    classes=lambda cfg, data: list(data.classes),
    check=check,
    build=build,
    train_data=train_data,
    validate=validate,
    choose=no_choice,
    evaluate=evaluate,
    predict=predict_files,
)


# ----------------------------------------------------------------------------- fractions x seeds


def run_name(fraction: float, seed: int) -> str:
    return f"{stage.fraction_name(fraction)}/seed_{seed}"


def run_fractions(request: stage.Request, fractions: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """One run per (fraction, seed) under ``request.out``; the aggregate results.json and curve there.

    A sub-run that finished keeps its results (the same command, rerun after a pause or a requeue,
    trains only what is left); ``--out`` holds nothing but this command's runs and aggregates.
    """
    assert request.out is not None
    out = request.out
    base = resolve_config(request.config, HEAD.name, HEAD.config, request.overrides)
    runs = [
        (
            run_name(fraction, seed),
            replace(
                request,
                out=out / run_name(fraction, seed),
                overrides=(*request.overrides, f"seed={seed}"),
                fraction=None if fraction == 1.0 else fraction,
                split_seed=base.seed,  # one test and validation split for every seed
            ),
        )
        for fraction in fractions
        for seed in seeds
    ]
    done = stage.run_series(HEAD, request, runs, entries=(CURVE,))
    if done is None:
        return {}  # paused by --max-steps: the same command resumes every run
    rows: dict[str, list[dict[str, Any]]] = {}  # "fraction_<f>/<row>" -> that row of every seed
    last: dict[str, Any] = {}
    for name, results in done.items():
        last = results
        for key, row in results["metrics"].items():
            rows.setdefault(f"{name.split('/')[0]}/{key}", []).append(row)
    if not last:
        return {}
    mode = base.encoder.mode
    table = {key: {**aggregate(per_seed), "fraction": float(key.split("/")[0].removeprefix("fraction_"))}
             for key, per_seed in rows.items()}  # fmt: skip
    results = make_results(
        probe="finetune.classify",
        task="image-classification",
        title=f"fine-tuned classifier ({mode} encoder), label fractions",
        encoder=last["encoder"],
        # Each fraction trained on its own share of the training set: the counts are per run.
        dataset={
            **last["dataset"],
            "n_train": None,
            "n_val": None,
            "runs": {name: r["dataset"] for name, r in done.items()},
        },
        split=last["split"],
        seeds=list(seeds),
        metrics=table,
        config={
            **last["config"],
            "fractions": list(fractions),
            "runs": [run_name(f, s) for f in fractions for s in seeds],
        },
    )
    write_results(out / stage.RESULTS, results)
    plot_curve(table, out / CURVE, title=f"{out.name}: {mode}")
    print(format_rows(table))
    print(f"wrote {out / stage.RESULTS}")
    return results


def format_rows(rows: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: each score's mean over seeds, ± its standard deviation where there is one."""

    def cell(row: dict[str, Any], score: str) -> str:
        mean, std = row[score], row[f"{score}_std"]
        return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ±{std:.3f}")

    lines = [f"{'row':<28}" + "".join(f"{s:>20}" for s in SCORES)]
    lines += [f"{name:<28}" + "".join(f"{cell(row, s):>20}" for s in SCORES) for name, row in rows.items()]
    return "\n".join(lines)


def plot_curve(rows: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Balanced accuracy and AUROC against the share of labels, the 95 % interval shaded; a line per
    row name (a test set and mode) after the fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for key, row in rows.items():
        lines.setdefault(key.split("/", 1)[1], []).append(row)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in lines.items():
        points = sorted(points, key=lambda row: row["fraction"])
        x = [100 * row["fraction"] for row in points]
        for score in ("balanced_accuracy", "auroc"):
            y = [np.nan if row[score] is None else row[score] for row in points]
            ax.plot(x, y, marker="o", label=f"{name} {score}")
            ci = [row[f"{score}_ci95"] or (np.nan, np.nan) for row in points]
            ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], alpha=0.2)
    ax.set(xscale="log", xlabel="labels used (%)", ylabel="score", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def build_parser() -> Parser:
    parser = stage.build_parser(HEAD)
    parser.add_argument(
        "--fractions", type=float, nargs="+", help="label fractions of the training part, e.g. 0.01 0.1 1"
    )
    parser.add_argument("--seeds", type=int, help="seeds per fraction, from the config's seed on (default 1)")
    return parser


def parse_request(argv: Sequence[str] | None) -> tuple[argparse.Namespace, stage.Request]:
    """The checked arguments and request, before any data is read (``main`` and ``check_command``)."""
    args = stage.parse_arguments(build_parser(), argv)
    request = stage.request_from(HEAD, args)
    if args.fractions is None and args.seeds is None:
        return args, request
    if request.evaluate is not None:
        raise UserError("--eval scores one trained run: drop --fractions and --seeds")
    bad = [f for f in args.fractions or () if not 0 < f <= 1]
    if bad:
        raise UserError(f"--fractions must lie in (0, 1]; got {bad[0]}")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, not {args.seeds}")
    return args, request


def check_command(argv: Sequence[str] | None = None) -> None:
    stage.check_config(HEAD, parse_request(argv)[1])


def main(argv: Sequence[str] | None = None) -> int:
    args, request = parse_request(argv)
    if args.fractions is None and args.seeds is None:
        return stage.run(HEAD, request)
    fractions = list(stage.fraction_runs(args.fractions or DEFAULT_FRACTIONS).values())
    seeds = 1 if args.seeds is None else args.seeds
    first = resolve_config(request.config, HEAD.name, HEAD.config, request.overrides).seed
    run_fractions(request, fractions, list(range(first, first + seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
