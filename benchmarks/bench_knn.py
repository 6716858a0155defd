"""kNN search and feature-extraction speed on CPU: what the kNN probe spends its time on.

Search: ``--n-query`` queries against ``--n-train`` x ``--dim`` random float32 features (seeded,
L2-normalised), top ``--k`` by inner product (= cosine):

- ``faiss_flat``        faiss ``IndexFlatIP``, exact (what :func:`probes.knn.search` uses on CPU)
- ``sklearn_brute``     ``NearestNeighbors(metric="cosine", algorithm="brute")``, exact
- ``torch_fp32``        chunked ``queries @ train.T`` + ``topk`` in float32, exact
- ``torch_bf16``        the same matmul in bfloat16 (scores rounded; recall against exact reported)
- ``faiss_hnsw_efN``    what ``probes.knn --index hnsw`` builds (HNSW, M=32), searched at efSearch N; build
                        time reported apart
- ``faiss_ivf``         what ``probes.knn --index ivf`` builds (sqrt(N)*4 cells, nprobe 16), approximate

recall@k is the share of the exact top-k (faiss_flat) each method returns. Times are the best of
``--repeats`` (other processes on the machine inflate single runs); ``cpu s`` is the process CPU time
of that run, so ``cpu s / threads`` estimates the wall time on otherwise idle cores.
Uniform random unit vectors in 384 dims have no cluster structure (every similarity is near 0), the
worst case for HNSW and IVF; ``--data clustered`` draws them around ``--clusters`` centres instead,
closer to encoder features of tissue tiles. Extraction: images/s of
``timm:vit_small_patch16_224`` at 224 px on the CPU over ``--n-images`` real AMi-Br patches, through
:func:`probes.features.extract_features` with the cache off.

    .venv/bin/python benchmarks/bench_knn.py --threads 2 --out benchmarks/out/bench_knn.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from probes.knn import HNSW_EF_SEARCH, build_index  # noqa: E402
from ssl_path.core.io import write_json  # noqa: E402

SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))
GOAL_EXACT_S = 3.0
Search = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def random_features(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors: uniform on the sphere, or around ``centres`` (cluster structure, like encoder features)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if centres is not None:
        # Noise of norm ~0.7 around unit centres: neighbours mostly share a cluster, as tiles of one tissue do.
        x = centres[rng.integers(0, len(centres), n)] + x * np.float32(0.7 / np.sqrt(dim))
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def faiss_flat(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return index.search(queries, k)[1]


def sklearn_brute(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    return nn.kneighbors(queries, return_distance=False)


def torch_topk(dtype: torch.dtype, chunk: int = 1024) -> Search:
    """Exact search as chunked matmul + topk; chunks bound the [chunk, N] score matrix's memory."""

    def search(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
        t = torch.from_numpy(train).to(dtype)
        q = torch.from_numpy(queries).to(dtype)
        out = []
        with torch.inference_mode():
            for start in range(0, len(q), chunk):
                out.append(torch.topk(q[start : start + chunk] @ t.T, k, dim=1).indices)
        return torch.cat(out).numpy()

    return search


def hnsw(
    ef_search: int = HNSW_EF_SEARCH,
) -> tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray, int], np.ndarray]]:
    """The index ``probes.knn --index hnsw`` builds, searched with ``ef_search``."""

    def search(index: Any, q: np.ndarray, k: int) -> np.ndarray:
        index.hnsw.efSearch = max(ef_search, k)
        return index.search(q, k)[1]

    return lambda train: build_index(train, "hnsw"), search


def ivf() -> tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray, int], np.ndarray]]:
    """The index ``probes.knn --index ivf`` builds."""
    return lambda train: build_index(train, "ivf"), lambda index, q, k: index.search(q, k)[1]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of each exact top-k row that ``found`` also holds, averaged."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.size


