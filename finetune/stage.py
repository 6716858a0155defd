"""What every head command shares: its command line, its run directory, training with selection,
scoring on the test sets, and ``--eval RUN_DIR`` on a new set without retraining.

A head module (:mod:`finetune.segment`, :mod:`finetune.classify`) describes itself with a
:class:`Head` (its config, how it builds its network and data, how it validates, scores and predicts)
and its ``main`` is ``stage.main(HEAD, argv)``:

    python -m finetune.<head> --ckpt REF --train SPEC [--test SPEC] --out RUN_DIR [--config NAME|YAML]
        [--mode frozen|last-N|full|lora] [--max-steps N] [key=value ...]
    python -m finetune.<head> --eval RUN_DIR --test SPEC [--out results.json]

A run dir holds ``config.yaml``, ``run.json``, ``metrics.jsonl`` and ``loss.png`` (the loop's),
``validation.jsonl`` and ``validation.png``, ``checkpoints/{last,best}.pt``, ``selection.json`` (what validation chose: the
step, post-processing), ``results.json`` and the head's figures. Rerunning the same command resumes it;
a finished run (one with ``results.json``) is never trained again: give another ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shutil
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from finetune.config import INPUTS, FinetuneConfig, resolve_config
from finetune.data import batch_layout, epoch_stream, split_sets
from finetune.task import VALIDATION_LOG, VALIDATION_PNG, HeadTask, best_path, fit, load_best, load_encoder
from ssl_path.core.cli import Parser, add_out, add_overwrite, add_progress, make_parser, out_file, resolve_device
from ssl_path.core.config import dump_yaml, overridden, read_yaml
from ssl_path.core.distributed import barrier, from_rank_0, init_distributed
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import atomic_path, check_out_file, refuse_out_over_inputs, write_json
from ssl_path.data.readers import LabelledSet, parse_spec, read_spec, with_filters
from ssl_path.encoder import EncoderInfo
from ssl_path.encoder.checkpoint import CHECKPOINT_DIR, RUN_RECORD, checkpoint_path
from ssl_path.encoder.identity import encoder_hash
from ssl_path.evaluation.results import make_results, read_results, write_results
from ssl_path.evaluation.splits import sample_subset
from ssl_path.training.loop import SKIPS_LOG, TrainingDiverged
from ssl_path.training.metrics_log import LOSS_PNG, METRICS, read_metrics
from ssl_path.training.run_dir import CONFIG_FILE, check_run_dir

RUN_FILE = RUN_RECORD
SELECTION = "selection.json"
RESULTS = "results.json"


@dataclass(frozen=True)
class Head:
    """A head task as the stage sees it; every callable takes plain values."""

    name: str  # the command and the config section: segment, classify
    task: str  # the results.json task
    title: str
    config: type  # the head's config dataclass
    default_config: str  # shipped config name in finetune/configs/
    score: str  # the validation score that selects (higher is better)
    figures: tuple[str, ...]  # what it writes into a run dir besides the common entries
    classes: Callable[[Any, LabelledSet], list[str]]  # what its scores are per: labels, or image classes
    check: Callable[[Any, LabelledSet, str], None]  # refuse a set the head cannot use, in one line
    build: Callable[[Any, EncoderInfo, LabelledSet], tuple[nn.Module, nn.Module]]  # (head, criterion)
    train_data: Callable[[Any, LabelledSet, EncoderInfo, int], tuple[Any, np.ndarray | None]]  # dataset, weights
    validate: Callable[[Any, HeadTask, LabelledSet], dict[str, Any]]  # {score: ..., "skipped": [(path, reason)]}
    choose: Callable[[Any, HeadTask, LabelledSet], dict[str, Any]]  # choices on validation (post-processing)
    # (rows of scores, (path, reason) of each image skipped)
    evaluate: Callable[[Any, HeadTask, LabelledSet, dict[str, Any], Path | None, str], tuple[dict, list]]
    # (config, task, images, selection, out folder, advance(n): n more images done) -> images written
    predict: Callable[[Any, HeadTask, Sequence[Path], dict[str, Any], Path, Callable[[int], object]], int]


@dataclass(frozen=True)
class Request:
    ckpt: str | None
    train: str | None
    test: str | None
    out: Path | None
    config: str
    overrides: tuple[str, ...] = ()
    evaluate: Path | None = None
    max_steps: int | None = None
    overwrite: bool = False
    progress: bool = True
    fraction: float | None = None  # train on this stratified share of the training part
    split_seed: int | None = None  # the seed of the test and validation splits (default: the config's)


def build_parser(head: Head) -> Parser:
    parser = make_parser(
        f"python -m finetune.{head.name}",
        f"{head.title}: train a head on an encoder, or score a trained one (--eval) on another labelled set.",
    )
    parser.add_argument(
        "--ckpt", metavar="REF", help="encoder: timm:ARCH, hf-hub:ORG/NAME, a checkpoint, run dir or export"
    )
    parser.add_argument(
        "--train", metavar="SPEC", help="labelled training set, a data SPEC: READER:PATH[?option=value&...]"
    )
    parser.add_argument("--test", metavar="SPEC", help="test set (default: the set's named split, or a held-out share)")
    add_out(parser, help="run directory (with --eval: the results.json to write)", required=False, type=str)
    parser.add_argument("--eval", type=Path, metavar="RUN_DIR", help="score the trained run RUN_DIR on --test")
    parser.add_argument(
        "--config", default=head.default_config, help="shipped config name or YAML (default %(default)s)"
    )
    parser.add_argument(
        "--mode", help="encoder tuning: frozen, last-N (e.g. last-4), full or lora (= encoder.mode=...)"
    )
    parser.add_argument("--max-steps", type=int, help="stop after this step (schedules still span the run)")
    # A run dir is resumed or refused, never replaced: it may hold hours of training.
    add_overwrite(parser, help="with --eval: replace an existing results.json (only once the new one is complete)")
    add_progress(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, with ``key=value`` overrides wherever they stand among the flags."""
    args, extra = parser.parse_known_args(argv)
    flags = [e for e in extra if e.startswith("-")]
    if flags:
        raise UserError(f"{parser.prog}: unrecognized arguments: {' '.join(flags)} (see --help)")
    args.overrides = [*args.overrides, *extra]
    return args


