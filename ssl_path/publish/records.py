"""What a checkpoint and the files beside it (``run.json``, the shard manifest) say about how an
encoder was trained: :func:`training_record`, read by the model card."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ssl_path.data.manifest import data_locations, find_manifests, read_manifest
from ssl_path.encoder.checkpoint import RUN_MANIFESTS, read_run_record
from ssl_path.encoder.identity import file_digest


@dataclass
class TrainingRecord:
    """What the checkpoint and the files beside it say about how the encoder was trained."""

    method: str | None = None
    step: int | None = None
    planned_steps: int | None = None
    global_batch: int | None = None
    wall_time_s: float | None = None
    config: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)  # run.json, without host and command
    data: dict[str, Any] | None = None  # the shard manifest's summary
    data_missing: list[str] = field(default_factory=list)  # shard locations whose manifest was not found
    # Against the manifests run.json recorded at the run's start: those found that it did not record,
    # and how many it recorded that were not found.
    data_foreign: list[str] = field(default_factory=list)
    data_absent: int = 0


def training_record(
    checkpoint: dict[str, Any], checkpoint_path: Path, shards: Sequence[str] | None = None
) -> TrainingRecord:
    """The training facts of a checkpoint read by :func:`ssl_path.encoder.read_checkpoint`.

    ``run.json`` is looked up in the run directory that holds ``checkpoints/``; the shard manifest
    where ``shards`` (or, by default, ``run.json``'s data) points.
    """
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    train = (config or {}).get("train", {})
    run = read_run_record(checkpoint_path.parent.parent)
    world_size = int(run.get("world_size") or checkpoint.get("data", {}).get("world_size") or 1)
    record = TrainingRecord(
        method=checkpoint.get("method") or (config or {}).get("method"),
        step=_int_or_none(checkpoint.get("step")),
        planned_steps=_planned_steps(train),
        global_batch=int(train["batch_size"]) * world_size if isinstance(train.get("batch_size"), int) else None,
        wall_time_s=float(checkpoint["wall_time"]) if isinstance(checkpoint.get("wall_time"), (int, float)) else None,
        config=config,
        run={k: run[k] for k in ("started", "world_size", "device", "torch") if k in run},
    )
    manifests, record.data_missing = find_manifests(data_locations(shards if shards else run.get("data")))
    trained_on = run.get(RUN_MANIFESTS)
    if manifests and isinstance(trained_on, list):  # runs before it was recorded are taken at their word
        digests = {str(m): file_digest(m) for m in manifests}
        record.data_foreign = [m for m, digest in digests.items() if digest not in trained_on]
        record.data_absent = sum((Counter(trained_on) - Counter(digests.values())).values())
    if manifests and not record.data_foreign and not record.data_absent:
        record.data = data_summary(manifests)
    return record


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def _planned_steps(train: dict[str, Any]) -> int | None:
    epochs, per_epoch = train.get("epochs"), train.get("steps_per_epoch")
    if isinstance(epochs, (int, float)) and isinstance(per_epoch, int):
        return int(round(epochs * per_epoch))
    return None


def data_summary(manifests: Sequence[Path]) -> dict[str, Any]:
    """Tiles, shards, tiling and source folders of one or more shard manifests, without local paths."""
    total, shards, skipped = 0, 0, 0
    sources: list[dict[str, Any]] = []
    tilings: list[dict[str, Any]] = []
    for manifest in manifests:
        content = read_manifest(manifest)
        total += int(content["total"])
        shards += len(content["shards"])
        skipped += len(content.get("skipped", []))
        sources.extend(s for s in content.get("sources", []) if isinstance(s, dict) and "path" in s)
        params = content.get("params", {})
        tiling = {k: params.get(k) for k in ("tile_size", "stride", "mpp", "downscale", "min_tissue", "stain_norm")}
        same = next((t for t in tilings if {k: t[k] for k in tiling} == tiling), None)
        if same is None:
            same = {**tiling, "images": 0, "without_mpp": 0}
            tilings.append(same)
        used = [s for s in content.get("sources", []) if isinstance(s, dict)]
        same["images"] += len(used)
        # under --mpp, sources with no pixel size were tiled at --downscale: the card must not claim the mpp for them
        same["without_mpp"] += sum(1 for s in used if s.get("mpp") is None) if tiling["mpp"] is not None else 0
    folders: Counter[str] = Counter()
    images: Counter[str] = Counter()
    for source, folder in zip(sources, _source_folders([s["path"] for s in sources])):
        folders[folder] += int(source.get("tiles", 0))
        images[folder] += 1
    domains: Counter[str] = Counter()
    for source in sources:
        if source.get("domain"):
            domains[str(source["domain"])] += int(source.get("tiles", 0))
    return {
        "tiles": total,
        "shards": shards,
        "images": len(sources),
        "skipped_images": skipped,
        "tilings": tilings,
        "folders": [{"name": name, "images": images[name], "tiles": folders[name]} for name in sorted(folders)],
        "domains": dict(sorted(domains.items())),
    }


def _source_folders(paths: Sequence[str]) -> list[str]:
    """A short name per source: the first folder below the sources' common parent (no local paths)."""
    if not paths:
        return []
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath(parents)
    names = []
    for parent in parents:
        rel = os.path.relpath(parent, common)
        names.append(os.path.basename(common) if rel == "." else rel.split(os.sep)[0])
    return names
