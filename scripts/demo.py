"""The whole pipeline in one command: raw images to a published, evaluated encoder.

With no argument it runs on the project's own sample (``data/sample``: AMi-Br mitotic-figure
patches, BCCD smears, an Aperio slide) in about 10 minutes on 2 cores; ``--quick`` in about a
minute, for a first look. Each stage is the documented command, run in this process, one line each:

 1. split     the labelled set into train / test in whole slides (``--test-fraction``), as CSVs
 2. tile      the train images and the slides into WebDataset shards (test images never seen)
 3. pretrain  ``dinov2_tiny_cpu`` on the shards, bounded in steps
 4. probe     kNN, linear and few-label probes, each against the same architecture at random init
              with paired bootstrap CIs (``--compare``); a UMAP map of the test set
 5. finetune  a classification head on the labelled set; a detection head on the detection set
 6. export    for timm with a model card, then reload through ``timm.create_model("hf-hub:...")``
              from a local Hugging Face cache, as a user of the Hub would
 7. summary   pretrained vs random init, and the path of every artefact

    make demo                      # or: .venv/bin/python scripts/demo.py
    make demo QUICK=1              # about a minute
    make demo DATA="folder:my/classes" DETECT="coco:my/boxes.json" SLIDES="my/slides" OUT=my_run

``--data`` is a labelled set (any SPEC the readers take; its images are also pretraining tiles),
``--detect`` a set with boxes (omit it, with your own ``--data``, to skip detection), ``--slides``
more unlabelled images or whole slides to pretrain on. Writes everything under ``--out``
(default ``demo_out``), ``summary.json`` last; a rerun replaces the previous run there, and a
folder holding anything else is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune import classify, detect  # noqa: E402
from probes import embed, fewshot, knn, linear  # noqa: E402
from probes.common import ci_cell  # noqa: E402
from ssl_path import hub, pretrain, shards  # noqa: E402
from ssl_path.core.errors import UserError, run_cli  # noqa: E402
from ssl_path.data.readers import read_spec  # noqa: E402
from ssl_path.evaluation.splits import group_split  # noqa: E402
from ssl_path.publish.push import cache_export  # noqa: E402

SAMPLE = REPO / "data" / "sample"
REPO_ID = "ssl-path-demo/dinov2-tiny-sample"
MARKER = ".ssl_path_demo"
SIZES = {
    # pretraining steps, probe bootstrap redraws, few-label seeds, the heads' config overrides
    "full": {"pretrain_steps": None, "bootstrap": 1000, "seeds": 3, "classify": ["train.epochs=30"], "detect": []},
    "quick": {
        "pretrain_steps": 12,
        "bootstrap": 200,
        "seeds": 2,
        "classify": ["train.epochs=1"],
        "detect": ["train.epochs=1"],
    },
}


def stage(number: int, name: str, what: str, fn: Callable[[], Any]) -> Any:
    print(f"== {number}/7 {name}: {what}", flush=True)
    start = time.perf_counter()
    result = fn()
    print(f"   {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def call(main: Callable[[Sequence[str] | None], int | None], *argv: str) -> None:
    """A stage's ``main`` in this process; its one-line error stops the pipeline."""
    code = run_cli(main, [str(a) for a in argv])
    if code != 0:
        raise SystemExit(code)


def split(spec: str, out: Path, test_fraction: float, seed: int) -> tuple[str, str, list[str]]:
    """Train / test CSVs of ``spec`` in whole groups, and the train images (the pretraining tiles)."""
    data = read_spec(spec)
    if len({r.label for r in data.records if r.label is not None}) < 2:
        raise UserError(f"--data {spec}: fewer than 2 image labels; the demo needs a classification set")
    groups = [r.group if r.group is not None else r.path for r in data.records]
    train_idx, test_idx = group_split(data.targets(), groups, test_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, idx in (("train", train_idx), ("test", test_idx)):
        paths[name] = out / f"{name}.csv"
        with paths[name].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "group", "domain"])
            for i in idx:
                r = data.records[i]
                writer.writerow([os.path.abspath(r.path), r.label, r.group or "", r.domain or ""])
    print(
        f"   {len(train_idx)} train / {len(test_idx)} test images, {len(set(groups))} groups, classes {', '.join(data.classes)}"
    )
    return f"csv:{paths['train']}", f"csv:{paths['test']}", [data.records[i].path for i in train_idx]


def check_inputs(detect_spec: str | None, slides: Sequence[str]) -> None:
    """Refuse, in one line, a detection set without boxes or a slide path that is not there."""
    missing = [p for p in slides if not Path(p).expanduser().exists()]
    if missing:
        raise UserError(f"--slides {missing[0]}: no such file or folder")
    if detect_spec and not any(r.boxes or r.points for r in read_spec(detect_spec).records):
        raise UserError(f"--detect {detect_spec}: no boxes or points; the demo's detection head needs them")


