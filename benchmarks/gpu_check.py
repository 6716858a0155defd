"""One prepared GPU check: every speed goal of the project measured in one command of under 8 minutes.

A GPU machine lent for measuring comes in a short window, bare (its own torch and timm; no
webdataset, faiss or lightly), with at most 64 MiB of files carried along. So the check is one
command that installs what it lacks from wheels carried with it, runs each part in a process of its
own under its own time budget (a part that runs out is killed and reported as skipped, with the rows
it had finished), and writes one JSON and one Markdown table named after the device.

Parts, in the order they run (``--budget PART=S`` changes one's budget; each also gets what the
parts before it left unused, so the compiling ones, last, can use the quick ones' spare time):

- ``device``      the device's name and its own measured bf16 matmul peak (the MFU denominator)
- ``data``        the data path alone, from shards to normalised crops on the device, through a
                  DataLoader with one worker per core: GPU-fed (JPEG decode and geometric crops in the
                  workers as uint8, pinned, non-blocking copy, the photometric part on the GPU with
                  per-sample parameters), CPU path (everything in the workers, float crops copied),
                  and lightly's DINOTransform (when its wheels came along)
- ``end_to_end``  loader -> device photometric -> DINOv2 ViT-S/16 step: img/s and the fraction of
                  the wall time spent waiting for data
- ``knn``         exact inner-product top-k of 20k queries in 200k x 768 features: a chunked fp32
                  torch search on the device beside faiss-cpu on the host (faiss-gpu wheels are too
                  large to carry; on clusters faiss-gpu stays the choice), with their agreement
- ``features``    feature extraction img/s through ``probes.features.extract_features`` (ViT-B/16)
- ``steps``       the full DINOv2 step (2 x 224 + 8 x 96 crops, iBOT masks, heads, losses, AdamW,
                  EMA) for ViT-S/16 and ViT-B/16, eager and compiled, each beside a plain timm
                  supervised step of the same backbone: img/s and MFU (``bench_pretrain.py``'s steps)
- ``mae``         the MAE step (ViT-B/16, 75 % masking), eager and compiled

Goals (issue 17): the data path >= 2,000 multi-crop samples/s on a 16-core host (lightly's
transform: 470 with 16 workers); DINOv2 ViT-S/16 >= 2,000 img/s and ViT-B/16 >= 50 % MFU on one
H100-class GPU (a plain timm DINO-style step without heads: 1,826 img/s, 41 % MFU compiled); data
wait under 5 % of the step.

    # here, once (needs ../shared/data and PyPI): tiles, shards and wheels into benchmarks/gpu_data
    .venv/bin/python benchmarks/gpu_check.py --prepare
    # on the GPU machine, with benchmarks/gpu_data carried along
    python3 benchmarks/gpu_check.py --out OUT
    # every part at tiny size on the CPU, in under a minute (the test suite runs this)
    .venv/bin/python benchmarks/gpu_check.py --smoke --out OUT

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCHMARKS))

DATA_DIR = BENCHMARKS / "gpu_data"
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))
# Import name -> the wheels that provide it (the first) and what it needs beyond the GPU machine's
# image. The first's version comes from pyproject.toml where the project depends on it: a machine's
# own timm older than that is replaced too.
WHEELS = {
    "webdataset": ["webdataset", "braceexpand"],
    "faiss": ["faiss-cpu"],
    "lightly": ["lightly", "lightning-utilities"],  # all that lightly.transforms needs
    "timm": ["timm"],
}
CARRY_LIMIT_MIB = 64  # what travels with a command to a lent GPU machine: working tree and carried folders
# Run in this order, each part under its budget plus what the parts before it left unused: the parts
# that compile (minutes of inductor code generation, which the CPU cannot tell in advance) go last,
# where the spare time of the quick ones lets them finish. The sum is the run's limit (8 minutes with
# the install).
BUDGETS_S = {"device": 25, "data": 55, "end_to_end": 35, "knn": 20, "features": 20, "steps": 250, "mae": 60}
GOALS = {
    "data_samples_per_s": 2000.0,
    "dinov2_vit_s16_img_per_s": 2000.0,
    "dinov2_vit_b16_mfu": 0.50,
    "data_wait_fraction": 0.05,
}


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the real sizes on a GPU, tiny ones for ``--smoke`` on the CPU."""

    steps: tuple[tuple[str, str], ...]  # (DINOv2 config, timm backbone)
    mae: tuple[str, str]
    batch: int
    timed_steps: int
    warmup_steps: int
    supervised_size: int
    loader_batch: int
    data_batches: int
    end_to_end_steps: int
    knn_train: int
    knn_queries: int
    knn_dim: int
    knn_chunk: int
    k: int
    feature_arch: str
    feature_images: int
    feature_batch: int
    compile_backend: str
    overrides: tuple[str, ...] = ()  # config overrides for every method built