def best_of(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """(best wall seconds, process CPU seconds of that run, result). CPU seconds over threads is
    what the wall time would be on idle cores: other processes inflate wall time, not this."""
    best, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, result


def extraction_rate(n_images: int, threads: int) -> dict[str, Any]:
    """Images/s of vit_small/16 at 224 px over real AMi-Br patches, cache off (decode included)."""
    from probes.features import extract_features
    from ssl_path.data.readers import read_spec

    data = read_spec(f"amibr:{SHARED_DATA / 'amibr_midog21'}")
    data = data.select(range(min(n_images, len(data))))
    ref = "timm:vit_small_patch16_224"
    extract_features(ref, data.select(range(4)), batch_size=4, cache_dir=None, progress=False)  # warm-up
    t0 = time.perf_counter()
    feats = extract_features(ref, data, batch_size=32, cache_dir=None, progress=False, input_size=224)
    seconds = time.perf_counter() - t0
    return {
        "encoder": ref,
        "input_size": 224,
        "n_images": len(feats),
        "seconds": seconds,
        "images_per_s": len(feats) / seconds,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP and torch threads (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-images", type=int, default=64, help="AMi-Br patches for the extraction rate (0: skip)")
    p.add_argument("--skip-sklearn", action="store_true", help="leave out the slowest exact method")
    p.add_argument(
        "--data",
        choices=("uniform", "clustered"),
        default="uniform",
        help="uniform unit vectors (worst case for HNSW/IVF) or --clusters gaussian clusters",
    )
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_knn.json")
    args = p.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = random_features(args.clusters, args.dim, rng) if args.data == "clustered" else None
    train = random_features(args.n_train, args.dim, rng, centres)
    queries = random_features(args.n_query, args.dim, rng, centres)

    rows: list[dict[str, Any]] = []
    exact_seconds, cpu, exact = best_of(lambda: faiss_flat(train, queries, args.k), args.repeats)
    rows.append(
        {"method": "faiss_flat", "exact": True, "search_s": exact_seconds, "cpu_s": cpu, "build_s": 0.0, "recall": 1.0}
    )
    exact_methods: list[tuple[str, Search, bool]] = [
        ("torch_fp32", torch_topk(torch.float32), True),
        ("torch_bf16", torch_topk(torch.bfloat16), False),
    ]
    if not args.skip_sklearn:
        exact_methods.insert(0, ("sklearn_brute", sklearn_brute, True))
    for name, fn, is_exact in exact_methods:
        seconds, cpu, found = best_of(
            lambda: fn(train, queries, args.k), 1 if name == "sklearn_brute" else args.repeats
        )
        rows.append(
            {
                "method": name,
                "exact": is_exact,
                "search_s": seconds,
                "cpu_s": cpu,
                "build_s": 0.0,
                "recall": recall(found, exact),
            }
        )
    approximate = [(f"faiss_hnsw_ef{ef}", hnsw(ef)) for ef in (HNSW_EF_SEARCH, 4 * HNSW_EF_SEARCH)] + [
        ("faiss_ivf", ivf())
    ]
    built: dict[str, Any] = {}
    for name, (build, search) in approximate:
        kind = name.rsplit("_ef", 1)[0]
        t0 = time.perf_counter()
        index = built[kind] if kind in built else build(train)  # one HNSW graph, searched at two ef values
        built[kind] = index
        build_s = time.perf_counter() - t0
        seconds, cpu, found = best_of(lambda: search(index, queries, args.k), args.repeats)
        rows.append(
            {
                "method": name,
                "exact": False,
                "search_s": seconds,
                "cpu_s": cpu,
                "build_s": build_s,
                "recall": recall(found, exact),
            }
        )

    extraction = extraction_rate(args.n_images, args.threads) if args.n_images > 0 else None

    print(
        f"kNN top-{args.k}: {args.n_query} queries x {args.n_train} train x {args.dim} dims ({args.data}), "
        f"{args.threads} threads (goal: exact <= {GOAL_EXACT_S:.0f} s)"
    )
    print(f"{'method':<18}{'exact':>6}{'search s':>10}{'cpu s':>8}{'build s':>9}{'recall@' + str(args.k):>11}")
    for r in rows:
        print(
            f"{r['method']:<18}{'yes' if r['exact'] else 'no':>6}{r['search_s']:>10.2f}{r['cpu_s']:>8.2f}"
            f"{r['build_s']:>9.2f}"
            f"{r['recall']:>11.4f}"
        )
    if extraction:
        print(
            f"extraction {extraction['encoder']} @224: {extraction['images_per_s']:.1f} img/s "
            f"({extraction['n_images']} images, {extraction['seconds']:.1f} s, cache off)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out,
        {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "goal_exact_s": GOAL_EXACT_S,
            "search": rows,
            "extraction": extraction,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "faiss": faiss.__version__,
                "torch": torch.__version__,
                "load_average": list(os.getloadavg()),
            },
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
