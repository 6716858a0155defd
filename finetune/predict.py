"""``python -m finetune.predict``: a trained head's predictions for a folder of images of any size.

    python -m finetune.predict --run RUN_DIR --data IMAGES --out DIR [--device cpu] [--no-progress]

A segmentation run writes ``DIR/<image stem>.png``, a mask in the label values of its training set
(sliding windows over images of any size, the post-processing chosen on validation); a classifier
writes ``DIR/predictions.csv`` (path, predicted class, probability of each class); a detector writes
``DIR/coco_results.json`` (COCO's results list, every detection), ``DIR/coco_images.json`` (the images
and categories its ids name) and ``DIR/points.csv`` (box centres at the threshold chosen on validation),
all in the images' own pixels. An image that cannot be read is named on stderr (or in the CSV) and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from finetune import classify, detect, segment, stage
from ssl_path.core.cli import add_device, add_out, add_overwrite, add_progress, make_parser, resolve_device
from ssl_path.core.config import read_yaml
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import atomic_dir
from ssl_path.data.readers import list_images
from ssl_path.training.run_dir import CONFIG_FILE

HEADS = {head.name: head for head in (segment.HEAD, classify.HEAD, detect.HEAD)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m finetune.predict", "Predict masks, classes or objects with a trained head.")
    parser.add_argument(
        "--run", type=Path, required=True, help="a finished run of finetune.segment, classify or detect"
    )
    parser.add_argument("--data", type=Path, required=True, help="a folder of images (or one image)")
    add_out(parser, help="output folder")
    add_overwrite(parser)
    add_device(parser, default="cpu")
    add_progress(parser)
    args = parser.parse_args(argv)
    config = args.run / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"--run {args.run} is not a fine-tuning run directory (no {CONFIG_FILE})")
    name = read_yaml(config).get("task")
    if name not in HEADS:
        raise UserError(f"--run {args.run}: task {name!r} is not one of {', '.join(HEADS)}")
    if args.data.is_dir():
        paths = list_images(args.data)
    elif args.data.is_file():
        paths = [args.data]
    else:
        raise UserError(f"--data {args.data} does not exist")
    if not paths:
        inside = args.data.is_dir() and any(p.is_dir() and list_images(p) for p in args.data.iterdir())
        where = "; its images lie in subfolders: give each, or a folder of images" if inside else ""
        raise UserError(f"--data {args.data}: no images{where}")
    stems = [p.stem for p in paths]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise UserError(f"--data {args.data}: several images are named {twins[0]}.*; their masks would share a name")
    device = resolve_device(args.device)
    cfg, task, selection = stage.load_trained(HEADS[name], args.run)
    task.to(device)
    with (
        atomic_dir(args.out, args.overwrite, inputs=[args.run, args.data]) as tmp,
        tqdm(total=len(paths), desc="predict", unit="img", disable=args.no_progress, dynamic_ncols=True) as bar,
    ):
        written = HEADS[name].predict(cfg.head, task, paths, selection, tmp, bar.update)
        if not written:
            raise UserError(f"--data {args.data}: none of the {len(paths)} images could be read")
    print(f"wrote {written} predictions of {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