RELOAD = """
import sys, timm, torch
from ssl_path import encoder
model = timm.create_model("hf-hub:" + sys.argv[1], pretrained=True).eval()
ours, info = encoder.load(sys.argv[2])
x = torch.rand(2, *info.input_size)
with torch.inference_mode():
    diff = (model(x) - ours.eval()(x)).abs().max().item()
print(f"{type(model).__name__} {model.num_features} {diff:.2e}")
"""


def reload_from_hub(export: Path, cache: Path) -> dict[str, Any]:
    """timm.create_model("hf-hub:...") in a fresh, offline process, against the export loaded directly."""
    cache_export(export, cache, REPO_ID)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, REPO_ID, str(export)], env=env, capture_output=True, text=True, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(
            f"error: timm could not load hf-hub:{REPO_ID} from {cache}: {done.stderr.strip().splitlines()[-1]}"
        )
    name, features, diff = done.stdout.split()
    print(f'   timm.create_model("hf-hub:{REPO_ID}", pretrained=True): {name}, {features} features, max |diff| {diff}')
    return {"repo_id": REPO_ID, "model": name, "num_features": int(features), "max_abs_diff": float(diff)}


def _metrics(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text())["metrics"]


def summary_rows(out: Path) -> list[dict[str, Any]]:
    """One row per probe setting: balanced accuracy of the pretrained encoder and of random init, and
    the paired differences of balanced accuracy and AUROC (the same test redraws and, few-label, the
    same subsets)."""
    results = (
        ("knn", out / "knn.json"),
        ("linear", out / "linear.json"),
        ("few-label", out / "fewshot" / "fewshot.json"),
    )
    return [
        {
            "probe": probe,
            "setting": setting,
            "pretrained": m["balanced_accuracy"],
            "random_init": m["reference"]["balanced_accuracy"],
            "diff": m["balanced_accuracy_diff"],
            "diff_ci95": m["balanced_accuracy_diff_ci95"],
            "auroc_diff": m["auroc_diff"],
            "auroc_diff_ci95": m["auroc_diff_ci95"],
        }
        for probe, path in results
        for setting, m in _metrics(path).items()
    ]


