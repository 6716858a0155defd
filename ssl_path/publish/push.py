"""Upload an exported folder to the Hugging Face Hub, exactly its files. The token comes from
``HF_TOKEN`` or ``hf auth login``; it is passed to huggingface_hub and never printed or written.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, ModelCard

import ssl_path
from ssl_path.core.errors import UserError, first_line
from ssl_path.publish.export import CARD, EXPORTED, check_repo_id


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
