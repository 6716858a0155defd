"""Labelled images for heads: which records train, validate and test, and the loop's batch streams.

- :func:`split_sets`: the test sets are ``--test`` when given; else the set's own named split (records
  whose ``split`` is ``train`` train, each other split value is a test set: MoNuSeg's Kumar split,
  AMi-Br's benchmark split, GlaS's testA/testB); else a share of ``--train`` held out in whole groups
  (patients, slides; each image its own group where there are none). The validation split is the
  set's own ``val`` split where its named split is used (BCCD's official train/val/test), else carved
  from what trains, in whole groups; either way no test image ever makes a choice.
- :func:`epoch_stream`: batches of a map-style dataset, epoch after epoch, in an order that is a pure
  function of (seed, epoch), restartable at any batch: what exact resume needs. With ``weights`` an
  epoch draws its images with replacement in proportion to them (class-balanced sampling).
- :func:`collate_readable`: drops the items that could not be read and lists them under ``"skipped"``
  as (set, path, reason), which the loop counts, names and bounds (``train.max_skipped_fraction``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ssl_path.core.errors import UserError
from ssl_path.data.readers import LabelledSet
from ssl_path.evaluation.splits import DEFAULT_TEST_FRACTION, group_split
from ssl_path.training.loop import StreamFactory

SKIPPED = "skipped"
VAL = "val"  # the split name of a set's own validation split


def split_sets(
    data: LabelledSet,
    test: LabelledSet | None,
    val_fraction: float,
    seed: int,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> tuple[LabelledSet, LabelledSet, dict[str, LabelledSet], dict[str, Any]]:
    """(train, validation, {test name: test set}, the ``split`` entry of results.json)."""
    if test is not None:
        trainable, tests, split = data, {"test": test}, {"method": "given", "test": test.source}
    elif "train" in data.splits() and set(data.splits()) - {"train", VAL}:
        trainable = _named_split(data, "train")
        tests = {name: _named_split(data, name) for name in data.splits() if name not in ("train", VAL)}
        split = {"method": "named", "source": data.source, "tests": sorted(tests)}
    else:
        train_idx, test_idx = _carve(data, test_fraction, seed, "test")
        trainable, tests = data.select(train_idx), {"test": data.select(test_idx)}
        # whole groups hold out about the share asked for: both are recorded, as the probes do
        split = {
            "method": "group",
            "test_fraction": test_fraction,
            "test_share": len(test_idx) / len(data),
            "seed": seed,
        }
    if split["method"] == "named" and VAL in data.splits():  # a published validation split (VOC's val) as published
        fit, val = trainable, _named_split(data, VAL)
        split.update(validation="named")
    else:
        fit_idx, val_idx = _carve(trainable, val_fraction, seed, "validation")
        fit, val = trainable.select(fit_idx), trainable.select(val_idx)
    split.update(n_train=len(fit), n_val=len(val), n_test={k: len(v) for k, v in tests.items()})
    return fit, val, tests, split


def _named_split(data: LabelledSet, split: str) -> LabelledSet:
    """A published split, named for what it is: a set's messages say which of its test sets they mean."""
    return replace(data.filter(split=split), name=f"{data.name}/{split}")


def _carve(data: LabelledSet, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) < 2:
        raise UserError(f"{data.name}: {len(data)} image(s) cannot give a {what} split; at least 2 are needed")
    return group_split(data.targets(), [r.group for r in data.records], fraction, seed)


def class_balanced_weights(targets: Sequence[int]) -> np.ndarray:
    """A draw weight per image, equal in total for every class present (1 / its count)."""
    targets = np.asarray(targets)
    counts = np.bincount(targets[targets >= 0])
    weights = np.where(targets >= 0, 1.0 / np.maximum(counts[np.maximum(targets, 0)], 1), 0.0)
    return weights / weights.sum()


def batch_layout(n_images: int, batch_size: int, world_size: int = 1) -> tuple[int, int]:
    """(images per process and step, steps per epoch): full global batches of ``batch_size`` per process
    in one pass, a last partial one dropped; a set smaller than one global batch is one smaller batch."""
    if n_images < world_size:
        raise UserError(f"{n_images} training images cannot feed {world_size} processes; use fewer processes")
    size = min(batch_size, n_images // world_size)
    return size, n_images // (size * world_size)


def epoch_stream(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    weights: np.ndarray | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> StreamFactory:
    """The batches of ``dataset[(index, epoch)]`` from batch ``start`` on; see the module docstring.

    Under DDP every process draws the same epoch order and takes its own ``batch_size`` of each global
    batch: together the ranks see what one process with the whole global batch would.
    """
    n = len(dataset)  # type: ignore[arg-type]
    size, per_epoch = batch_layout(n, batch_size, world_size)

    def order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        return rng.choice(n, size=n, replace=True, p=weights) if weights is not None else rng.permutation(n)

    def stream(start: int) -> Any:
        epoch, offset = divmod(start, per_epoch)
        while True:
            idx = order(epoch)
            mine = [idx[(b * world_size + rank) * size :][:size] for b in range(offset, per_epoch)]
            batches = [[(int(i), epoch) for i in batch] for batch in mine]
            yield from DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=num_workers,
                collate_fn=collate_readable,
                pin_memory=pin_memory,
                # Its own seed draw, not the global RNG's: a restart must leave dropout's draws as they were.
                generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
            )
            epoch, offset = epoch + 1, 0

    return stream


def collate_readable(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable items' ``image`` and ``target`` (a list, where targets are dicts of their own
    size: a detector's boxes); the others under ``"skipped"``."""
    good = [it for it in items if not it.get("error")]
    skipped = [(it.get("set", ""), it["path"], it["error"]) for it in items if it.get("error")]
    batch: dict[str, Any] = {}
    if good:
        targets = [it["target"] for it in good]
        batch = {
            "image": default_collate([it["image"] for it in good]),
            "target": targets if isinstance(targets[0], dict) else default_collate(targets),
        }
    if skipped:
        batch[SKIPPED] = skipped
    return batch