GPU = Sizes(
    steps=(("dinov2_vits16", "vit_small_patch16_224"), ("dinov2_vitb16", "vit_base_patch16_224")),
    mae=("mae_vitb16", "vit_base_patch16_224"),
    batch=128,
    timed_steps=15,
    warmup_steps=5,
    supervised_size=224,
    loader_batch=128,
    data_batches=60,
    end_to_end_steps=40,
    knn_train=200_000,
    knn_queries=20_000,
    knn_dim=768,
    knn_chunk=4096,
    k=20,
    feature_arch="vit_base_patch16_224",
    feature_images=8192,
    feature_batch=256,
    compile_backend="inductor",
)
# Dynamo's eager backend in the smoke run: it proves the graphs capture without minutes of inductor
# code generation on the CPU.
SMOKE = Sizes(
    steps=(("dinov2_tiny_cpu", "vit_tiny_patch16_224"),),
    mae=("mae_tiny_cpu", "vit_tiny_patch16_224"),
    batch=2,
    timed_steps=1,
    warmup_steps=1,
    supervised_size=64,
    loader_batch=4,
    data_batches=3,
    end_to_end_steps=3,
    knn_train=2000,
    knn_queries=100,
    knn_dim=64,
    knn_chunk=32,
    k=5,
    feature_arch="vit_tiny_patch16_224",
    feature_images=16,
    feature_batch=8,
    compile_backend="eager",
    # Two blocks of width 64 on 64 px crops: each part in seconds.
    overrides=(
        "model.kwargs={img_size: 64, depth: 2, embed_dim: 64, num_heads: 2, reg_tokens: 0, init_values: null}",
        "dinov2.crops={n_global: 2, n_local: 2, global_size: 64, local_size: 32}",
        "dinov2.n_prototypes=256",
        "dinov2.head_hidden_dim=64",
        "dinov2.head_bottleneck_dim=32",
        "mae.view.size=64",
        "mae.decoder_dim=32",
        "mae.decoder_depth=1",
    ),
)


# ----------------------------------------------------------------------------- preparing the data


