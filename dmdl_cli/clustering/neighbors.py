"""k nearest neighbours of L2-normalised features by inner product (faiss).

:func:`knn` returns, for every row of ``features``, its ``k`` most similar rows, the row itself
always first. Three methods:

- ``"exact"``: brute force, what the reference algorithm uses, and the default. On a GPU
  ``faiss.knn_gpu``; on the CPU blocked matrix products that exploit the symmetry of X X^T
  (each block pair is multiplied once and feeds both sides: half the arithmetic of a plain
  ``IndexFlatIP`` search) with faiss's top-k heaps. O(N^2 D) time, O(N k) memory.
- ``"ivf"``: inverted file for large N (1e5 .. 1e6+). ``nlist`` ~ 4 sqrt(N) cells from
  spherical k-means on a subsample. On a GPU faiss ``IndexIVFFlat`` (each query scans its
  ``nprobe`` nearest cells); on the CPU each cell is searched at once, its rows against the rows
  of the ``nprobe`` cells nearest to its centroid, one matrix product per cell (BLAS speed
  instead of one dot product at a time). O(N (nlist + nprobe N / nlist) D) time.
- ``"hnsw"``: faiss ``IndexHNSWFlat`` graph index (inner product), parameters ``hnsw_m``,
  ``ef_construction``, ``ef_search``. CPU only.

faiss uses :func:`faiss_threads` OpenMP threads (``OMP_NUM_THREADS`` or the CPUs available)
during a search, and the process's OpenMP thread count is as before afterwards: where torch was
imported first, faiss's ``omp_set_num_threads`` is torch's, and a search would otherwise leave
torch on faiss's count (a caller's ``torch.set_num_threads(1)`` undone).

GPU or CPU (``use_gpu=None``): the GPU when faiss has GPU support and torch sees CUDA. On a CUDA
machine whose faiss cannot use it, or after a GPU search fails (a CUDA error, out of memory),
the search runs on the CPU and one line says why, once per process; a failed GPU is not tried
again in that process. ``use_gpu=True`` never falls back: the failure is raised.

Guarantees, whatever the method:

- ``idx[i, 0] == i`` (with ``sims[i, 0] = <x_i, x_i>``): ties with duplicate rows, or an
  approximate index that misses the query, never push a row out of its own first slot;
- every index is valid (an approximate index that returns fewer than ``k`` results for a row,
  faiss's ``-1``, has that row searched exactly instead);
- ``k`` is clamped to ``N`` (a row has only ``N`` candidates, itself included). The returned
  arrays have ``min(k, N)`` columns; callers that care compare ``idx.shape[1]`` with ``k`` and
  report the change.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import KNN_METHODS as METHODS

KnnMethod = str  # one of METHODS (declared once, in dmdl_cli/recipe.py)

_GPU_RESOURCES = None  # one faiss.StandardGpuResources per process (it owns scratch memory)
_GPU_FAILURE: str | None = None  # why a GPU search failed in this process (then: CPU from now on)
_FALLBACK_SAID = False  # the one line saying k-NN falls back to the CPU was printed


def check_features(features: np.ndarray, what: str = "features") -> np.ndarray:
    """Return ``features`` as a C-contiguous float32 (N, D) array; DmdlError when unusable."""
    arr = features
    if hasattr(arr, "detach"):  # torch tensor
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DmdlError(f"{what}: expected a 2-D (N, D) array, got shape {arr.shape}; "
                        "pass one feature row per image")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DmdlError(f"{what}: empty array of shape {arr.shape}; there is nothing to cluster, "
                        "check that the image list of this modality is not empty")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DmdlError(f"{what}: expected floating-point features, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise DmdlError(f"{what}: {bad} of {arr.shape[0]} rows contain NaN or Inf; the model "
                        "diverged or the feature file is corrupt: resume from an earlier "
                        "checkpoint or lower the learning rate")
    return arr


def faiss_threads() -> int:
    """Threads faiss should use: ``OMP_NUM_THREADS`` when set, else the CPUs this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _faiss_thread_count():
    """faiss on :func:`faiss_threads` OpenMP threads inside the block, the OpenMP thread count
    of before after it (torch's too, where faiss's OpenMP calls reach torch's runtime)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(faiss_threads())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_available(use_gpu: bool | None = None) -> bool:
    """Whether :func:`knn` will search on a GPU for this ``use_gpu`` setting.

    With ``use_gpu=None`` on a machine with a CUDA GPU but a faiss without GPU support, or after
    a GPU search failed in this process, one line says so and the search runs on the CPU.
    """
    if use_gpu is False:
        return False
    import faiss

    faiss_gpus = _faiss_gpu_count(faiss)
    ok = faiss_gpus > 0 and _GPU_FAILURE is None
    if ok or use_gpu is None:  # only then pay for importing torch
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except ImportError:  # pragma: no cover - torch is a dependency
            cuda = False
        ok = ok and cuda
        if cuda and faiss_gpus == 0 and use_gpu is None:
            _note_cpu_fallback("this faiss has no GPU support (faiss-cpu, or a faiss-gpu built "
                               "for another CUDA); install faiss-gpu for a GPU search")
    if use_gpu is True and not ok:
        why = f" (a GPU search failed earlier: {_GPU_FAILURE})" if _GPU_FAILURE else ""
        raise DmdlError(f"use_gpu=True but faiss sees no GPU{why} (faiss-gpu with CUDA and "
                        "torch.cuda.is_available() are both needed); drop the option to search "
                        "on the CPU")
    return ok


def _faiss_gpu_count(faiss) -> int:
    """GPUs this faiss build can use (0 for faiss-cpu or when its CUDA runtime fails to start)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 - a broken CUDA runtime raises anything
        return 0


