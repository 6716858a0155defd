"""Upload an exported folder to the Hugging Face Hub, exactly its files. The token comes from
``HF_TOKEN`` or ``hf auth login``; it is passed to huggingface_hub and never printed or written.

What goes up is what ``files.json`` lists (:data:`ssl_path.publish.export.FILE_LIST`), after each
file's size and sha256 are checked against it: a folder with a file the export did not write (a
stray ``notes.txt``), without one it wrote, or with one changed since (a truncated
``model.safetensors``, an edited card) is refused, and nothing is uploaded. Hidden files are never
uploaded and not checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, ModelCard

import ssl_path
from ssl_path.core.errors import UserError, first_line
from ssl_path.encoder.identity import file_digest
from ssl_path.publish.export import CARD, EXPORTED, FILE_LIST, FILE_LIST_FORMAT, check_repo_id

_EXPORT_AGAIN = "export it again with python -m ssl_path.hub export"


def exported_files(folder: str | Path) -> list[str]:
    """The files of an exported folder, relative to it, checked against its ``files.json``.

    A folder that is not an export, or no longer holds exactly what the export wrote, is refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (export one with python -m ssl_path.hub export)")
    listed = _file_list(folder)
    missing = [f for f in EXPORTED if f not in listed]
    if missing:
        raise UserError(f"{folder} is not an exported encoder: {FILE_LIST} lacks {', '.join(missing)}")
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not _hidden(p, folder) and p.relative_to(folder).as_posix() != FILE_LIST
    }
    stray = sorted(present - listed.keys())
    if stray:
        raise UserError(
            f"{folder} holds files the export did not write: {', '.join(stray)}; remove them or {_EXPORT_AGAIN}"
        )
    gone = sorted(listed.keys() - present)
    if gone:
        raise UserError(f"{folder} lacks {', '.join(gone)}, which the export wrote; {_EXPORT_AGAIN}")
    for name, (size, sha256) in sorted(listed.items()):
        path = folder / name
        actual = path.stat().st_size
        if actual != size:
            raise UserError(
                f"{path} has {actual} bytes, not the {size} the export wrote (truncated or changed); {_EXPORT_AGAIN}"
            )
        if file_digest(path) != sha256:
            raise UserError(f"{path} changed since the export (its sha256 differs); {_EXPORT_AGAIN}")
    return sorted(listed)


def cache_export(folder: str | Path, cache: str | Path, repo_id: str) -> Path:
    """Lay an exported folder out in a Hugging Face cache as a download of ``repo_id`` would leave it
    (a snapshot of its files and ``refs/main``), so that ``timm.create_model("hf-hub:REPO_ID")`` with
    ``HF_HUB_CACHE=cache`` and ``HF_HUB_OFFLINE=1`` loads it before, or without, any push. Returns ``cache``."""
    folder, cache = Path(folder), Path(cache)
    commit = "0" * 39 + "1"  # a local snapshot: no real commit of the Hub has this id
    check_repo_id(repo_id, "repo id")
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.rmtree(repo, ignore_errors=True)
    for name in exported_files(folder):
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, target)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def _file_list(folder: Path) -> dict[str, tuple[int, str]]:
    """``files.json`` of ``folder``: name -> (size, sha256)."""
    path = folder / FILE_LIST
    if not path.is_file():
        raise UserError(f"{folder} is not an exported encoder: it lacks {FILE_LIST}; {_EXPORT_AGAIN}")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FILE_LIST_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        listed = {str(f["name"]): (int(f["size"]), str(f["sha256"])) for f in record["files"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not an ssl-path file list ({first_line(err)}); {_EXPORT_AGAIN}") from None
    for name in listed:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or any(part.startswith(".") for part in parts):
            raise UserError(f"{path} names {name!r}, which is not a file of the export; {_EXPORT_AGAIN}")
    return listed


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def push(
    folder: str | Path, repo: str, private: bool = False, revision: str | None = None, dry_run: bool = False
) -> list[str]:
    """Upload the exported ``folder`` to the model repo ``repo``; returns the files (uploaded, or that would be)."""
    folder = Path(folder)
    check_repo_id(repo, "--repo")
    files = exported_files(folder)
    card_name = ModelCard.load(folder / CARD).data.model_name
    if card_name != repo:
        raise UserError(
            f"{folder / CARD} describes {card_name!r}, not {repo!r}; "
            f"export again with --name {repo} so that the card's loading code names this repo"
        )
    if dry_run:
        return files
    if huggingface_hub.get_token() is None:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(library_name="ssl-path", library_version=ssl_path.__version__)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=revision,
            allow_patterns=files,
            commit_message=f"Upload encoder exported by ssl-path {ssl_path.__version__}",
        )
    except Exception as err:  # HTTP, connection and offline-mode errors all mean the same to a user
        raise UserError(f"push to {repo} failed: {first_line(err)}") from None
    return files