def prepare(data_dir: Path, shared: Path, n_tiles: int, wheels: bool) -> None:
    """256 px JPEG tiles of the MoNuSeg images, shards of them, and the wheels the GPU machine lacks."""
    from bench_augment import make_tiles

    from ssl_path.tiling import TilingParams, make_shards

    tiles_dir = data_dir / "tiles" / "monuseg"
    if not tiles_dir.is_dir():
        tiles = make_tiles(shared, n_tiles)
        if not tiles:
            raise SystemExit(f"error: no MoNuSeg images under {shared} to cut tiles from")
        tiles_dir.mkdir(parents=True)
        for i, data in enumerate(tiles):
            (tiles_dir / f"{i:05d}.jpg").write_bytes(data)
    if not (data_dir / "shards").is_dir():
        params = TilingParams(tile_size=256, min_tissue=0.0, samples_per_shard=max(8, n_tiles // 4))
        make_shards([str(tiles_dir)], data_dir / "shards", params, progress=False)
    if wheels:
        wanted = [requirement(w) for ws in WHEELS.values() for w in ws]
        # Into a new folder, swapped in whole: two versions of one wheel would stop the install there.
        fresh = Path(tempfile.mkdtemp(prefix="wheels.", dir=data_dir))
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(fresh)]
        for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"):
            cmd += ["--platform", tag]
        try:
            if subprocess.run(cmd + wanted).returncode == 0:
                shutil.rmtree(data_dir / "wheels", ignore_errors=True)
                fresh.rename(data_dir / "wheels")
            else:
                print("warning: pip could not download the wheels; the GPU machine must have them", file=sys.stderr)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)  # gone once renamed; else it would travel unused
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    print(f"prepared {data_dir} ({size / 2**20:.1f} MiB): carry it to the GPU machine with the working tree")
    files = ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(files, capture_output=True)
    if listed.returncode == 0:
        tree = sum((REPO / f).stat().st_size for f in listed.stdout.decode().split("\0") if (REPO / f).is_file())
        total = (tree + size) / 2**20
        print(
            f"with the working tree ({tree / 2**20:.1f} MiB) a run carries {total:.1f} MiB of the {CARRY_LIMIT_MIB} allowed"
        )
        if total > CARRY_LIMIT_MIB:
            print(f"warning: over the {CARRY_LIMIT_MIB} MiB a GPU run can carry; prepare fewer tiles", file=sys.stderr)


def requirement(dist: str) -> str:
    """``dist`` with the version pyproject.toml asks for (``timm>=1.0.20``), or alone where it names none."""
    import tomllib
    from packaging.requirements import Requirement

    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        if Requirement(line).name == dist:
            return line
    return dist