def _note_cpu_fallback(reason: str) -> None:
    """Say once per process why k-NN runs on the CPU."""
    global _FALLBACK_SAID
    if not _FALLBACK_SAID:
        _FALLBACK_SAID = True
        from dmdl_cli.console import log

        log(f"[yellow]k-NN search on the CPU: {reason}[/]")


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        import faiss

        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def default_nlist(n: int) -> int:
    """IVF list count: about 4 sqrt(N), and at least 39 training points per list."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def knn(
    features: np.ndarray,
    k: int,
    *,
    method: KnnMethod = "exact",
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int = 16,
    train_points_per_list: int = 32,
    hnsw_m: int = 32,
    ef_construction: int = 64,
    ef_search: int = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """k most similar rows of every row by inner product, the row itself first.

    features: (N, D) float32, L2-normalised rows (inner product = cosine).
    Returns ``sims`` (N, k') float32 and ``idx`` (N, k') int64, sorted by decreasing similarity
    after slot 0 (the row itself), with k' = min(k, N).

    ``use_gpu``: None = a GPU when faiss-gpu and torch.cuda are both available, True = require
    one, False = CPU. ``nlist``/``nprobe``/``train_points_per_list``/``seed`` tune ``"ivf"``
    (nlist None = :func:`default_nlist`); ``hnsw_m``/``ef_construction``/``ef_search`` tune
    ``"hnsw"`` (ef_search is raised to at least k).
    """
    x = check_features(features)
    n, d = x.shape
    if int(k) < 1:
        raise DmdlError(f"knn: k must be >= 1, got {k}")
    if method not in METHODS:
        raise DmdlError(f"knn: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    k = min(int(k), n)
    on_gpu = gpu_available(use_gpu)
    options = dict(nlist=nlist, nprobe=nprobe, train_points_per_list=train_points_per_list,
                   hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, seed=seed)
    with _faiss_thread_count():
        try:
            sims, idx = _search(x, k, method, on_gpu, **options)
        except Exception as err:  # noqa: BLE001 - faiss raises RuntimeError, CUDA errors vary
            if not on_gpu or use_gpu is True:
                raise
            _gpu_failed(err)
            on_gpu = False
            sims, idx = _search(x, k, method, on_gpu, **options)

        sims = np.ascontiguousarray(sims, dtype=np.float32)
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        missing = np.flatnonzero((idx < 0).any(axis=1))
        if missing.size:  # approximate index returned fewer than k results: search those exactly
            s2, i2 = _exact(x[missing], x, k, on_gpu)
            sims[missing], idx[missing] = s2, i2
    _self_first(x, sims, idx)
    return sims, idx


def nearest_rows(queries: np.ndarray, base: np.ndarray, *, use_gpu: bool | None = None) -> np.ndarray:
    """``(Nq,)`` int64: for each row of ``queries`` (Nq, D), the row of ``base`` (Nb, D) with
    the largest inner product (both L2-normalised: the most similar), by exact search."""
    q, b = check_features(queries, "queries"), check_features(base, "base rows")
    if q.shape[1] != b.shape[1]:
        raise DmdlError(f"nearest_rows: queries have {q.shape[1]} dimensions, the base {b.shape[1]}")
    on_gpu = gpu_available(use_gpu)
    with _faiss_thread_count():
        try:
            _, idx = _exact(q, b, 1, on_gpu)
        except Exception as err:  # noqa: BLE001 - faiss raises RuntimeError, CUDA errors vary
            if not on_gpu or use_gpu is True:
                raise
            _gpu_failed(err)
            _, idx = _exact(q, b, 1, False)
    return np.ascontiguousarray(idx[:, 0], dtype=np.int64)


def _search(x: np.ndarray, k: int, method: str, on_gpu: bool, *, nlist: int | None, nprobe: int,
            train_points_per_list: int, hnsw_m: int, ef_construction: int, ef_search: int,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw search of :func:`knn` (faiss's -1 for missing results, self not yet first)."""
    import faiss

    n, d = x.shape
    if method == "exact" or n <= 2 * k:
        return _exact(x, x, k, on_gpu)
    if method == "ivf":
        nl = default_nlist(n) if nlist is None else max(1, min(int(nlist), n))
        probe = max(1, min(int(nprobe), nl))
        n_train = min(n, max(nl * int(train_points_per_list), 39 * nl))
        if on_gpu:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
            index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
            rng = np.random.default_rng(seed)
            index.train(x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))])
            index.add(x)
            index.nprobe = probe
            sims, idx = index.search(x, k)
        else:
            sims, idx = _ivf_self_cpu(x, k, nl, probe, n_train, seed)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(x)
        index.hnsw.efSearch = max(int(ef_search), k)
        sims, idx = index.search(x, k)
    return sims, idx


