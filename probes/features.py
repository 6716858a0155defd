"""Frozen-encoder features for a labelled set, cached on disk: what every probe starts from.

:func:`extract_features` runs an encoder (any ref :func:`ssl_path.encoder.load` takes) over the images
of a :class:`~ssl_path.data.readers.LabelledSet` with the evaluation transform and pools its tokens:

- ``cls``       the class token (token 0) after the final norm, as DINO/DINOv2 kNN and linear probes use
- ``mean``      the mean of the patch tokens (prefix tokens, i.e. class and registers, skipped); for a
                CNN, the global average of its last feature map
- ``cls+mean``  both, concatenated (DINOv2's linear-probe variant), twice the embed dim

``tta=True`` averages the pooled features of the 8 dihedral views (4 rotations x horizontal flip),
which tissue tiles have no preferred orientation to tell apart.

An image that cannot be read is skipped: it has no row, and ``FeatureSet.skipped`` names it with its
reason; more than ``max_skipped_fraction`` of the set unreadable (default 1 %) stops in one line.

Cache: one ``<key>.npy`` (float32 [N, D]) and ``<key>.json`` (meta) per extraction under ``cache_dir``
(default ``$SSL_PATH_CACHE`` or ``~/.cache/ssl_path/features``). The key (:func:`cache_key`) hashes
everything that can change a feature, so that a cached entry is never served for other settings:

- the encoder's identity: the sha256 of the weights file for file refs (a checkpoint, a run
  directory's ``checkpoints/last.pt``, an exported folder's weights plus its config), the ref plus
  the timm and torch versions for ``timm:ARCH`` (random init, built with torch seeded to
  :data:`RANDOM_INIT_SEED` so the baseline is the same network every time), the ref for ``hf-hub:``;
- for ``hf-hub:``, the revision (:func:`hub_revision`): the commit the local Hugging Face cache holds
  for it, else the ref's ``@REVISION``; a ref whose files are not cached yet is keyed again once its
  load has fetched them, so that a new upload to the same repo is a miss;
- the pool and TTA;
- the transform (:func:`transform_settings`): the input size (asked for, or the encoder's own), the
  resize rule with its crop fraction and interpolation. Mean, std and the native input size are
  the encoder's ``pretrained_cfg``, which its identity (weights and config bytes, timm version,
  hub revision) fixes;
- the ordered image files with their sizes and mtimes, so a changed image is a miss, while
  relabelling the same images is a hit (labels are not cached; they come from the set each time).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import ssl_path
from ssl_path import encoder as encoder_lib
from ssl_path.core.cli import resolve_device
from ssl_path.core.errors import UserError
from ssl_path.core.io import atomic_path, write_json
from ssl_path.data.labelled import LabelledImages
from ssl_path.data.readers import LabelledSet
from ssl_path.data.transforms import EvalTransform, eval_transform
from ssl_path.encoder.identity import (
    RANDOM_INIT_SEED,
    encoder_identity,
    identity_hash,
    sha256_text,
)
from ssl_path.encoder.refs import resolve as resolve_ref
from ssl_path.encoder.state import ModelArgumentError

__all__ = [
    "POOLS",
    "RANDOM_INIT_SEED",
    "CACHE_ENV",
    "DEFAULT_CACHE",
    "FeatureSet",
    "extract_features",
    "default_cache_dir",
    "data_fingerprint",
    "cache_key",
    "transform_settings",
    "hub_revision",
    "pool_tokens",
    "dihedral_views",
]

POOLS = ("cls", "mean", "cls+mean")
CACHE_ENV = "SSL_PATH_CACHE"
MAX_SKIPPED_FRACTION = 0.01  # of a set's images that may be unreadable before extraction stops
# Bump when the stored layout or the meaning of a key changes; old entries then simply miss.
CACHE_VERSION = 2


class _Default(enum.Enum):
    """Sentinel type: ``cache_dir=DEFAULT_CACHE`` means the default folder, ``None`` means no cache."""

    CACHE = "default"


DEFAULT_CACHE = _Default.CACHE


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """Pooled features of a labelled set, a row per readable record, plus what a probe needs beside them.

    ``labels`` are class indices into ``classes`` (-1 for an unlabeled record); ``encoder_hash`` and
    ``data_hash`` identify the encoder and the image files, as the cache key does. ``skipped``:
    (path, reason) of the set's records that could not be read, which have no row; ``records``: the
    record index of each row (None: row ``i`` is record ``i``), see :meth:`rows_of`.
    """

    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]
    groups: list[str | None]
    domains: list[str | None]
    paths: list[str]
    encoder_ref: str
    encoder_hash: str
    data_hash: str
    pool: str
    tta: bool = False
    input_size: int = 224
    skipped: tuple[tuple[str, str], ...] = ()
    records: np.ndarray | None = None  # int64 [N]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def select(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        """The rows at ``indices`` (e.g. the labelled rows), everything else unchanged."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = idx.tolist()
        return FeatureSet(
            features=self.features[idx],
            labels=self.labels[idx],
            classes=self.classes,
            groups=[self.groups[i] for i in pick],
            domains=[self.domains[i] for i in pick],
            paths=[self.paths[i] for i in pick],
            encoder_ref=self.encoder_ref,
            encoder_hash=self.encoder_hash,
            data_hash=self.data_hash,
            pool=self.pool,
            tta=self.tta,
            input_size=self.input_size,
            skipped=self.skipped,
            records=self._records()[idx],
        )

    def rows_of(self, records: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows of the records at indices ``records`` of the set; a skipped record has none."""
        row = {int(r): i for i, r in enumerate(self._records())}
        return np.asarray([row[int(r)] for r in records if int(r) in row], dtype=np.int64)

    def _records(self) -> np.ndarray:
        return self.records if self.records is not None else np.arange(len(self), dtype=np.int64)


# ----------------------------------------------------------------------------- identities and keys


def default_cache_dir() -> Path:
    """``$SSL_PATH_CACHE`` if set, else ``~/.cache/ssl_path/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "ssl_path" / "features"


def data_fingerprint(paths: Sequence[str]) -> str:
    """sha256 over the ordered image files with their sizes and mtimes; a missing file is a UserError."""
    sha = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            raise UserError(f"image not found: {path}") from None
        sha.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()


def transform_settings(input_size: int | None) -> dict[str, Any]:
    """The evaluation transform as a cache key sees it: every setting of
    :class:`~ssl_path.data.transforms.EvalTransform` that :func:`extract_features` does not take from
    the encoder (its defaults: crop fraction, interpolation), plus the input size asked for ("encoder":
    the encoder's own). Read off the transform class, so that a changed default changes the key."""
    template = eval_transform()
    fixed = {
        f.name: getattr(template, f.name)
        for f in dataclasses.fields(template)
        if f.compare and f.name not in ("input_size", "mean", "std")
    }
    return {
        "input_size": "encoder" if input_size is None else int(input_size),
        "mean_std": "encoder",
        "resize": "short side to input_size / crop_pct, centre crop",
        **fixed,
    }


def hub_revision(ref: str, hub_cache: str | os.PathLike | None = None) -> str | None:
    """The revision an ``hf-hub:ORG/NAME[@REVISION]`` ref loads, as far as is known offline: the commit
    the local Hugging Face cache (``hub_cache``, default huggingface_hub's) resolves it to, else its
    ``@REVISION``, else None (nothing cached yet). Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = ref.removeprefix("hf-hub:").partition("@")
    try:
        path = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache, revision=revision or None)
    except ValueError:  # not a valid repo id: the load will say so
        path = None
    if isinstance(path, str):
        return Path(path).parent.name  # .../snapshots/<commit>/config.json
    return revision or None


def cache_key(
    identity: str,
    pool: str,
    tta: bool,
    transform: dict[str, Any],
    data_hash: str,
    revision: str | None = None,
) -> str:
    """The cache file stem for one extraction (see the module docstring): ``transform`` is
    :func:`transform_settings`, ``revision`` the ``hf-hub:`` revision (:func:`hub_revision`)."""
    parts = {
        "v": CACHE_VERSION,
        "encoder": identity,
        "revision": revision,
        "pool": pool,
        "tta": tta,
        "transform": transform,
        "data": data_hash,
    }
    return sha256_text(json.dumps(parts, sort_keys=True))[:40]


# ----------------------------------------------------------------------------- pooling and views


def pool_tokens(out: Tensor, pool: str, num_prefix_tokens: int) -> Tensor:
    """Pool ``forward_features`` output: ViT tokens [B, T, D] or a CNN map [B, C, H, W] -> [B, D'] ."""
    if out.ndim == 4:  # a CNN: no tokens, only its spatial map
        if pool != "mean":
            raise UserError(f"pool {pool!r} needs a class token; this encoder is a CNN, use pool 'mean'")
        return out.mean(dim=(2, 3))
    if out.ndim != 3:
        raise UserError(f"cannot pool encoder output of shape {tuple(out.shape)}")
    if pool in ("cls", "cls+mean") and num_prefix_tokens < 1:
        raise UserError(f"pool {pool!r} needs a class token; this encoder has none, use pool 'mean'")
    cls = out[:, 0]
    if pool == "cls":
        return cls
    patches = out[:, num_prefix_tokens:]
    if patches.shape[1] == 0:
        raise UserError("the encoder returned no patch tokens to average")
    mean = patches.mean(dim=1)
    return mean if pool == "mean" else torch.cat([cls, mean], dim=1)


def dihedral_views(images: Tensor) -> list[Tensor]:
    """The 8 symmetries of the square, [B, C, S, S] each: rotations by 0/90/180/270 deg, then each mirrored."""
    rotations = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [view.flip(-1) for view in rotations]


# ----------------------------------------------------------------------------- extraction


def _load_encoder(ref: str, device: torch.device) -> tuple[nn.Module, encoder_lib.EncoderInfo]:
    """Build the encoder with a fixed torch seed (a ``timm:`` baseline is the same network every time),
    dynamic image size where the model takes it (any input size for a ViT), without touching the
    caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            return encoder_lib.load(ref, device=device, dynamic_img_size=True)
        except ModelArgumentError:
            pass
        # Not a ViT (a CNN, say): its constructor refused the keyword before building anything.
        torch.manual_seed(RANDOM_INIT_SEED)
        return encoder_lib.load(ref, device=device)


def _compute(
    model: nn.Module,
    num_prefix_tokens: int,
    data: LabelledSet,
    transform: EvalTransform,
    pool: str,
    tta: bool,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    max_skipped_fraction: float,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Features of the readable records, and (record index, path, reason) of the others."""
    loader = DataLoader(
        LabelledImages(data, transform, transform.input_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: a loader otherwise draws its worker seed from the caller's global RNG.
        generator=torch.Generator().manual_seed(RANDOM_INIT_SEED),
    )
    chunks: list[np.ndarray] = []
    skipped: list[tuple[int, str, str]] = []
    bar = tqdm(total=len(data), desc="features", unit="img", disable=not progress, dynamic_ncols=True)
    first = 0
    with torch.inference_mode(), bar:
        for batch in loader:
            errors = batch["error"]
            skipped += [(first + i, path, error) for i, (path, error) in enumerate(zip(batch["path"], errors)) if error]
            _stop_if_too_many(data, skipped, max_skipped_fraction)  # before the rest is spent on a lost cause
            read = [i for i, error in enumerate(errors) if not error]
            if read:
                # Copied whole, then indexed: an indexed copy would be unpinned and the copy synchronous.
                images = batch["image"].to(device, non_blocking=True)
                images = images if len(read) == len(errors) else images[read]
                views = dihedral_views(images) if tta else [images]
                pooled = sum(pool_tokens(model.forward_features(v), pool, num_prefix_tokens).float() for v in views)
                chunks.append((pooled / len(views)).cpu().numpy())
            first += len(errors)
            bar.update(len(errors))
    if not chunks:
        raise UserError(
            f"{data.name}: none of the {len(data)} images can be read; first {skipped[0][1]}: {skipped[0][2]}"
        )
    return np.concatenate(chunks).astype(np.float32, copy=False), skipped


def _stop_if_too_many(data: LabelledSet, skipped: Sequence[tuple[int, str, str]], max_fraction: float) -> None:
    if len(skipped) > max_fraction * len(data):
        _, path, reason = skipped[0]
        raise UserError(
            f"{data.name}: {len(skipped)} of {len(data)} images cannot be read, more than "
            f"{max_fraction:.1%} of them; first {path}: {reason}"
        )


def _read_cache(stem: Path, n: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A complete, well-formed cache entry for ``n`` records, or None (missing or damaged entries are
    recomputed); its meta lists the records skipped, which have no row."""
    meta_path, array_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if not meta_path.is_file() or not array_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        features = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    skipped = meta.get("skipped", [])
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] + len(skipped) != n:
        return None
    return features, meta


def _write_cache(stem: Path, features: np.ndarray, meta: dict[str, Any]) -> None:
    """Store an entry; a cache that cannot be written costs a warning, not the features just computed."""
    try:
        # The array goes first: the json is written last and so marks a complete entry.
        with atomic_path(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, features)  # a file object, since np.save adds ".npy" to a name that lacks it
        write_json(stem.with_suffix(".json"), meta)
    except OSError as err:
        print(f"warning: cannot write the feature cache in {stem.parent}: {err}", file=sys.stderr)


def extract_features(
    ref: str,
    data: LabelledSet,
    pool: str = "cls",
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    input_size: int | None = None,
    cache_dir: str | os.PathLike | None | _Default = DEFAULT_CACHE,
    progress: bool = True,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> FeatureSet:
    """Pooled features of every readable record of ``data`` from the encoder ``ref``; see the module
    docstring.

    Uses the encoder's own mean/std and input size (``input_size`` overrides the size; a ViT is built
    with ``dynamic_img_size``). ``cache_dir=None`` disables the cache. A cache hit builds no model.
    Unreadable images are left out and named in one warning line; more than ``max_skipped_fraction``
    of them is a UserError.
    """
    ref = str(ref)
    if pool not in POOLS:
        raise UserError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {num_workers}")
    if input_size is not None and input_size < 1:
        raise UserError(f"input size must be >= 1, got {input_size}")
    if len(data) == 0:
        raise UserError(f"{data.name}: no images to extract features from")
    cache = default_cache_dir() if cache_dir is DEFAULT_CACHE else (Path(cache_dir) if cache_dir is not None else None)
    dev = resolve_device(device)

    paths = [r.path for r in data.records]
    data_hash = data_fingerprint(paths)
    identity = encoder_identity(ref, cache)
    ref_hash = identity_hash(identity)
    labels = np.asarray(data.targets(), dtype=np.int64)

    def result(features: np.ndarray, size: int, skipped: Sequence[tuple[int, str, str]]) -> FeatureSet:
        _stop_if_too_many(data, skipped, max_skipped_fraction)
        if skipped:
            _, path, reason = skipped[0]
            print(
                f"warning: {data.name}: {len(skipped)} of {len(data)} images cannot be read and are left out; "
                f"first {path}: {reason}",
                file=sys.stderr,
            )
        gone = {int(i) for i, _, _ in skipped}
        kept = [i for i in range(len(paths)) if i not in gone]
        return FeatureSet(
            features=features,
            labels=labels[kept],
            classes=tuple(data.classes),
            groups=[data.records[i].group for i in kept],
            domains=[data.records[i].domain for i in kept],
            paths=[paths[i] for i in kept],
            encoder_ref=ref,
            encoder_hash=ref_hash,
            data_hash=data_hash,
            pool=pool,
            tta=tta,
            input_size=size,
            skipped=tuple((path, reason) for _, path, reason in skipped),
            records=np.asarray(kept, dtype=np.int64) if skipped else None,
        )

    # Without an override the input size is the encoder's own, known only after building it; the key
    # says "encoder" instead (fixed by the identity), as it does for mean and std.
    transform_key = transform_settings(input_size)
    hub = resolve_ref(ref).kind == "hf-hub"
    revision = hub_revision(ref) if hub else None
    stem = None
    if cache is not None:
        stem = cache / cache_key(identity, pool, tta, transform_key, data_hash, revision)
        hit = _read_cache(stem, len(paths))
        if hit is not None:
            features, meta = hit
            return result(features, int(meta.get("input_size", input_size or 0)), meta.get("skipped", []))

    model, info = _load_encoder(ref, dev)
    if hub and stem is not None:
        # A hub model not cached before has just been fetched: key it by the commit that came.
        revision = hub_revision(ref)
        stem = cache / cache_key(identity, pool, tta, transform_key, data_hash, revision)
    size = int(input_size or info.input_size[-1])
    encoder_lib.check_input_size(model, size, ref)
    transform = eval_transform(size, info.mean, info.std)
    features, skipped = _compute(
        model,
        info.num_prefix_tokens,
        data,
        transform,
        pool,
        tta,
        batch_size,
        num_workers,
        dev,
        progress,
        max_skipped_fraction,
    )
    if stem is not None:
        meta = {
            "cache_version": CACHE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ssl_path_version": ssl_path.__version__,
            "encoder_ref": ref,
            "encoder_identity": identity,
            "encoder_hash": ref_hash,
            "hub_revision": revision,
            "architecture": info.architecture,
            "data_name": data.name,
            "data_source": data.source,
            "data_hash": data_hash,
            "pool": pool,
            "tta": tta,
            "input_size": size,
            "transform": {**transform_key, "input_size": size, "mean": list(info.mean), "std": list(info.std)},
            "shape": list(features.shape),
            "paths": paths,
            "skipped": skipped,  # [record index, path, reason]: no row
        }
        _write_cache(stem, features, meta)
    return result(features, size, skipped)
