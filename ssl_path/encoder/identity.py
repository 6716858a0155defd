"""Encoder identity: a string, and its short hash, that change whenever an encoder could compute
different features. Feature caches key on it; results.json and the model card carry the hash, so
that an export refuses results measured on another encoder.

File refs (a checkpoint, a run directory, an export) are identified by the sha256 of the files
that define them (:meth:`ssl_path.encoder.refs.EncoderRef.weights_files`); ``timm:ARCH`` (random
init, built with torch seeded to :data:`RANDOM_INIT_SEED`) by the ref and the timm and torch
versions; ``hf-hub:`` by the ref.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm
import torch

from ssl_path.core.io import atomic_path
from ssl_path.encoder.refs import resolve

RANDOM_INIT_SEED = 0
_HASH_CHUNK = 1 << 20
# (realpath, size, mtime_ns) -> sha256; a weights file is hashed once per process and, with a cache
# folder, once per change: a 1 GB checkpoint takes seconds to read.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, read in chunks; remembered per (path, size, mtime) in memory and under ``cache_dir``."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    stored = None
    if cache_dir is not None:
        stored = cache_dir / "digests" / (sha256_text(json.dumps(key))[:32] + ".txt")
        if stored.is_file():
            digest = stored.read_text().strip()
            if len(digest) == 64:
                _DIGESTS[key] = digest
                return digest
    sha = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    _DIGESTS[key] = digest
    if stored is not None:
        try:
            with atomic_path(stored) as tmp:
                tmp.write_text(digest + "\n")
        except OSError:
            pass  # only a speed-up; the in-memory copy still serves this process
    return digest


def encoder_identity(ref: str, cache_dir: Path | None = None) -> str:
    """A string that changes whenever the encoder ``ref`` names could compute different features."""
    resolved = resolve(ref)
    if resolved.kind == "timm":
        return f"{resolved.text}|seed={RANDOM_INIT_SEED}|timm={timm.__version__}|torch={torch.__version__}"
    if resolved.kind == "hf-hub":
        return resolved.text
    return "file|" + "|".join(file_digest(f, cache_dir) for f in resolved.weights_files())


def encoder_hash(ref: str, cache_dir: Path | None = None) -> str:
    """The short hash of :func:`encoder_identity` that features, caches and results.json carry."""
    return identity_hash(encoder_identity(ref, cache_dir))


def identity_hash(identity: str) -> str:
    return sha256_text(identity)[:16]