def _gpu_failed(err: BaseException) -> None:
    """Remember that the GPU search failed (later searches go straight to the CPU) and say so."""
    global _GPU_FAILURE
    lines = str(err).strip().splitlines()
    _GPU_FAILURE = f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]
    _note_cpu_fallback(f"the faiss GPU search failed ({_GPU_FAILURE}); later searches of this "
                       "process run on the CPU too")


def _exact(xq: np.ndarray, xb: np.ndarray, k: int, on_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    if not on_gpu and xq is xb:
        return _exact_self_cpu(xb, k)
    if on_gpu:
        sims, idx = faiss.knn_gpu(_gpu_resources(), xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        return sims, idx
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


@contextlib.contextmanager
def _single_threaded_blas():
    """Limit BLAS to one thread (threadpoolctl, shipped with scikit-learn) inside the block.

    Many small matrix products lose badly to thread hand-offs, worse on a busy machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _ivf_self_cpu(x: np.ndarray, k: int, nlist: int, nprobe: int, n_train: int,
                  seed: int, max_block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """IVF self k-NN on the CPU, one matrix product per cell.

    Spherical k-means splits the rows into ``nlist`` cells (every row in the cell of its nearest
    centroid). The rows of a cell are compared with every row of the ``nprobe`` cells whose
    centroids are nearest to that cell's centroid (itself first): one (|cell|, candidates)
    matrix product per cell, at BLAS speed, fed to faiss's top-k heaps. Work about
    N * nprobe * N / nlist * D, plus N * nlist * D for the assignment.
    """
    import faiss

    n, d = x.shape
    rng = np.random.default_rng(seed)
    train = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=int(seed), spherical=True,
                      max_points_per_centroid=max(1, -(-len(train) // nlist)),
                      min_points_per_centroid=1, verbose=False)
    km.train(train)
    del train
    cent = np.ascontiguousarray(km.centroids, dtype=np.float32)  # (nlist, D)
    quant = faiss.IndexFlatIP(d)
    quant.add(cent)
    _, home = quant.search(x, 1)  # (N, 1) cell of every row
    home = home[:, 0].astype(np.int64)
    _, near = quant.search(cent, nprobe)  # (nlist, nprobe) cells nearest each cell
    near[:, 0] = np.arange(nlist)  # a cell always scans itself (ties between centroids)
    members = np.argsort(home, kind="stable")  # rows grouped by cell
    ptr = np.searchsorted(home[members], np.arange(nlist + 1))
    del home
    heap = faiss.ResultHeap(n, k, keep_max=True)
    with _single_threaded_blas():  # small products: one BLAS thread is much faster
        for cell in range(nlist):
            rows = members[ptr[cell]:ptr[cell + 1]]
            if rows.size == 0:
                continue
            cand = np.concatenate([members[ptr[c]:ptr[c + 1]] for c in near[cell] if c >= 0])
            xc = x[cand]
            step = max(1, max_block // cand.size)
            for q0 in range(0, rows.size, step):
                q = rows[q0:q0 + step]
                heap.add_result_subset(q, x[q] @ xc.T, cand)  # (|q|, |cand|) similarities
    heap.finalize()
    return heap.D, heap.I


def _exact_self_cpu(x: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact self k-NN by blocked matrix products that use the symmetry of X X^T.

    Each block pair (I, J >= I) is multiplied once and feeds the top-k heaps of the rows of I
    and of J: half the arithmetic of a plain search. Memory O(N k + block^2).
    """
    import faiss

    n = x.shape[0]
    heap = faiss.ResultHeap(n, k, keep_max=True)
    ids = np.arange(n, dtype=np.int64)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0 in range(i0, n, block):
            j1 = min(n, j0 + block)
            sim = x[i0:i1] @ x[j0:j1].T  # (|I|, |J|) float32
            heap.add_result_subset(ids[i0:i1], sim, ids[j0:j1])
            if j0 != i0:
                heap.add_result_subset(ids[j0:j1], _transpose(sim), ids[i0:i1])
    heap.finalize()
    return heap.D, heap.I


def _transpose(a: np.ndarray, strip: int = 128) -> np.ndarray:
    """C-contiguous transpose, copied in strips (much faster than one strided copy)."""
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    for s in range(0, a.shape[0], strip):
        out[:, s:s + strip] = a[s:s + strip].T
    return out


def _self_first(x: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> None:
    """In place: put row i in slot 0 of row i, keeping the order of the other neighbours."""
    n, k = idx.shape
    rows = np.arange(n)
    bad = np.flatnonzero(idx[:, 0] != rows)
    if bad.size == 0:
        return
    keep = idx[bad] != bad[:, None]  # neighbours other than the row itself
    # Stable argsort of ~keep lists the kept slots first, in their original order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, : k - 1]
    new_idx = np.empty((bad.size, k), dtype=np.int64)
    new_sims = np.empty((bad.size, k), dtype=np.float32)
    new_idx[:, 0] = bad
    new_sims[:, 0] = np.einsum("ij,ij->i", x[bad], x[bad])
    new_idx[:, 1:] = np.take_along_axis(idx[bad], order, axis=1)
    new_sims[:, 1:] = np.take_along_axis(sims[bad], order, axis=1)
    idx[bad] = new_idx
    sims[bad] = new_sims


__all__ = ["METHODS", "KnnMethod", "check_features", "default_nlist", "faiss_threads",
           "gpu_available", "knn"]
