"""The one ``results.json`` schema that every probe and fine-tuning evaluation writes and the model card reads.

A results file is a JSON object::

    {
      "schema": "ssl-path/results/v2",
      "probe": "knn",                          # the name of the evaluation that made it
      "task": "image-classification",          # one of TASKS: what the scores measure
      "title": "kNN probe (frozen encoder)",   # how a reader (the model card) names it
      "created": "2025-01-01T12:00:00+00:00",  # UTC, ISO 8601
      "ssl_path_version": "0.1.0",
      "encoder": {"ref": ..., "hash": ...},    # hash: the feature cache's encoder hash
      "dataset": {"train": SPEC, "test": SPEC, "n_train": int | None, "n_test": int | None,
                  "classes": [...], "n_skipped": int, "skipped": [{"path": ..., "reason": ...}, ...]},
      "split": {...},                          # how train and test were chosen
      "seeds": [int, ...],
      "metrics": {...} or [{...}, ...],        # named rows or a list of rows
      "config": {...}                          # every setting needed to run it again
    }

``n_train`` and ``n_test`` count the images evaluated; an image that could not be read is left out
and listed under ``skipped`` with its reason (``n_skipped`` and ``skipped`` are optional: files
written before they existed have neither, and mean none was skipped). Where the rows come from
several training sets, no one count holds and the count that differs is None: a probe's
leave-one-domain-out (``n_images`` counts the whole set, ``split["folds"]`` holds each fold's
``n_train`` and ``n_test``), a fine-tuning series (``dataset["runs"]`` holds each run's ``dataset``).
Files written before 2026-12-03 said one fold's or run's counts there.

A carved split (``split["method"] == "group"``) states the held-out share asked for
(``test_fraction``) and the one whole groups gave (``test_share``, from 2026-12-03 on).

The evaluation that writes a file states its task and title, so a reader never keeps a table of
evaluation names. A v1 file (no task, no title: only frozen-feature classification probes wrote
them) is upgraded as it is read, its title being its probe name.

Values are made JSON-safe on the way in (numpy scalars and arrays to Python, tuples to lists, NaN and
infinities to None), so a file written here is strict JSON that any reader accepts.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import ssl_path
from ssl_path.core.errors import UserError
from ssl_path.core.io import write_json

__all__ = ["SCHEMA", "TASKS", "make_results", "write_results", "read_results", "validate_results", "jsonable"]

SCHEMA = "ssl-path/results/v2"
SCHEMA_V1 = "ssl-path/results/v1"
# What a file's scores measure; the model card's model-index states it as the task type.
TASKS = ("image-classification", "segmentation", "detection")
REQUIRED_KEYS = (
    "schema",
    "probe",
    "task",
    "title",
    "created",
    "ssl_path_version",
    "encoder",
    "dataset",
    "split",
    "seeds",
    "metrics",
    "config",
)
ENCODER_KEYS = ("ref", "hash")
DATASET_KEYS = ("train", "test", "n_train", "n_test", "classes")


def jsonable(value: Any) -> Any:
    """``value`` with numpy types, tuples and paths made plain JSON; NaN and infinities become None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in results.json")


def make_results(
    probe: str,
    task: str,
    title: str,
    encoder: Mapping[str, Any],
    dataset: Mapping[str, Any],
    split: Mapping[str, Any],
    seeds: Sequence[int],
    metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """A results dict in the schema above, stamped with the time and the ssl_path version."""
    results = {
        "schema": SCHEMA,
        "probe": probe,
        "task": task,
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ssl_path_version": ssl_path.__version__,
        "encoder": jsonable(dict(encoder)),
        "dataset": jsonable(dict(dataset)),
        "split": jsonable(dict(split)),
        "seeds": jsonable(list(seeds)),
        "metrics": jsonable(metrics if isinstance(metrics, Mapping) else list(metrics)),
        "config": jsonable(dict(config)),
    }
    problem = _problem(results)
    if problem:
        raise ValueError(f"make_results: {problem}")
    return results


def _problem(results: Any) -> str | None:
    """What is wrong with a results dict, or None if it follows the schema."""
    if not isinstance(results, dict):
        return f"a JSON object was expected, got {type(results).__name__}"
    if results.get("schema") != SCHEMA:
        return f"schema is {results.get('schema')!r}, expected {SCHEMA!r}"
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        return f"missing {', '.join(missing)}"
    for key in ("probe", "title"):
        if not isinstance(results[key], str) or not results[key]:
            return f"{key} must be a non-empty string"
    if results["task"] not in TASKS:
        return f"task is {results['task']!r}, expected one of {', '.join(TASKS)}"
    for key, keys in (("encoder", ENCODER_KEYS), ("dataset", DATASET_KEYS)):
        part = results[key]
        if not isinstance(part, dict):
            return f"{key} must be an object"
        lacking = [k for k in keys if k not in part]
        if lacking:
            return f"{key} lacks {', '.join(lacking)}"
    skipped = results["dataset"].get("skipped", [])
    if not isinstance(skipped, list) or results["dataset"].get("n_skipped", len(skipped)) != len(skipped):
        return "dataset skipped must be a list of n_skipped entries"
    for key in ("split", "config"):
        if not isinstance(results[key], dict):
            return f"{key} must be an object"
    if not isinstance(results["seeds"], list) or not all(isinstance(s, int) for s in results["seeds"]):
        return "seeds must be a list of integers"
    if not isinstance(results["metrics"], (dict, list)):
        return "metrics must be an object or a list of rows"
    return None


def validate_results(results: Any, where: str = "results") -> dict[str, Any]:
    """``results`` if it follows the schema, else a UserError naming ``where`` and the problem."""
    problem = _problem(results)
    if problem:
        raise UserError(f"{where} is not an ssl-path results file ({SCHEMA}): {problem}")
    return results


def write_results(path: str | os.PathLike, results: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``results`` atomically to ``path``; an existing file is replaced only with ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"results path {path} is a folder; give a file name such as {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    results = validate_results(jsonable(dict(results)))
    # allow_nan=False: jsonable already removed NaN, so this only guards strict JSON.
    json.dumps(results, allow_nan=False)
    write_json(path, results)
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """The results dict stored at ``path``; a missing, unreadable or foreign file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read results file {path}: {err}") from None
    return validate_results(_upgraded(results), where=str(path))


def _upgraded(results: Any) -> Any:
    """A v1 results dict as v2; anything else unchanged. Only classification probes wrote v1."""
    if not isinstance(results, dict) or results.get("schema") != SCHEMA_V1:
        return results
    return {**results, "schema": SCHEMA, "task": "image-classification", "title": results.get("probe")}