def needs_wheel(name: str) -> bool:
    """Whether import ``name`` is missing here, or installed at a version pyproject.toml does not allow."""
    from packaging.requirements import Requirement

    if importlib.util.find_spec(name) is None:
        return True
    wanted = Requirement(requirement(WHEELS[name][0]))
    try:
        return not wanted.specifier.contains(importlib.metadata.version(wanted.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:  # importable from a folder on the path, not installed
        return False


def install_missing(wheels: Path) -> list[str]:
    """Install what is missing or too old from the carried wheels into a temporary folder on sys.path."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    missing = [name for name in WHEELS if needs_wheel(name)]
    dists = {canonicalize_name(dist) for name in missing for dist in WHEELS[name]}
    carried = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    files = [f for f in carried if parse_wheel_filename(f.name)[0] in dists]
    if not files:
        return []
    target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run(cmd + ["--target", str(target), *map(str, files)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    return [name for name in missing if not needs_wheel(name)]


# ----------------------------------------------------------------------------- the parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_device(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    from bench_pretrain import measured_peak

    device = ctx["device"]
    peak, dtype = measured_peak(device)
    if device.type == "cuda":
        name, cap = torch.cuda.get_device_name(device), ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)", None
    # Loader workers hand batches over in /dev/shm (a GPU-fed batch is ~67 MB, a float one ~270 MB):
    # a container's small default there would break the loader parts with a bus error.
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else None
    record(
        {
            "name": name,
            "capability": cap,
            "peak_flops": peak,
            "peak_dtype": dtype,
            "cpus": os.cpu_count(),
            "shm_gib": None if shm is None else round(shm, 1),
        }
    )


def _time_steps(ctx: dict[str, Any], kinds: list[tuple[str, str, str]], record: Callable[[dict], None]) -> None:
    from bench_pretrain import measure, method_step_fn, step_row, supervised_step_fn

    sizes, device = ctx["sizes"], ctx["device"]
    bf16 = device.type == "cuda"
    for kind, config, arch in kinds:
        for mode in ("eager", "compiled"):
            compile_backend = sizes.compile_backend if mode == "compiled" else None
            if kind == "supervised":
                step = supervised_step_fn(arch, sizes.batch, device, compile_backend, bf16, size=sizes.supervised_size)
            else:
                step = method_step_fn(
                    kind,
                    arch,
                    sizes.batch,
                    device,
                    compile_backend,
                    bf16,
                    config=config,
                    overrides=_overrides(sizes, kind),
                )
            seconds, flops = measure(step, device, sizes.timed_steps, sizes.warmup_steps)
            record(step_row(kind, arch, mode, sizes.batch, seconds, flops, ctx.get("peak_flops")))
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _overrides(sizes: Sizes, method: str) -> list[str]:
    """The sizes' overrides that concern ``method`` (model ones concern all)."""
    return [o for o in sizes.overrides if o.startswith(("model.", f"{method}."))]


def part_steps(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    # The DINOv2 rows first, which the goals are about, then the supervised ones to compare with.
    steps = ctx["sizes"].steps
    kinds = [("dinov2", config, arch) for config, arch in steps] + [("supervised", c, a) for c, a in steps]
    _time_steps(ctx, kinds, record)


def part_mae(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    config, arch = ctx["sizes"].mae
    _time_steps(ctx, [("mae", config, arch)], record)


def _dinov2(sizes: Sizes, photometric: str, device: torch.device):
    from ssl_path.methods import methods
    from ssl_path.pretrain import resolve_config

    config, arch = sizes.steps[0]
    overrides = [f"model.arch={arch}", f"dinov2.photometric={photometric}", *_overrides(sizes, "dinov2")]
    cfg = resolve_config(config, overrides)
    return cfg, methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, 0, device).to(device)


def _lightly_transform(crops) -> Callable[[dict], dict] | str:
    """lightly's DINOTransform on our decoded samples, or why it cannot run."""
    try:
        from lightly.transforms.dino_transform import DINOTransform
    except ImportError as err:
        return f"lightly not importable ({err.name or err}); bring its wheels (benchmarks/README.md)"
    from PIL import Image

    lightly = DINOTransform(
        global_crop_size=crops.global_size,
        local_crop_size=crops.local_size,
        n_local_views=crops.n_local,
        global_crop_scale=crops.global_scale,
        local_crop_scale=crops.local_scale,
    )

    def transform(sample: dict) -> dict:
        views = lightly(Image.fromarray(sample["image"].permute(1, 2, 0).numpy()))
        return {
            "global_crops": torch.stack(views[: crops.n_global]),
            "local_crops": torch.stack(views[crops.n_global :]),
        }

    return transform


def _loader(ctx: dict[str, Any], transform, collate_fn):
    from ssl_path.data.loader import shard_loader

    return shard_loader(
        str(ctx["data_dir"] / "shards"),
        "train",
        ctx["sizes"].loader_batch,
        transform=transform,
        collate_fn=collate_fn,
        num_workers=ctx["workers"],
        pin_memory=ctx["device"].type == "cuda",
        shuffle_buffer=200,
    )


def part_data(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    from ssl_path.data.transforms import collate_multicrop
    from ssl_path.training.loop import to_device

    sizes, device = ctx["sizes"], ctx["device"]
    _, on_device = _dinov2(sizes, "device", device)
    _, in_workers = _dinov2(sizes, "workers", device)
    lightly = _lightly_transform(on_device.cfg.crops)

    def gpu_fed(batch: dict) -> None:
        on_device.photometric(to_device(batch, device))

    def copied(batch: dict) -> None:
        to_device(batch, device)

    paths = [
        (
            "GPU-fed: uint8 crops in workers, photometric on the device",
            on_device.data_transform(),
            on_device.collate_fn(),
            gpu_fed,
        ),
        ("CPU path: the whole augmentation in workers", in_workers.data_transform(), in_workers.collate_fn(), copied),
        ("lightly DINOTransform in workers", lightly, collate_multicrop, copied),
    ]
    for name, transform, collate_fn, consume in paths:
        if isinstance(transform, str):
            record({"path": name, "skipped": transform})
            continue
        it = iter(_loader(ctx, transform, collate_fn))
        consume(next(it))  # worker start-up and the first prefetch are not the steady rate
        _sync(device)
        start, samples = time.perf_counter(), 0
        for _ in range(sizes.data_batches):
            batch = next(it)
            consume(batch)
            samples += batch["collated_global_crops"].shape[0] // batch["n_global_crops"]
        _sync(device)
        seconds = time.perf_counter() - start
        record({"path": name, "workers": ctx["workers"], "samples_per_s": round(samples / seconds, 1)})
        del it


def part_end_to_end(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    from ssl_path.training.loop import to_device

    sizes, device = ctx["sizes"], ctx["device"]
    cfg, method = _dinov2(sizes, "device", device)
    method.train()
    optimizer = torch.optim.AdamW(method.param_groups(cfg.optim), lr=1e-4, fused=device.type == "cuda")
    it = iter(_loader(ctx, method.data_transform(), method.collate_fn()))

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method(to_device(batch, device))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step()
        loss.item()  # what the loop's logging waits for

    for i in range(2):  # start-up: workers, cuBLAS handles, the allocator
        method.set_step(i)
        step(next(it))
    _sync(device)
    start, waited = time.perf_counter(), 0.0
    for i in range(sizes.end_to_end_steps):
        method.set_step(2 + i)
        t0 = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t0
        step(batch)
    _sync(device)
    seconds = time.perf_counter() - start
    record(
        {
            "arch": sizes.steps[0][1],
            "mode": "eager",
            "workers": ctx["workers"],
            "batch_size": sizes.loader_batch,
            "img_per_s": round(sizes.end_to_end_steps * sizes.loader_batch / seconds, 1),
            "data_wait_fraction": round(waited / seconds, 4),
        }
    )


def chunked_search(train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of ``queries`` in ``train`` a chunk of queries at a time (fp32)."""
    sims, idx = [], []
    for part in queries.split(chunk):
        top = torch.topk(part @ train.T, k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def part_knn(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    sizes, device = ctx["sizes"], ctx["device"]
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32, as faiss's flat index
    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(sizes.knn_train, sizes.knn_dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(sizes.knn_queries, sizes.knn_dim, generator=gen), dim=1)
    shape = {"train": sizes.knn_train, "queries": sizes.knn_queries, "dim": sizes.knn_dim, "k": sizes.k}
    train_d, queries_d = train.to(device), queries.to(device)
    chunked_search(train_d, queries_d[: sizes.knn_chunk], sizes.k, sizes.knn_chunk)  # warm-up
    _sync(device)
    start = time.perf_counter()
    _, torch_idx = chunked_search(train_d, queries_d, sizes.k, sizes.knn_chunk)
    _sync(device)
    seconds = time.perf_counter() - start
    record(
        {
            "search": f"torch chunked fp32 on {device.type}",
            **shape,
            "queries_per_s": round(sizes.knn_queries / seconds, 1),
        }
    )
    try:
        import faiss
    except ImportError:
        record({"search": "faiss-cpu flat", **shape, "skipped": "faiss not importable; bring faiss-cpu's wheel"})
        return
    index = faiss.IndexFlatIP(sizes.knn_dim)
    index.add(train.numpy())
    start = time.perf_counter()
    _, faiss_idx = index.search(queries.numpy(), sizes.k)
    seconds = time.perf_counter() - start
    torch_sets = torch_idx.cpu().numpy()
    agreement = sum(len(set(a) & set(b)) for a, b in zip(torch_sets, faiss_idx)) / faiss_idx.size
    record(
        {
            "search": f"faiss-cpu flat, {faiss.omp_get_max_threads()} threads",
            **shape,
            "queries_per_s": round(sizes.knn_queries / seconds, 1),
            "top_k_agreement_with_torch": round(agreement, 5),
        }
    )


def part_features(ctx: dict[str, Any], record: Callable[[dict], None]) -> None:
    from probes.features import extract_features
    from ssl_path.data.readers import read_folder

    sizes, device = ctx["sizes"], ctx["device"]
    tiles = read_folder(ctx["data_dir"] / "tiles")
    data = tiles.select([i % len(tiles) for i in range(sizes.feature_images)])
    ref = f"timm:{sizes.feature_arch}"
    extract = dict(batch_size=sizes.feature_batch, num_workers=ctx["workers"], device=device.type, cache_dir=None)
    extract_features(ref, data.select(range(sizes.feature_batch)), progress=False, **extract)  # warm-up
    start = time.perf_counter()
    features = extract_features(ref, data, progress=False, **extract)
    seconds = time.perf_counter() - start
    record(
        {
            "encoder": ref,
            "images": len(features.features),
            "workers": ctx["workers"],
            "batch_size": sizes.feature_batch,
            "img_per_s": round(len(features.features) / seconds, 1),
        }
    )


PARTS: dict[str, Callable[[dict[str, Any], Callable[[dict], None]], None]] = {
    "device": part_device,
    "data": part_data,
    "end_to_end": part_end_to_end,
    "knn": part_knn,
    "features": part_features,
    "steps": part_steps,
    "mae": part_mae,
}


# ----------------------------------------------------------------------------- running parts under budgets


def _child(name: str, ctx: dict[str, Any], rows_file: Path) -> None:
    os.setpgrp()  # its own process group: a part over budget is killed with its loader workers
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        rows_file.write_text(json.dumps({"rows": rows}))

    try:
        cuda = ctx["device"] == "auto" and torch.cuda.is_available()
        PARTS[name]({**ctx, "device": torch.device("cuda" if cuda else "cpu")}, record)
    except BaseException as err:  # reported as the part's failure; the other parts still run
        rows_file.write_text(json.dumps({"rows": rows, "error": f"{type(err).__name__}: {err}"}))
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_part(name: str, ctx: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """Run one part in a forked process.

    Forking is safe only while the parent has asked CUDA nothing: even ``torch.cuda.is_available()``
    initialises the driver, and every forked child then fails with "Cannot re-initialize CUDA in
    forked subprocess". So the parent passes ``device="auto"`` and each part's process looks itself.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        process = multiprocessing.get_context("fork").Process(target=_child, args=(name, ctx, rows_file))
        start = time.perf_counter()
        process.start()
        process.join(budget_s)
        over = process.is_alive()
        seconds = time.perf_counter() - start
        # Its group also holds the loader workers, which would linger for seconds after a part that
        # ended, taking cores from the next part's timing: killed either way.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the part ended and left nothing running
            pass
        process.join()
        result = json.loads(rows_file.read_text()) if rows_file.is_file() else {"rows": []}
    if over:
        status = f"skipped: over its {budget_s:g} s budget after {len(result['rows'])} rows"
    elif process.exitcode != 0:
        status = f"failed: {result.get('error', f'exit code {process.exitcode}')}"
    else:
        status = "ok"
    return {"status": status, "seconds": round(seconds, 1), "budget_s": budget_s, "rows": result["rows"]}


def run_parts(names: list[str], ctx: dict[str, Any], budgets: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order, each under its budget plus the time the parts before it left unused."""
    parts: dict[str, dict[str, Any]] = {}
    spare = 0.0
    for name in names:
        budget = round(budgets[name] + spare, 1)
        parts[name] = run_part(name, ctx, budget)
        spare = max(0.0, budget - parts[name]["seconds"])
        if name == "device" and parts[name]["rows"]:
            ctx["peak_flops"] = parts[name]["rows"][0]["peak_flops"]
        print(f"{name:<11} {parts[name]['status']} ({parts[name]['seconds']} of {budget:g} s)", flush=True)
    return parts


def goals(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal with its measured figure (None where its part did not measure it)."""

    def rows(part: str) -> list[dict]:
        return parts.get(part, {}).get("rows", [])

    data = {r["path"]: r.get("samples_per_s") for r in rows("data")}
    gpu_fed = next((v for k, v in data.items() if k.startswith("GPU-fed")), None)
    step = {(r["step"], r["arch"], r["mode"]): r for r in rows("steps")}

    def best(arch: str, key: str) -> float | None:
        values = [r[key] for (s, a, _), r in step.items() if s == "dinov2" and a == arch and r.get(key) is not None]
        return max(values) if values else None

    wait = next((r["data_wait_fraction"] for r in rows("end_to_end")), None)
    return [
        {"goal": "data path >= 2,000 samples/s (GPU-fed)", "target": GOALS["data_samples_per_s"], "measured": gpu_fed},
        {
            "goal": "DINOv2 ViT-S/16 >= 2,000 img/s",
            "target": GOALS["dinov2_vit_s16_img_per_s"],
            "measured": best("vit_small_patch16_224", "img_per_s"),
        },
        {
            "goal": "DINOv2 ViT-B/16 >= 50 % MFU",
            "target": GOALS["dinov2_vit_b16_mfu"],
            "measured": best("vit_base_patch16_224", "mfu"),
        },
        {"goal": "data wait < 5 % of the step", "target": GOALS["data_wait_fraction"], "measured": wait, "below": True},
    ]


def markdown(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = [
        f"# gpu_check, {report['date']}: {device.get('name', '?')}",
        "",
        f"torch {report['torch']}, timm {report['timm']}, {device.get('cpus')} CPUs, /dev/shm {device.get('shm_gib')} GiB; "
        f"measured {device.get('peak_dtype', '?')} "
        f"matmul peak {device.get('peak_flops', 0) / 1e12:.1f} TFLOP/s{'; --smoke (tiny sizes, CPU)' if report['smoke'] else ''}",
        "",
        "| part | status | seconds | budget (s, with what earlier parts left) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {p['status']} | {p['seconds']} | {p['budget_s']:g} |" for n, p in report["parts"].items()]
    for name, part in report["parts"].items():
        rows = part["rows"] if name != "device" else []
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    lines += ["", "## goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in report["goals"]:
        m = g["measured"]
        met = "-" if m is None else ("yes" if (m < g["target"] if g.get("below") else m >= g["target"]) else "no")
        lines.append(f"| {g['goal']} | {g['target']} | {'-' if m is None else m} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=BENCHMARKS / "out" / "gpu_check")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="tiles, shards and wheels (--prepare writes them)")
    p.add_argument("--prepare", action="store_true", help="write --data-dir from ../shared/data, then stop")
    p.add_argument("--shared", type=Path, default=SHARED_DATA, help="the shared data folder, for --prepare")
    p.add_argument("--smoke", action="store_true", help="every part at tiny size on the CPU")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--budget", action="append", default=[], metavar="PART=S", help="a part's time budget in seconds")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core, at most 16)")
    args = p.parse_args(argv)
    budgets = dict(BUDGETS_S)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[part] = float(seconds)
    if args.prepare:
        prepare(args.data_dir, args.shared, 16 if args.smoke else 256, wheels=not args.smoke)
        return 0
    if not (args.data_dir / "shards").is_dir():
        print(
            f"error: {args.data_dir} has no shards; run with --prepare first (on a machine with ../shared)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    installed = install_missing(args.data_dir / "wheels")

    sizes = SMOKE if args.smoke else GPU
    workers = args.workers if args.workers is not None else (1 if args.smoke else min(16, os.cpu_count() or 1))
    ctx = {
        "sizes": sizes,
        "device": "cpu" if args.smoke else "auto",  # each part's process decides: see run_part
        "data_dir": args.data_dir,
        "workers": workers,
    }
    parts = run_parts([n for n in BUDGETS_S if n == "device" or n in args.parts], ctx, budgets)
    import timm  # only now: before the forks the parent imports no more than it must

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": (parts["device"]["rows"] or [{}])[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "installed_from_wheels": installed,
        "sizes": asdict(sizes),
        "wall_s": round(time.perf_counter() - started, 1),
        "parts": parts,
    }
    report["goals"] = goals(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
