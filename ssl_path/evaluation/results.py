"""The one ``results.json`` schema that every probe and fine-tuning evaluation writes and the model card reads.

A results file is a JSON object::

    {
      "schema": "ssl-path/results/v1",
      "probe": "knn",                          # which evaluation made it
      "created": "2025-01-01T12:00:00+00:00",  # UTC, ISO 8601
      "ssl_path_version": "0.1.0",
      "encoder": {"ref": ..., "hash": ...},    # hash: the feature cache's encoder hash
      "dataset": {"train": SPEC, "test": SPEC, "n_train": int, "n_test": int, "classes": [...]},
      "split": {...},                          # how train and test were chosen
      "seeds": [int, ...],
      "metrics": {...} or [{...}, ...],        # named rows or a list of rows
      "config": {...}                          # every setting needed to run it again
    }

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

__all__ = ["SCHEMA", "make_results", "write_results", "read_results", "validate_results", "jsonable"]

SCHEMA = "ssl-path/results/v1"
REQUIRED_KEYS = (
    "schema",
    "probe",
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
    if not isinstance(results["probe"], str) or not results["probe"]:
        return "probe must be a non-empty string"
    for key, keys in (("encoder", ENCODER_KEYS), ("dataset", DATASET_KEYS)):
        part = results[key]
        if not isinstance(part, dict):
            return f"{key} must be an object"
        lacking = [k for k in keys if k not in part]
        if lacking:
            return f"{key} lacks {', '.join(lacking)}"
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
    return validate_results(results, where=str(path))
