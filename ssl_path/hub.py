"""Publish an encoder: a folder that timm loads as it loads UNI or Phikon, and its upload to the Hub.

``python -m ssl_path.hub export --ckpt RUN_DIR --out DIR [--results results.json ...] [--name org/name]``
writes ``config.json`` (architecture, ``model_args`` and ``pretrained_cfg``, so that loading needs
no keyword argument), ``model.safetensors`` (timm's key names: the encoder entry of the
checkpoint, so any pretraining method exports the same way) and ``README.md`` (the model card,
see :mod:`ssl_path.model_card`).

``python -m ssl_path.hub push DIR --repo org/name [--private] [--revision BRANCH] [--dry-run]``
uploads exactly those files with huggingface_hub. The token comes from ``HF_TOKEN`` or ``hf auth
login``; it is passed to huggingface_hub and never printed or written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import huggingface_hub
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models import save_for_hf

import ssl_path
from probes.features import encoder_hash
from probes.results import read_results
from ssl_path import encoder
from ssl_path.errors import UserError, first_line, run_cli
from ssl_path.io import atomic_dir, make_public
from ssl_path.model_card import build_card, training_record

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
EXPORTED = (CONFIG, WEIGHTS, CARD)
DEFAULT_LICENSE = "other"
# timm's pretrained_cfg keys that describe where an upstream checkpoint came from, not this one.
UPSTREAM_CFG_KEYS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict", "paper_ids",
                     "paper_name", "origin_url", "notes", "license", "test_input_size", "test_crop_pct")


def model_args(entry: dict[str, Any]) -> dict[str, Any]:
    """The timm kwargs that rebuild the encoder, without the regularisation that only training uses."""
    return {k: v for k, v in entry.get("model_kwargs", {}).items() if not k.endswith("drop_rate")}


def export(
    ckpt: str | Path,
    out: str | Path,
    results: Sequence[str | Path] = (),
    name: str | None = None,
    license: str = DEFAULT_LICENSE,
    shards: Sequence[str] | None = None,
    template: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the timm-format folder of the checkpoint ``ckpt`` (a ``.pt`` file or a run directory) to ``out``."""
    out = Path(out)
    if name is not None:
        _check_repo_id(name, "--name", with_org=False)
    path = encoder.checkpoint_file(ckpt)
    all_results = [read_results(r) for r in results]  # a missing or foreign file fails before any work
    if all_results:
        own_hash = encoder_hash(str(path))
        for file, res in zip(results, all_results):
            if res["encoder"].get("hash") != own_hash:
                raise UserError(
                    f"{file} was measured on encoder {res['encoder'].get('ref')!r} (hash {res['encoder'].get('hash')}), "
                    f"not on {path} (hash {own_hash}); a card only reports its own encoder's results"
                )
    with atomic_dir(out, overwrite) as tmp:
        checkpoint = encoder.read_checkpoint(path)
        entry = encoder.encoder_entry(checkpoint, path)
        model = encoder.model_from_entry(entry, path).eval()
        args = model_args(entry)
        model.pretrained_cfg = {
            **{k: v for k, v in model.pretrained_cfg.items() if k not in UPSTREAM_CFG_KEYS},
            # Whole tiles, no centre crop: what the probes that measured the card's numbers fed the encoder.
            "crop_pct": 1.0,
            "license": license,
        }
        info = encoder.encoder_info(model, str(path))
        record = training_record(checkpoint, path, shards)
        for location in record.data_missing:
            print(f"warning: no shard manifest found for {location}; the card will not describe the training data",
                  file=sys.stderr)
        card = build_card(model, info, args, record, all_results, name=name or out.name, license=license,
                          folder=out, template=template)
        save_for_hf(model, str(tmp), model_config={"model_args": args}, safe_serialization=True)
        card.save(tmp / CARD)
        for file in tmp.iterdir():
            make_public(file)
    return out


def exported_files(folder: str | Path) -> list[str]:
    """The files of an exported folder, relative to it; a folder that is not an export is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (export one with python -m ssl_path.hub export)")
    missing = [f for f in EXPORTED if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is not an exported encoder: it lacks {', '.join(missing)}")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _check_repo_id(repo: str, flag: str, with_org: bool = True) -> None:
    """``repo`` must be a Hub repo id: ``org/name``, or a bare name where ``with_org`` is False."""
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise UserError(f"{flag} {repo!r} is not a Hub repo id (org/name): {first_line(err)}") from None
    if with_org and repo.count("/") != 1:
        raise UserError(f"{flag} {repo!r} must be org/name")


def push(folder: str | Path, repo: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> list[str]:
    """Upload the exported ``folder`` to the model repo ``repo``; returns the files (uploaded, or that would be)."""
    folder = Path(folder)
    _check_repo_id(repo, "--repo")
    files = exported_files(folder)
    card_name = ModelCard.load(folder / CARD).data.model_name
    if card_name != repo:
        raise UserError(f"{folder / CARD} describes {card_name!r}, not {repo!r}; "
                        f"export again with --name {repo} so that the card's loading code names this repo")
    if dry_run:
        return files
    if huggingface_hub.get_token() is None:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(library_name="ssl-path", library_version=ssl_path.__version__)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, allow_patterns=files,
                          commit_message=f"Upload encoder exported by ssl-path {ssl_path.__version__}")
    except Exception as err:  # HTTP, connection and offline-mode errors all mean the same to a user
        raise UserError(f"push to {repo} failed: {first_line(err)}") from None
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_path.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write a timm-format folder with its model card")
    ex.add_argument("--ckpt", required=True, help="a training checkpoint (.pt) or run directory")
    ex.add_argument("--out", required=True, type=Path, help="folder to write (must be new or empty)")
    ex.add_argument("--results", nargs="*", default=[], type=Path, help="results.json files of this encoder's probes")
    ex.add_argument("--name", help="org/name on the Hub (the card's title and loading code)")
    ex.add_argument("--license", default=DEFAULT_LICENSE, help=f"Hub license id (default {DEFAULT_LICENSE})")
    ex.add_argument("--shards", nargs="*", help="the training shards, where run.json's data path no longer holds them")
    ex.add_argument("--template", type=Path, help="a card template instead of model_cards/encoder.md")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    pu = commands.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    pu.add_argument("folder", type=Path)
    pu.add_argument("--repo", required=True, help="org/name")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--revision", help="branch to upload to (created if missing)")
    pu.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    if args.command == "export":
        out = export(args.ckpt, args.out, args.results, args.name, args.license, args.shards, args.template,
                     args.overwrite)
        for file in exported_files(out):
            print(out / file)
        return 0
    files = push(args.folder, args.repo, args.private, args.revision, args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    where = f"{args.repo}" + (f" (revision {args.revision})" if args.revision else "")
    for file in files:
        print(f"{verb} {file} ({(args.folder / file).stat().st_size} bytes) to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
