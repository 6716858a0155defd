"""The model card of an exported encoder, made only from records: nothing in it is typed by hand.

Three records feed it:
- the checkpoint: method, steps, resolved config and wall-clock;
- the run's ``run.json`` and the shards' ``manifest.json``: hardware and training data;
- the probes' ``results.json`` files (schema in :mod:`probes.results`): every score of every row
  goes into the front matter's model-index and into the evaluation tables.

:func:`build_card` turns them into a :class:`huggingface_hub.ModelCard`. The prose is the Jinja
template ``model_cards/encoder.md``; huggingface_hub renders it and writes the front matter.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

import ssl_path
from probes.metrics import SCORES
from ssl_path.config import dump_yaml
from ssl_path.data.loader import manifest_path, read_manifest
from ssl_path.data.readers.spec import parse_spec
from ssl_path.encoder import EncoderInfo
from ssl_path.errors import UserError

TEMPLATE = "encoder.md"
RUN_RECORD = "run.json"
BASE_TAGS = ("pathology", "histology", "self-supervised", "image-feature-extraction", "timm", "ssl-path")
PIPELINE_TAG = "image-feature-extraction"
TASK_TYPE = "image-classification"  # what every probe of a frozen encoder measures


@dataclass(frozen=True)
class Method:
    """How a card names and cites a pretraining method."""

    title: str
    citation: str


METHODS = {
    "dinov2": Method(
        title="DINOv2 (self-distillation with iBOT masked-patch prediction and KoLeo)",
        citation="""@article{oquab2024dinov2,
  title   = {{DINOv2}: Learning Robust Visual Features without Supervision},
  author  = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and others},
  journal = {Transactions on Machine Learning Research},
  year    = {2024}
}""",
    ),
    "mae": Method(
        title="MAE (masked autoencoding of image patches)",
        citation="""@inproceedings{he2022mae,
  title     = {Masked Autoencoders Are Scalable Vision Learners},
  author    = {He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr and Girshick, Ross},
  booktitle = {CVPR},
  year      = {2022}
}""",
    ),
}

PROBE_TITLES = {
    "knn": "kNN probe",
    "linear": "linear probe",
    "fewshot": "few-label probes",
}


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


# ----------------------------------------------------------------------------- records


def training_record(checkpoint: dict[str, Any], checkpoint_path: Path, shards: Sequence[str] | None = None) -> TrainingRecord:
    """The training facts of a checkpoint read by :func:`ssl_path.encoder.read_checkpoint`.

    ``run.json`` is looked up in the run directory that holds ``checkpoints/``; the shard manifest
    where ``shards`` (or, by default, ``run.json``'s data) points.
    """
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    train = (config or {}).get("train", {})
    run = _read_run_record(checkpoint_path.parent.parent / RUN_RECORD)
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
    locations = list(shards) if shards else _data_locations(run.get("data"))
    manifests, record.data_missing = _find_manifests(locations)
    if manifests:
        record.data = data_summary(manifests)
    return record


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def _planned_steps(train: dict[str, Any]) -> int | None:
    epochs, per_epoch = train.get("epochs"), train.get("steps_per_epoch")
    if isinstance(epochs, (int, float)) and isinstance(per_epoch, int):
        return int(round(epochs * per_epoch))
    return None


def _read_run_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _data_locations(data: Any) -> list[str]:
    parts = data if isinstance(data, list) else [data] if isinstance(data, str) else []
    return [piece for part in parts for piece in str(part).split("::") if piece]


def _find_manifests(locations: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The manifest of each shard location (a folder, a manifest, or a .tar or brace pattern in a folder)."""
    found: list[Path] = []
    missing: list[str] = []
    for location in locations:
        path = Path(location.split("{")[0])  # a brace pattern or a .tar lies in its shard folder
        manifest = manifest_path(path) or manifest_path(path.parent)
        if manifest is None:
            missing.append(location)
        elif manifest.resolve() not in {m.resolve() for m in found}:
            found.append(manifest)
    return found, missing


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
        if tiling not in tilings:
            tilings.append(tiling)
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


# ----------------------------------------------------------------------------- evaluation


def dataset_name(spec: str | None) -> str:
    """A dataset's short name from its SPEC: the folder or file name, without local paths."""
    if not spec:
        return "unknown"
    try:
        path = parse_spec(spec).path
    except UserError:
        path = spec
    return Path(path.rstrip("/")).stem or path


def _tested_on(results: dict[str, Any]) -> str:
    """The name of the set a results file's scores were measured on (its train set under leave-one-out)."""
    return dataset_name(results["dataset"].get("test") or results["dataset"].get("train"))


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    metrics = results["metrics"]
    if isinstance(metrics, dict):
        return [(name, row) for name, row in metrics.items() if isinstance(row, dict)]
    return [(str(row.get("name", i)), row) for i, row in enumerate(metrics) if isinstance(row, dict)]


def _score(row: dict[str, Any], name: str) -> float | None:
    value = row.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _split_label(results: dict[str, Any]) -> str:
    method = results["split"].get("method")
    return str(method) if method else "test"


def eval_results(all_results: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """One model-index entry per score of every row of every results file."""
    entries = []
    for results in all_results:
        probe = results["probe"]
        name = _tested_on(results)
        for row_name, row in _rows(results):
            for score in SCORES:
                value = _score(row, score)
                if value is None:
                    continue
                entries.append(EvalResult(
                    task_type=TASK_TYPE,
                    task_name=f"{PROBE_TITLES.get(probe, probe)} (frozen encoder)",
                    dataset_type=name,
                    dataset_name=name,
                    dataset_split=_split_label(results),
                    metric_type=score,
                    metric_name=f"{probe} {row_name} {score}",
                    metric_config=f"{probe}/{row_name}",
                    metric_value=value,
                ))
    return entries


def evaluation_tables(all_results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A markdown-ready table per results file: rows as in the file, one column per score it has."""
    tables = []
    for results in all_results:
        rows = _rows(results)
        scores = [s for s in SCORES if any(_score(row, s) is not None for _, row in rows)]
        body = []
        for row_name, row in rows:
            cells = []
            for score in scores:
                value = _score(row, score)
                ci = row.get(f"{score}_ci95")
                if value is None:
                    cells.append("n/a")
                elif isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
                    cells.append(f"{value:.3f} ± {(ci[1] - ci[0]) / 2:.3f}")
                else:
                    cells.append(f"{value:.3f}")
            body.append([row_name, *cells])
        dataset = results["dataset"]
        split = results["split"]
        tables.append({
            "title": f"{PROBE_TITLES.get(results['probe'], results['probe'])} on "
                     f"{_tested_on(results)}, {_split_label(results)}",
            "probe": results["probe"],
            "columns": ["row", *scores],
            "rows": body,
            "n_train": dataset.get("n_train"),
            "n_test": dataset.get("n_test"),
            "classes": dataset.get("classes") or [],
            "folds": [f.get("domain") for f in split.get("folds", []) if isinstance(f, dict)],
            "seeds": results.get("seeds") or [],
            "with_ci": any("±" in c for r in body for c in r[1:]),
            "created": results.get("created"),
        })
    return tables


# ----------------------------------------------------------------------------- the card


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_facts(model: nn.Module, info: EncoderInfo, model_args: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "params_m": _count_params(model) / 1e6,
        "embed_dim": info.embed_dim,
        "patch_size": info.patch_size,
        "num_blocks": info.num_blocks,
        "reg_tokens": int(model_args.get("reg_tokens") or 0),
        "init_values": model_args.get("init_values"),
        "input_size": info.input_size[-1],
        "mean": [round(v, 4) for v in info.mean],
        "std": [round(v, 4) for v in info.std],
        "dense_blocks": list(info.dense_blocks),
    }


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "encoder"


def template_text(template: Path | None = None) -> str:
    """The card template: ``template`` if given, else the shipped ``model_cards/encoder.md``."""
    if template is not None:
        if not Path(template).is_file():
            raise UserError(f"card template {template} does not exist")
        return Path(template).read_text()
    return resources.files("model_cards").joinpath(TEMPLATE).read_text()


def build_card(
    model: nn.Module,
    info: EncoderInfo,
    model_args: dict[str, Any],
    record: TrainingRecord,
    all_results: Sequence[dict[str, Any]],
    name: str,
    license: str,
    folder: Path,
    template: Path | None = None,
) -> ModelCard:
    """The model card of an encoder, its front matter holding a model-index of every given score.

    ``name`` is ``org/name`` for a card that will go to the Hub; any other name keeps the card local,
    and its loading examples then name ``folder``.
    """
    method = METHODS.get(record.method or "")
    datasets = sorted({f["name"] for f in (record.data or {}).get("folders", [])}
                      | {_tested_on(r) for r in all_results})
    card_data = ModelCardData(
        model_name=name,
        library_name="timm",
        license=license,
        pipeline_tag=PIPELINE_TAG,
        tags=[*BASE_TAGS, *([record.method] if record.method else [])],
        datasets=datasets or None,
        metrics=[s for s in SCORES if any(_score(row, s) is not None for r in all_results for _, row in _rows(r))] or None,
        eval_results=eval_results(all_results) or None,
    )
    repo = name if "/" in name else None
    context = {
        "name": name,
        "repo": repo,
        "folder": str(Path(folder).resolve()),
        "license": license,
        "method": record.method,
        "method_title": method.title if method else record.method,
        "method_citation": method.citation if method else None,
        "model": _model_facts(model, info, model_args),
        "record": record,
        "hours": record.wall_time_s / 3600 if record.wall_time_s is not None else None,
        "config_yaml": dump_yaml(record.config).rstrip() if record.config else None,
        "tables": evaluation_tables(all_results),
        "datasets": datasets,
        "slug": _slug(name),
        "year": datetime.now(timezone.utc).year,
        "ssl_path_version": ssl_path.__version__,
    }
    return ModelCard.from_template(card_data, template_str=template_text(template), **context)
