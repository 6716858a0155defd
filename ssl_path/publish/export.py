"""Export an encoder as a folder that timm loads as it loads UNI or Phikon: ``config.json``
(architecture, ``model_args`` and ``pretrained_cfg``, so that loading needs no keyword argument),
``model.safetensors`` (timm's key names: the encoder entry of the checkpoint, so any method exports
the same way) and ``README.md`` (the model card, :mod:`ssl_path.publish.card`).

``files.json`` lists those files with their sizes and sha256 (:func:`write_file_list`): it is what
:mod:`ssl_path.publish.push` uploads, and checks first, so that a stray or damaged file never goes up.
It stays local: the Hub keeps its own sha256 of every file it stores.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models import save_for_hf

from ssl_path.core.errors import UserError, first_line
from ssl_path.core.io import atomic_dir, check_out_dir, make_public, write_json
from ssl_path.encoder.checkpoint import RUN_RECORD, encoder_entry, read_checkpoint
from ssl_path.encoder.identity import encoder_hash, file_digest
from ssl_path.encoder.info import encoder_info
from ssl_path.encoder.refs import checkpoint_file
from ssl_path.encoder.state import model_from_entry, published_kwargs
from ssl_path.evaluation.results import read_results
from ssl_path.publish.card import build_card, tested_on
from ssl_path.publish.records import TrainingRecord, training_record

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
EXPORTED = (CONFIG, WEIGHTS, CARD)
FILE_LIST = "files.json"
FILE_LIST_FORMAT = "ssl-path-export-files/1"
DEFAULT_LICENSE = "other"
# timm's pretrained_cfg keys that describe where an upstream checkpoint came from, not this one.
UPSTREAM_CFG_KEYS = (
    "tag",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "file",
    "source",
    "state_dict",
    "paper_ids",
    "paper_name",
    "origin_url",
    "notes",
    "license",
    "test_input_size",
    "test_crop_pct",
)


def export(
    ckpt: str | Path,
    out: str | Path,
    results: Sequence[str | Path] = (),
    *,
    name: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: Sequence[str] = (),
    shards: Sequence[str] | None = None,
    template: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the timm-format folder of the checkpoint ``ckpt`` (a ``.pt`` file or a run directory) to ``out``.

    ``datasets`` are Hub dataset ids (``org/name``), or ``SET=org/name`` for the set a results file
    was measured on as the card names it (``amibr=org/amibr-midog21``), whose model-index entries then
    name that id: the Hub links both, and local folder names would link whatever dataset bears them.
    """
    if name is not None:
        # org/name as push takes it: the card's hf-hub:NAME loads for others only with its owner in it
        check_repo_id(name, "--name")
    named = [dataset.rpartition("=")[::2] for dataset in datasets]  # (the set's name or "", hub id)
    for _, hub_id in named:
        check_repo_id(hub_id, "--datasets")  # org/name: a bare name is more likely a local folder
    set_ids = {set_name: hub_id for set_name, hub_id in named if set_name}
    path = checkpoint_file(ckpt)
    # The run dir or checkpoint, and every file the card is made of, must outlive a replaced --out.
    inputs = [Path(ckpt), path, *results, *(shards or ()), *([template] if template is not None else [])]
    out = check_out_dir(out, overwrite, inputs)
    all_results = [read_results(r) for r in results]  # a missing or foreign file fails before any work
    measured_on = {tested_on(r) for r in all_results}
    unknown = sorted(s for s in set_ids if s not in measured_on)
    if unknown:
        sets = ", ".join(sorted(measured_on)) or "none: no --results"
        raise UserError(f"--datasets {unknown[0]}=...: no results file was measured on {unknown[0]!r} (sets: {sets})")
    checkpoint = read_checkpoint(path)
    trained = checkpoint.get("config") or {}
    if "task" in trained and "method" not in trained:
        # A fine-tuning run holds an encoder too, but it learnt from labels: the card would say otherwise.
        raise UserError(
            f"{path} is of a fine-tuning run (a {trained['task']} head); export the pretraining run or "
            "checkpoint its --ckpt named"
        )
    if all_results:
        own_hash = encoder_hash(str(path))
        for file, res in zip(results, all_results):
            if res["encoder"].get("hash") != own_hash:
                raise UserError(
                    f"{file} was measured on encoder {res['encoder'].get('ref')!r} (hash {res['encoder'].get('hash')}), "
                    f"not on {path} (hash {own_hash}); a card only reports its own encoder's results"
                )
    record = training_record(checkpoint, path, shards)
    if shards and record.data_missing:
        raise UserError(
            f"--shards {record.data_missing[0]}: no shard manifest there (a folder written by ssl_path.shards, "
            "its manifest.json, or a shard in that folder)"
        )
    other_data = _other_data(record)
    if other_data and shards:
        raise UserError(f"--shards: {other_data}; give the shards this run started on")
    if other_data:
        print(f"warning: {other_data}; the card will not describe the training data", file=sys.stderr)
    for location in record.data_missing:
        print(
            f"warning: no shard manifest found for {location}; the card will not describe the training data",
            file=sys.stderr,
        )
    with atomic_dir(out, overwrite, inputs) as tmp:
        entry = encoder_entry(checkpoint, path)
        model = model_from_entry(entry, str(path)).eval()
        args = published_kwargs(entry.get("model_kwargs", {}))
        model.pretrained_cfg = {
            **{k: v for k, v in model.pretrained_cfg.items() if k not in UPSTREAM_CFG_KEYS},
            # Whole tiles, no centre crop: what the probes that measured the card's numbers fed the encoder.
            "crop_pct": 1.0,
            "license": license,
        }
        info = encoder_info(model, str(path))
        card = build_card(
            model,
            info,
            args,
            record,
            all_results,
            name=name or out.name,
            license=license,
            datasets=[hub_id for _, hub_id in named],
            set_ids=set_ids,
            folder=out,
            template=template,
        )
        save_for_hf(model, str(tmp), model_config={"model_args": args}, safe_serialization=True)
        card.save(tmp / CARD)
        for file in tmp.iterdir():
            make_public(file)
        write_file_list(tmp)
    return out


def _other_data(record: TrainingRecord) -> str | None:
    """What differs between the shard manifests found and those the run's record says it started on."""
    if record.data_foreign:
        return f"{record.data_foreign[0]} is not a shard manifest this run started on (by the sha256 its {RUN_RECORD} holds)"
    if record.data_absent and not record.data_missing:  # a missing location is warned of on its own
        return f"{record.data_absent} of the shard manifests this run started on are not among those found"
    return None


def write_file_list(folder: Path) -> list[dict[str, Any]]:
    """Write ``folder/files.json``: every file of the export (name relative to it, size, sha256)."""
    files = [
        {"name": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != FILE_LIST
    ]
    write_json(folder / FILE_LIST, {"format": FILE_LIST_FORMAT, "files": files})
    return files


def check_repo_id(repo: str, flag: str) -> None:
    """``repo`` must be a Hub repo id with its owner: ``org/name``."""
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise UserError(f"{flag} {repo!r} is not a Hub repo id (org/name): {first_line(err)}") from None
    if repo.count("/") != 1:
        raise UserError(f"{flag} {repo!r} must be org/name")