def head_rows(out: Path, detected: bool) -> list[str]:
    """One line per fine-tuned head with its test figures."""
    m = next(iter(_metrics(out / "classify" / "results.json").values()))
    lines = [
        f"classification head (frozen encoder): balanced accuracy {m['balanced_accuracy']:.3f}, AUROC {m['auroc']:.3f}"
    ]
    if detected:
        d = _metrics(out / "detect" / "results.json")
        per_class = ", ".join(
            f"{k.removeprefix('class/')} {v['ap_50']:.3f}" for k, v in d.items() if k.startswith("class/")
        )
        lines.append(
            f"detection head: mAP@0.5 {d['all']['map_50']:.3f} (AP@0.5: {per_class}), point F1 {d['all']['f1']:.3f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=f"amibr:{SAMPLE / 'amibr'}", help="the labelled set (a SPEC)")
    p.add_argument("--detect", default=None, help="a set with boxes (default: the sample's BCCD smears)")
    p.add_argument("--slides", nargs="*", default=None, help="more images or slides to pretrain on")
    p.add_argument("--out", type=Path, default=REPO / "demo_out")
    p.add_argument("--quick", action="store_true", help="a first look in about a minute")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sample = args.data == p.get_default("data")
    detect_spec = args.detect or (f"voc:{SAMPLE / 'bccd'}" if sample else None)
    slides = args.slides if args.slides is not None else ([str(SAMPLE / "slide")] if sample else [])
    sizes = SIZES["quick" if args.quick else "full"]
    out = args.out
    # A rerun replaces what the demo wrote; a folder it did not write is never touched.
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        print(f"error: --out {out} holds files the demo did not write; choose another folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # a summary is there only once every stage of this run is
    (out / MARKER).write_text("written by scripts/demo.py; a rerun replaces this folder's contents\n")
    start = time.perf_counter()
    try:
        check_inputs(detect_spec, slides)  # before minutes of work, not at the stage that reads them
        train, test, train_images = stage(
            1,
            "split",
            f"{args.data} in whole groups (slides or patients)",
            lambda: split(args.data, out / "split", args.test_fraction, args.seed),
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def tile() -> None:
        call(
            shards.main,
            "--data",
            *train_images,
            *slides,
            "--out",
            out / "shards",
            "--tile-size",
            128,
            "--samples-per-shard",
            200,
            "--workers",
            2,
            "--overwrite",
        )

    stage(2, "tile", f"{len(train_images)} train images and {len(slides)} slide folders into shards", tile)

    run_dir = out / "run"

    def pretrain_encoder() -> Path:
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = ["--max-steps", sizes["pretrain_steps"]] if sizes["pretrain_steps"] else []
        call(pretrain.main, "--config", "dinov2_tiny_cpu", "--data", out / "shards", "--out", run_dir, *steps)
        return pretrain.random_init_checkpoint(run_dir, out / "random_init.pt")

    random_init = stage(3, "pretrain", "dinov2_tiny_cpu on the shards", pretrain_encoder)

    def probe() -> None:
        sets = ["--train", train, "--test", test, "--no-progress", "--cache-dir", out / "cache"]
        paired = [*sets, "--compare", random_init, "--bootstrap", sizes["bootstrap"], "--overwrite"]
        call(knn.main, "--ckpt", run_dir, *paired, "--out", out / "knn.json")
        call(linear.main, "--ckpt", run_dir, *paired, "--out", out / "linear.json")
        labels = ["--fractions", 0.1, 1.0, "--shots", 8, "--probes", "knn", "linear", "--seeds", sizes["seeds"]]
        call(fewshot.main, "--ckpt", run_dir, *paired, *labels, "--out", out / "fewshot" / "fewshot.json")
        umap = ["--data", test, "--methods", "umap", "--out", out / "umap", "--overwrite"]
        call(embed.main, "--ckpt", run_dir, *umap, "--no-progress", "--cache-dir", out / "cache")

    stage(4, "probe", "kNN, linear, few-label against random init; UMAP", probe)

    def finetune() -> None:
        # Run dirs, like the pretraining run: a command never replaces one, so the demo removes its own.
        for head_dir in ("classify", "detect"):
            shutil.rmtree(out / head_dir, ignore_errors=True)
        heads = ["--ckpt", run_dir, "--no-progress"]
        classify_args = ["--train", train, "--test", test, "--mode", "frozen", "--out", out / "classify"]
        call(classify.main, *heads, *classify_args, *sizes["classify"])
        if detect_spec:
            detect_args = ["--train", detect_spec, "--config", "detect_bccd", "--out", out / "detect"]
            call(detect.main, *heads, *detect_args, *sizes["detect"])

    stage(
        5, "finetune", "classification head" + (f", detection head on {detect_spec}" if detect_spec else ""), finetune
    )

    def publish() -> dict[str, Any]:
        results = [out / "knn.json", out / "linear.json"]
        call(
            hub.main,
            "export",
            "--ckpt",
            run_dir,
            "--out",
            out / "export",
            "--name",
            REPO_ID,
            "--results",
            *results,
            "--overwrite",
        )
        return reload_from_hub(out / "export", out / "hf_cache")

    reloaded = stage(6, "export", f"for timm as {REPO_ID}, reloaded from a local hub cache", publish)

    rows = summary_rows(out)
    artefacts = {
        "run": run_dir,
        "loss curves": run_dir / "loss.png",
        "kNN results": out / "knn.json",
        "linear results": out / "linear.json",
        "few-label results": out / "fewshot" / "fewshot.json",
        "few-label curves": out / "fewshot" / "fewshot_curves.png",
        "UMAP": out / "umap" / "umap.png",
        "classification head": out / "classify" / "results.json",
        **({"detection head": out / "detect" / "results.json"} if detect_spec else {}),
        "export": out / "export",
        "model card": out / "export" / "README.md",
    }
    print(f"== 7/7 summary ({time.perf_counter() - start:.0f} s in all)")
    print(
        "balanced accuracy on the held-out slides; paired differences on the same test redraws "
        "(few-label: the same subsets too, the seeds' spread added); * the 95 % CI excludes 0"
    )
    print(
        f"{'probe':<10}{'setting':<22}{'pretrained':>11}{'random init':>12}{'d bal. acc [95% CI]':>28}{'d AUROC [95% CI]':>28}"
    )
    for r in rows:
        print(
            f"{r['probe']:<10}{r['setting']:<22}{ci_cell(r['pretrained'], None):>11}{ci_cell(r['random_init'], None):>12}"
            f"{ci_cell(r['diff'], r['diff_ci95'], signed=True):>28}{ci_cell(r['auroc_diff'], r['auroc_diff_ci95'], signed=True):>28}"
        )
    heads = head_rows(out, detect_spec is not None)
    print("\n".join(heads))
    for name, path in artefacts.items():
        print(f"{name:<24}{path}")
    summary = {
        "data": args.data,
        "detect": detect_spec,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - start, 1),
        "balanced_accuracy": rows,
        "heads": heads,
        "hub_reload": reloaded,
        "artefacts": {k: str(v) for k, v in artefacts.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'summary':<24}{out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