def check_config(head: Head, request: Request) -> None:
    """Refuse the config a checked request would train with, overrides included, reading no data:
    what each stage's ``check_command(argv)`` adds to its own checks of the arguments, for ``slurm.launch``."""
    if request.evaluate is None:
        resolve_config(request.config, head.name, head.config, request.overrides)


def fraction_name(fraction: float) -> str:
    """The run directory of a label fraction in a series."""
    return f"fraction_{fraction:g}"


def fraction_runs(fractions: Sequence[float]) -> dict[str, float]:
    """Each label fraction of a series by its run's name; fractions that print alike (0.5, 0.5000001)
    would share a run directory, so they are one run."""
    runs: dict[str, float] = {}
    for fraction in fractions:
        runs.setdefault(fraction_name(fraction), fraction)
    return runs


def refuse_flag_and_override(value: str | None, flag: str, key: str, overrides: Sequence[str]) -> None:
    """A flag that is short for an override, given together with that override: one would be dropped."""
    if value is not None and overridden(overrides, key):
        raise UserError(f"{flag} and {key}=... set the same thing; give one")


def request_from(head: Head, args: argparse.Namespace) -> Request:
    """The parsed :func:`build_parser` as plain values, each checked."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r} (overrides are key=value)")
    refuse_flag_and_override(args.mode, "--mode", "encoder.mode", args.overrides)
    overrides = tuple(args.overrides) + ((f"encoder.mode={args.mode}",) if args.mode else ())
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, not {args.max_steps}")
    if args.eval is not None:
        if args.test is None:
            raise UserError("--eval RUN_DIR needs --test SPEC, the set to score it on")
        if args.ckpt or args.train or overrides:
            raise UserError("--eval scores a trained run as it is: drop --ckpt, --train, --mode and overrides")
    elif args.ckpt is None or args.train is None or args.out is None:
        raise UserError("give --ckpt REF --train SPEC --out RUN_DIR (or --eval RUN_DIR --test SPEC)")
    elif args.overwrite:
        raise UserError("--overwrite is for --eval's results.json; a run dir is never replaced: give another --out")
    return Request(
        ckpt=args.ckpt,
        train=args.train,
        test=args.test,
        # with --eval a file, where a trailing / would be dropped unseen
        out=None if args.out is None else out_file(args.out) if args.eval is not None else Path(args.out),
        config=args.config,
        overrides=overrides,
        evaluate=args.eval,
        max_steps=args.max_steps,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def run_entries(head: Head) -> tuple[str, ...]:
    return (
        RUN_FILE,
        METRICS,
        LOSS_PNG,
        SKIPS_LOG,
        VALIDATION_LOG,
        VALIDATION_PNG,
        CHECKPOINT_DIR,
        SELECTION,
        RESULTS,
        *head.figures,
    )


def train_run(head: Head, request: Request) -> dict[str, Any] | None:
    """Train, select on validation, score on the test sets; returns the results dict it wrote (``{}``
    on ranks other than 0, which write nothing), or None where ``--max-steps`` paused the run."""
    assert request.ckpt is not None and request.train is not None and request.out is not None
    out = request.out
    cfg = resolve_config(request.config, head.name, head.config, request.overrides)
    data = read_spec(request.train)
    test = read_spec(request.test) if request.test else None
    inputs = [Path(parse_spec(s).path) for s in (request.train, request.test) if s]
    if Path(request.ckpt).expanduser().exists():
        inputs.append(Path(request.ckpt).expanduser())
    refuse_out_over_inputs(out, inputs)
    head.check(cfg.head, data, "--train")
    if test is not None:
        head.check(cfg.head, test, "--test")
    if (out / RESULTS).is_file():
        raise UserError(f"--out {out} is a finished run (its scores are in {out / RESULTS}); use another --out")
    split_seed = cfg.seed if request.split_seed is None else request.split_seed
    train_set, val_set, tests, split = split_sets(data, test, cfg.select.val_fraction, split_seed)
    if request.fraction is not None:
        # Images with a class are drawn within it; images without one (a detection set's) uniformly.
        labels = np.asarray(train_set.targets())
        labels = labels if (labels >= 0).any() else np.zeros(len(labels), dtype=np.int64)
        train_set = train_set.select(sample_subset(labels, fraction=request.fraction, seed=cfg.seed))
        split.update(fraction=request.fraction, n_train=len(train_set))
    dist_info = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device, dist_info.local_rank)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = build_task(head, cfg, request.ckpt, train_set)  # writes nothing: a bad request leaves out as it was
    # What results.json names: the encoder this run started from, read once, by rank 0, for all ranks.
    trained_from = from_rank_0(encoder_hash(request.ckpt) if dist_info.is_main else None)
    _refuse_another_encoder(out, request.ckpt, trained_from)
    dataset, weights = head.train_data(cfg.head, train_set, task.info, cfg.seed)
    _, per_epoch = batch_layout(len(dataset), cfg.train.batch_size, dist_info.world_size)
    cfg = replace(cfg, train=replace(cfg.train, steps_per_epoch=per_epoch))
    # What the run learns from belongs to its config: a resumed run must be trained on the same encoder
    # (by content, wherever it is now) and sets (as the readers name them, however the path was written).
    inputs = {"encoder_hash": trained_from, "train": data.source, "test": test.source if test else None,
              "fraction": request.fraction, "split_seed": split_seed}  # fmt: skip
    config = {**cfg.to_dict(), INPUTS: inputs}
    fresh = check_run_dir(out, config, run_entries(head), kind="fine-tuning")
    barrier()  # every rank checked the run dir before rank 0 writes into it
    if fresh and dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / CONFIG_FILE) as tmp:
            tmp.write_text(dump_yaml(config))
        write_json(out / RUN_FILE, {**_run_record(request, device), "world_size": dist_info.world_size})
    barrier()
    stream = epoch_stream(
        dataset,
        cfg.train.batch_size,
        cfg.seed,
        cfg.train.num_workers,
        weights,
        pin_memory=device.type == "cuda",
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    if dist_info.world_size > 1 and device.type == "cuda":  # torch syncs batch norm on GPUs only
        task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
    task.to(device)
    best = fit(
        task,
        stream,
        out,
        cfg.optim,
        cfg.train,
        cfg.select,
        config,
        validate=lambda t: head.validate(cfg.head, t, val_set),
        score_key=head.score,
        dist_info=dist_info,
        progress=request.progress and dist_info.is_main,
        max_steps=request.max_steps,
    )
    if best is None:
        if dist_info.is_main:
            print(f"paused at --max-steps {request.max_steps}; the same command without it resumes {out}")
        return None
    if not dist_info.is_main:
        return {}  # rank 0 scores the test sets and writes the results
    selection = {
        "validation": best,
        "mode": cfg.encoder.mode,
        "classes": list(data.classes),
        **head.choose(cfg.head, task, val_set),
    }
    write_json(out / SELECTION, selection)
    rows, skipped = {}, _training_skips(out) + [(p, r) for p, r in best.get("skipped", [])]
    _clear_figures(head, out)  # of an earlier scoring that stopped: they show images as they were
    try:
        for name, test_set in tests.items():
            scored, missed = head.evaluate(cfg.head, task, test_set, selection, out, name)
            # "repair", not "drop": a test split carved from --train would be drawn anew without them
            then = "; the trained run is kept: repair them and run the same command again"
            check_test_skips(test_set, missed, cfg, then)
            rows.update({f"{name}/{key}" if len(tests) > 1 else key: row for key, row in scored.items()})
            skipped += missed
    except BaseException:  # refused scores, or a stop: their figures would pass for the run's
        _clear_figures(head, out)
        raise
    encoder = {"ref": request.ckpt, "hash": trained_from}
    results = _results(head, cfg, encoder, train_set, val_set, tests, split, rows, selection, skipped)
    write_results(out / RESULTS, results, overwrite=True)
    print_scores(rows)
    print(f"wrote {out / RESULTS}")
    return results


def _clear_figures(head: Head, out: Path) -> None:
    for figure in head.figures:
        shutil.rmtree(out / figure, ignore_errors=True)


def check_test_skips(
    test: LabelledSet, skipped: Sequence[tuple[str, str]], cfg: FinetuneConfig, then: str = ""
) -> None:
    """Say which of a test set's images could not be read and were left out of its scores, and refuse
    the scores where more were than the run allows of its training images (``train.max_skipped_fraction``;
    its default is the probes' bound)."""
    if not skipped:
        return
    count, (path, reason) = len(dict.fromkeys(p for p, _ in skipped)), skipped[0]
    told = f"{test.name}: {count} of {len(test)} test images cannot be read"
    bound = cfg.train.max_skipped_fraction
    if count > bound * len(test):
        raise UserError(
            f"{told}, more than the run allows (train.max_skipped_fraction={bound}); first {path}: {reason}{then}"
        )
    print(f"warning: {told} and are left out of its scores; first {path}: {reason}", file=sys.stderr)


def no_readable_image(data: LabelledSet, skipped: Sequence[tuple[str, str]]) -> UserError:
    """The refusal of a set none of whose images can be read, named by the set it is (a test set of
    several, or the validation split) and by the first image's reason."""
    first = f"; first {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
    return UserError(f"{data.name}: no readable image to score, of {len(data)} ({data.source}){first}")


def _refuse_another_encoder(out: Path, ckpt: str, trained_from: str) -> None:
    """A resumable run dir trained from another encoder than ``ckpt``'s, refused in words rather than as a
    config difference of hashes; a run dir with no checkpoint yet starts again whatever it held."""
    saved = out / CONFIG_FILE
    if not (saved.is_file() and checkpoint_path(out).is_file()):
        return
    inputs = read_yaml(saved).get(INPUTS) or {}
    if "encoder_hash" not in inputs:
        raise UserError(f"--out {out} was started by an older ssl-path (it names its encoder by path); "
                        "finish it with that version or use another --out")  # fmt: skip
    if inputs["encoder_hash"] != trained_from:
        raise UserError(
            f"--out {out} was trained from another encoder (hash {inputs['encoder_hash']}) than --ckpt {ckpt} "
            f"(hash {trained_from}: its weights, or for timm: its timm and torch versions); use another --out"
        )


def print_scores(rows: dict[str, dict[str, Any]]) -> None:
    """Each results row, its numbers only, a line each: what a user looks for when a run ends."""
    for key, row in rows.items():
        print(key, json.dumps({k: v for k, v in row.items() if isinstance(v, (int, float))}))


def build_task(head: Head, cfg: FinetuneConfig, ref: str, data: LabelledSet) -> HeadTask:
    """The head task on the encoder ``ref`` names; ``data`` (the training part) gives classes and weights."""
    encoder, info, kwargs = load_encoder(ref, cfg.encoder)
    module, criterion = head.build(cfg.head, info, data)
    _refuse_non_vit(module, encoder, info)
    return HeadTask(head.name, encoder, info, kwargs, module, criterion, cfg.encoder)


def _refuse_non_vit(module: nn.Module, encoder: nn.Module, info: EncoderInfo) -> None:
    # Dense heads read same-stride token maps of a plain ViT; a CNN's feature pyramid is another neck.
    if module.reads in ("maps", "encoder") and not (hasattr(encoder, "blocks") and hasattr(encoder, "patch_embed")):
        raise UserError(f"{info.ref} ({info.architecture}) is not a plain ViT; this dense head reads ViT blocks")


def load_trained(head: Head, run_dir: Path) -> tuple[FinetuneConfig, HeadTask, dict[str, Any]]:
    """A finished run's config, its task with the selected weights (LoRA merged), and its selection."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a {head.name} run (no {CONFIG_FILE})")
    if head.name not in read_yaml(run_dir / CONFIG_FILE):  # a pretraining run, or another head's
        raise UserError(f"{run_dir} is not a finetune.{head.name} run (its {CONFIG_FILE} has no {head.name} section)")
    if not (run_dir / SELECTION).is_file():
        raise UserError(f"{run_dir} has not finished training (no {SELECTION}); its training command resumes it")
    cfg = resolve_config(run_dir / CONFIG_FILE, head.name, head.config, (), saved=True)
    selection = json.loads((run_dir / SELECTION).read_text())
    best = load_best(run_dir)
    frozen = replace(cfg.encoder, mode="frozen")  # the selected encoder, LoRA already merged
    encoder, info, _ = load_encoder(str(best_path(run_dir)), frozen)
    classes = LabelledSet((), selection["classes"], name=run_dir.name, source=str(run_dir))
    module, criterion = head.build(cfg.head, info, classes)
    task = HeadTask(head.name, encoder, info, {}, module, criterion, frozen)
    task.head.load_state_dict({k[len("head.") :]: v for k, v in best["model"].items() if k.startswith("head.")})
    task.eval()
    return cfg, task, selection


def eval_run(head: Head, request: Request) -> dict[str, Any]:
    assert request.evaluate is not None and request.test is not None
    run_dir = request.evaluate
    if request.out is not None:
        check_out_file(request.out, request.overwrite, [run_dir, Path(parse_spec(request.test).path)])
    cfg, task, selection = load_trained(head, run_dir)
    test = read_spec(request.test)
    head.check(cfg.head, test, "--test")
    rows, skipped = head.evaluate(cfg.head, task, test, selection, None, "test")
    check_test_skips(test, skipped, cfg)
    print_scores(rows)
    if request.out is None:
        return {}
    results = make_results(
        probe=f"finetune.{head.name}",
        task=head.task,
        title=f"{head.title} ({cfg.encoder.mode} encoder), trained run {run_dir}",
        encoder={"ref": str(run_dir), "hash": encoder_hash(str(best_path(run_dir)))},
        dataset={
            "train": str(run_dir),
            "test": test.source,
            "n_train": 0,
            "n_test": len(test) - len(skipped),
            "classes": head.classes(cfg.head, replace(test, classes=tuple(selection["classes"]))),
            **_skip_entries(skipped),
        },
        split={"method": "given", "test": test.source},
        seeds=[cfg.seed],
        metrics=rows,
        config={**cfg.to_dict(), "selection": selection},
    )
    write_results(request.out, results, overwrite=request.overwrite)
    print(f"wrote {request.out}")
    return results


def _results(
    head: Head,
    cfg: FinetuneConfig,
    encoder: dict[str, str],
    train_set: LabelledSet,
    val_set: LabelledSet,
    tests: dict[str, LabelledSet],
    split: dict[str, Any],
    rows: dict[str, Any],
    selection: dict[str, Any],
    skipped: list[tuple[str, str]],
) -> dict[str, Any]:
    return make_results(
        probe=f"finetune.{head.name}",
        task=head.task,
        title=f"{head.title} ({cfg.encoder.mode} encoder)",
        encoder=encoder,
        dataset={
            "train": train_set.source,
            "test": " + ".join(dict.fromkeys(t.source for t in tests.values())),
            "tests": {name: len(t) for name, t in tests.items()},
            "n_train": len(train_set),
            "n_val": len(val_set),
            "n_test": sum(len(t) for t in tests.values()) - sum(1 for p, _ in skipped if p in _paths(tests)),
            "classes": head.classes(cfg.head, train_set),
            **_skip_entries(skipped),
        },
        split=split,
        seeds=[cfg.seed],
        metrics=rows,
        config={**cfg.to_dict(), "selection": selection},
    )


def _training_skips(run_dir: Path) -> list[tuple[str, str]]:
    """(path, reason) of each image the training stream skipped, from the loop's ``skipped.jsonl``."""
    log = run_dir / SKIPS_LOG
    return [(r["key"] or r["shard"], r["reason"]) for r in read_metrics(log)] if log.is_file() else []


def _paths(tests: dict[str, LabelledSet]) -> set[str]:
    return {r.path for t in tests.values() for r in t.records}


def _skip_entries(skipped: Sequence[tuple[str, str]]) -> dict[str, Any]:
    unique = list(dict.fromkeys(skipped))
    return {"n_skipped": len(unique), "skipped": [{"path": p, "reason": r} for p, r in unique]}


def _run_record(request: Request, device: torch.device) -> dict[str, Any]:
    return {
        "ckpt": request.ckpt,
        "train": request.train,
        "test": request.test,
        "command": " ".join(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "torch": str(torch.__version__),
    }


# ----------------------------------------------------------------------------- series of runs


def run_series(
    head: Head, request: Request, runs: Sequence[tuple[str, Request]], entries: Sequence[str] = ()
) -> dict[str, dict[str, Any]] | None:
    """Each named sub-run of ``runs`` (its ``out`` under ``request.out``), trained in order: {name: its
    results} ({} on ranks other than 0), or None where ``--max-steps`` paused one.

    A sub-run that finished keeps its results, so the same command, rerun after a pause or a requeue,
    trains only what is left; ``request.out`` holds nothing but these runs, ``results.json`` and
    ``entries`` (the series' own figures).
    """
    assert request.out is not None
    out = request.out
    mine = {Path(name).parts[0] for name, _ in runs} | {RESULTS, *entries}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in mine) if out.is_dir() else []
    if out.exists() and not out.is_dir() or foreign:
        raise UserError(f"--out {out} holds {foreign[0] if foreign else 'a file'}, not only runs of this command")
    if (out / RESULTS).exists():
        raise UserError(f"--out {out} is finished (its scores are in {out / RESULTS}); use another --out")
    done: dict[str, dict[str, Any]] = {}
    for name, sub in runs:
        assert sub.out is not None and sub.ckpt is not None
        finished = sub.out / RESULTS
        if finished.is_file():
            results = read_results(finished)
            # A series reports one encoder: its finished runs must be of the one --ckpt names now.
            if results["encoder"].get("hash") != (now := encoder_hash(sub.ckpt)):
                raise UserError(
                    f"{finished} was trained from encoder {results['encoder'].get('hash')}, not from --ckpt "
                    f"{sub.ckpt} (now {now}); use another --out"
                )
        else:
            results = train_run(head, sub)
        if results is None:
            return None
        if results:  # rank 0's
            done[name] = results
    return done


def leave_one_domain_out(request: Request) -> list[tuple[str, Request]]:
    """One sub-run per domain of ``--train``: trained on the other domains, tested on that one."""
    assert request.train is not None and request.out is not None
    if request.test is not None:
        raise UserError("--leave-one-domain-out tests each domain of --train in turn: drop --test")
    domains = read_spec(request.train).domains()
    if len(domains) < 2:
        raise UserError(f"--leave-one-domain-out: {request.train} has {len(domains)} domain(s); it needs at least 2")
    runs = []
    for domain in domains:
        others = [d for d in domains if d != domain]
        name = "domain_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", domain)
        sub = replace(request, out=request.out / name, train=with_filters(request.train, domain=others),
                      test=with_filters(request.train, domain=[domain]))  # fmt: skip
        runs.append((name, sub))
    return runs


def parse_request(head: Head, argv: Sequence[str] | None) -> Request:
    """The checked request of a stage that adds no flags of its own, before any data is read."""
    return request_from(head, parse_arguments(build_parser(head), argv))


def main(head: Head, argv: Sequence[str] | None = None) -> int:
    return run(head, parse_request(head, argv))


def run(head: Head, request: Request) -> int:
    try:
        if request.evaluate is not None:
            eval_run(head, request)
        else:
            train_run(head, request)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cli(head: Head) -> None:
    sys.exit(run_cli(lambda argv: main(head, argv)))
