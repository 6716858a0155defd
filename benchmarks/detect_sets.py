"""Quality and speed of the detection head on real sets: BCCD blood cells (boxes) and MoNuSeg nuclei
(instance masks, Mask R-CNN), each by the shipped command, then whole-image inference speed.

    .venv/bin/python benchmarks/detect_sets.py --ckpt REF --set bccd|monuseg [--out DIR] [--head H]
        [--mode frozen|full] [key=value ...]

``bccd``: ``python -m finetune.detect --train voc:DATA/bccd --config detect_bccd`` on the official split
(205 train, 87 validation, 72 test); the goal (issue 15): WBC AP@0.5 >= 0.80 within 15 minutes on a
CPU. ``monuseg``: ``--train monuseg:DATA/monuseg_kumar_norm?split=kumar --config detect_monuseg``, mask
AP, AJI and object F1 next to the segmentation head's. Then the trained run predicts every test image
whole (sliding windows, merged) and the script reports images/s, the first image not timed.

Prints the per-class table and writes ``DIR/detect_<set>.json`` (the run itself in ``DIR/<set>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune import detect, stage  # noqa: E402
from ssl_path.data.readers import read_spec  # noqa: E402
from ssl_path.evaluation.results import read_results  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SETS = {
    "bccd": {"train": f"voc:{DATA / 'bccd'}", "config": "detect_bccd", "test": "test"},
    "monuseg": {
        "train": f"monuseg:{DATA / 'monuseg_kumar_norm'}?split=kumar",
        "config": "detect_monuseg",
        "test": None,
    },
}
BUDGET_S = 15 * 60
COLUMNS = ("ap_50", "ap", "mask_ap_50", "mask_ap", "precision", "recall", "f1", "n_truth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="encoder ref (the tiny DINOv2 run of pretrain_knn.py)")
    parser.add_argument("--set", choices=SETS, default="bccd")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--head", help="detector (default: the config's)")
    parser.add_argument("--mode", default="frozen")
    parser.add_argument("--images", type=int, default=20, help="test images timed for inference speed")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    preset = SETS[args.set]
    run = args.out / args.set
    argv = ["--ckpt", args.ckpt, "--train", preset["train"], "--config", preset["config"], "--out", str(run),
            "--mode", args.mode, *(["--head", args.head] if args.head else []), *args.overrides]  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    if (run / stage.RESULTS).is_file():  # trained already: re-measure its inference only
        wall = json.loads((args.out / f"detect_{args.set}.json").read_text())["wall_s"]
    else:
        code = detect.main(argv)
        if code:
            return code
        wall = time.perf_counter() - start
    results = read_results(run / stage.RESULTS)

    cfg, task, _ = stage.load_trained(detect.HEAD, run)
    records = read_spec(preset["train"]).records
    test = [r for r in records if r.split == (preset["test"] or r.split) and r.split != "train"][: args.images]
    times = []
    for record in test:
        image = detect.read_scaled(record.path, cfg.head.scale)
        t0 = time.perf_counter()
        detect.detect_image(task, image, cfg.head, masks=cfg.head.head == "maskrcnn")
        times.append(time.perf_counter() - t0)
    per_image = sum(times[1:]) / max(len(times) - 1, 1)
    size = detect.read_scaled(test[0].path, 1.0).shape[-2:]

    rows = results["metrics"]
    print(f"{args.set}: {cfg.head.head}, {cfg.encoder.mode} encoder, wall {wall:.0f} s "
          f"(budget {BUDGET_S} s), inference {1 / per_image:.2f} img/s on {size[1]}x{size[0]} images")  # fmt: skip
    print(f"{'row':<34}" + "".join(f"{c:>11}" for c in COLUMNS))
    for key, row in rows.items():
        cells = [row.get(c, row.get(c.replace("ap", "map", 1))) for c in COLUMNS]  # "all" has map_50, a class ap_50
        print(f"{key:<34}" + "".join(f"{v:>11.4f}" if isinstance(v, float) else f"{v if v is not None else '-':>11}"
                                     for v in cells))  # fmt: skip
    record = {
        "set": args.set,
        "command": "python -m finetune.detect " + " ".join(argv),
        "head": cfg.head.head,
        "mode": cfg.encoder.mode,
        "wall_s": round(wall, 1),
        "budget_s": BUDGET_S,
        "inference_img_per_s": round(1 / per_image, 3),
        "inference_image_size": [int(size[1]), int(size[0])],
        "rows": rows,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    if args.set == "bccd":
        wbc = rows.get("class/WBC", {}).get("ap_50")
        record["goal"] = {"wbc_ap_50": wbc, "met": wbc is not None and wbc >= 0.80 and wall <= BUDGET_S}
        print(f"goal WBC AP@0.5 >= 0.80 within {BUDGET_S} s: {'met' if record['goal']['met'] else 'missed'} "
              f"({wbc if wbc is None else round(wbc, 4)}, {wall:.0f} s)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"detect_{args.set}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out / f'detect_{args.set}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
