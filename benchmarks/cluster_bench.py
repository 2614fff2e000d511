"""Pseudo-labelling cost: sparse k-reciprocal Jaccard + DBSCAN (dmdl) vs the dense reference.

Run from the repository root::

    python benchmarks/cluster_bench.py                      # 22,258 x 2048 row + 100k row
    python benchmarks/cluster_bench.py --sizes 100000 1000000 --skip-reference
    python benchmarks/cluster_bench.py --reference-n 5000 --sizes   # quick look

Rows:

1. Reference comparison (``--reference-n``, default 22,258 = SYSU-MM01 visible, D = 2048):
   the same synthetic features go through (a) a dense implementation of the reference
   algorithm written here (ClusterContrast-style: faiss k-NN, then dense N x N encoding,
   query expansion, inverted-index Jaccard and sklearn DBSCAN on the dense matrix) and
   (b) ``dmdl_cli.clustering.cluster_features`` (exact k-NN). Each runs in its own subprocess
   so peak resident memory (``ru_maxrss``) does not mix; we print time, peak RSS, the part of
   the peak added over imports + features, the ratios and the ARI between the two label sets.
2. Scaling rows (``--sizes``, default 100,000; D = ``--scale-dim`` 256) with approximate
   k-NN (``--knn`` ivf or hnsw): time, peak RSS, per-step seconds and recall@k1 of the
   approximate lists against exact search on ``--recall-queries`` sampled rows, then how time
   grows with N (log-log slope between consecutive rows).

Features are synthetic with identity structure: ``N / --per-id`` identity centres on the unit
sphere of a ``--latent``-dimensional subspace (heavy-tailed identity sizes), Gaussian noise
``--sigma`` inside it, a little isotropic noise in the full space, L2-normalised. Timings on a
shared machine are noisy: other processes compete for the cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024.0 ** 3


# --------------------------------------------------------------------------------------------
# synthetic features
# --------------------------------------------------------------------------------------------
def make_features(path: Path, n: int, d: int, *, per_id: float, latent: int, sigma: float,
                  spread: float, family: int, iso: float, seed: int,
                  chunk: int = 200_000) -> np.ndarray:
    """Write (N, D) float32 L2-normalised features to ``path`` (.npy); return true ids (N,).

    ``N / per_id`` identities (gamma-distributed sizes) in families of ``family`` look-alikes:
    family centres are random unit vectors of a ``latent``-dimensional subspace, identity
    centres are family centre + ``spread`` noise, samples are identity centre + ``sigma`` noise
    (relative norms), plus isotropic noise of norm ``iso`` in the full space.
    """
    rng = np.random.default_rng(seed)
    n_ids = max(1, int(round(n / per_id)))
    latent = min(latent, d)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    fams = unit(rng.standard_normal((max(1, -(-n_ids // family)), latent)))
    centres = unit(fams[np.arange(n_ids) // family]
                   + spread * rng.standard_normal((n_ids, latent)) / math.sqrt(latent))
    sizes = rng.gamma(4.0, 1.0, n_ids)
    ids = rng.choice(n_ids, size=n, p=sizes / sizes.sum())
    basis, _ = np.linalg.qr(rng.standard_normal((d, latent)))  # (D, latent) orthonormal
    basis = basis.astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = unit(centres[ids[s:e]] + sigma * rng.standard_normal((e - s, latent))
                 / math.sqrt(latent))
        x = z.astype(np.float32) @ basis.T
        x += (iso / math.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = unit(x)
    out.flush()
    del out
    return ids


# --------------------------------------------------------------------------------------------
# dense reference (the algorithm of the ClusterContrast code line, dense N x N matrices)
# --------------------------------------------------------------------------------------------
def _reciprocal_row(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[np.flatnonzero((backward == i).any(axis=1))]


def dense_reference_labels(x: np.ndarray, k1: int, k2: int, eps: float, min_samples: int,
                           timings: dict) -> np.ndarray:
    import faiss
    from sklearn.cluster import DBSCAN

    n = x.shape[0]
    t = time.perf_counter()
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, rank = index.search(x, k1)  # (N, k1): the row itself + k1 - 1 neighbours
    timings["knn"] = time.perf_counter() - t

    t = time.perf_counter()
    half = int(np.around(k1 / 2))
    recip = [_reciprocal_row(rank, i, k1) for i in range(n)]
    recip_half = [_reciprocal_row(rank, i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        base = recip[i]
        expanded = [base]
        for cand in base:
            cand_set = recip_half[cand]
            if len(np.intersect1d(cand_set, base)) > 2.0 / 3.0 * len(cand_set):
                expanded.append(cand_set)
        cols = np.unique(np.concatenate(expanded))
        dist = 2.0 - 2.0 * (x[i] @ x[cols].T)
        w = np.exp(-(dist - dist.min()))
        v[i, cols] = w / w.sum()
    del recip, recip_half
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = v[rank[i, :k2]].mean(axis=0)
        v = v_qe
        del v_qe
    timings["encoding"] = time.perf_counter() - t

    t = time.perf_counter()
    inv_index = [np.flatnonzero(v[:, j]) for j in range(n)]
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros(n, dtype=np.float32)
        for j in np.flatnonzero(v[i]):
            rows = inv_index[j]
            temp_min[rows] += np.minimum(v[i, j], v[rows, j])
        jac[i] = 1.0 - temp_min / (2.0 - temp_min)
    del inv_index, v
    np.maximum(jac, 0.0, out=jac)
    timings["jaccard"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed",
                    n_jobs=-1).fit_predict(jac)
    timings["dbscan"] = time.perf_counter() - t
    return labels


# --------------------------------------------------------------------------------------------
# workers (one subprocess per measurement)
# --------------------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _exact_topk(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 32) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        sim = x[q] @ x.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[s:s + chunk] = top
    return out


def worker(args: argparse.Namespace) -> None:
    import faiss  # noqa: F401  - imports are not part of the measurement
    import scipy.sparse  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401

    from dmdl_cli.clustering.neighbors import knn
    from dmdl_cli.clustering.pseudo_labels import cluster_features

    x = np.load(args.features)
    base_rss = _maxrss_bytes()
    result: dict = {"n": int(x.shape[0]), "d": int(x.shape[1]), "timings": {}}
    t0 = time.perf_counter()
    if args.worker == "dense":
        labels = dense_reference_labels(x, args.k1, args.k2, args.eps, args.min_samples,
                                        result["timings"])
        from dmdl_cli.clustering.pseudo_labels import renumber

        labels = renumber(labels)
    else:
        t = time.perf_counter()
        sims, idx = knn(x, args.k1, method=args.knn, **json.loads(args.knn_options))
        result["timings"]["knn"] = time.perf_counter() - t
        labels, info = cluster_features(x, k1=args.k1, k2=args.k2, eps=args.eps,
                                        min_samples=args.min_samples,
                                        neighbors=(sims, idx), return_info=True)
        result["timings"].update(encoding=info["seconds_encoding"],
                                 jaccard=info["seconds_jaccard"],
                                 dbscan=info["seconds_dbscan"])
        result["info"] = {k: v for k, v in info.items() if not k.startswith("seconds")}
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss"] = _maxrss_bytes()
    result["base_rss"] = base_rss
    if args.worker == "sparse" and args.recall_queries > 0:
        rng = np.random.default_rng(12345)
        q = np.sort(rng.choice(x.shape[0], min(args.recall_queries, x.shape[0]), replace=False))
        exact = _exact_topk(x, q, idx.shape[1])
        hits = [len(np.intersect1d(exact[r], idx[q[r]])) for r in range(len(q))]
        result["recall"] = float(np.mean(hits) / idx.shape[1])
    if args.worker == "sparse" and args.compare_exact and args.knn != "exact":
        from sklearn.metrics import adjusted_rand_score

        del sims, idx
        t = time.perf_counter()
        exact_labels = cluster_features(x, k1=args.k1, k2=args.k2, eps=args.eps,
                                        min_samples=args.min_samples, knn_method="exact")
        result["exact_seconds"] = time.perf_counter() - t
        result["ari_vs_exact"] = float(adjusted_rand_score(exact_labels, labels))
    np.save(args.labels, labels)
    Path(args.result).write_text(json.dumps(result))


def run_worker(kind: str, features: Path, tmp: Path, args: argparse.Namespace, *,
               knn_method: str = "exact", recall: int = 0) -> tuple[dict, np.ndarray]:
    res, lab = tmp / f"{kind}-{features.stem}.json", tmp / f"{kind}-{features.stem}-labels.npy"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--features", str(features), "--result", str(res), "--labels", str(lab),
           "--k1", str(args.k1), "--k2", str(args.k2), "--eps", str(args.eps),
           "--min-samples", str(args.min_samples), "--knn", knn_method,
           "--knn-options", args.knn_options, "--recall-queries", str(recall)]
    if args.compare_exact:
        cmd.append("--compare-exact")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
    return json.loads(res.read_text()), np.load(lab)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _synth_args(args: argparse.Namespace) -> dict:
    return dict(per_id=args.per_id, latent=args.latent, sigma=args.sigma, spread=args.spread,
                family=args.family, iso=args.iso, seed=args.seed)


def _fmt_t(t: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in t.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-n", type=int, default=22258,
                   help="N of the dense-vs-sparse row (0 = skip it)")
    p.add_argument("--reference-dim", type=int, default=2048)
    p.add_argument("--skip-reference", action="store_true", help="only the scaling rows")
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000],
                   help="N of the scaling rows (e.g. 100000 1000000; none = skip)")
    p.add_argument("--scale-dim", type=int, default=256)
    p.add_argument("--knn", default="ivf", choices=["exact", "ivf", "hnsw"],
                   help="k-NN method of the scaling rows")
    p.add_argument("--knn-options", default="{}", help='JSON, e.g. \'{"nprobe": 16}\'')
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--compare-exact", action="store_true",
                   help="scaling rows: also cluster with exact k-NN (slow, after the timed run) "
                        "and print the ARI between the two label sets")
    p.add_argument("--k1", type=int, default=30)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--eps", type=float, default=0.6)
    p.add_argument("--min-samples", type=int, default=4)
    p.add_argument("--per-id", type=float, default=50.0, help="mean images per identity")
    p.add_argument("--latent", type=int, default=128, help="dimension of the identity subspace")
    p.add_argument("--family", type=int, default=10, help="identities per look-alike family")
    p.add_argument("--spread", type=float, default=0.7, help="identity spread in a family")
    p.add_argument("--sigma", type=float, default=1.2, help="sample noise around an identity")
    p.add_argument("--iso", type=float, default=0.3, help="isotropic noise in the full space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the feature files (default: a temp dir)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from dmdl_cli.clustering.pseudo_labels import cluster_stats

    print(f"machine: {len(os.sched_getaffinity(0))} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start (shared machine: timings are noisy)")
    print(f"k1={args.k1} k2={args.k2} eps={args.eps} min_samples={args.min_samples}; synthetic "
          f"features: {_synth_args(args)}\n")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        if args.reference_n and not args.skip_reference:
            n, d = args.reference_n, args.reference_dim
            f = tmp / f"ref-{n}.npy"
            ids = make_features(f, n, d, **_synth_args(args))
            print(f"== reference row: N={n:,} D={d}, exact k-NN ==", flush=True)
            dense, lab_d = run_worker("dense", f, tmp, args)
            sparse, lab_s = run_worker("sparse", f, tmp, args)
            from sklearn.metrics import adjusted_rand_score

            ari = adjusted_rand_score(lab_d, lab_s)
            for name, r in (("dense reference", dense), ("dmdl sparse", sparse)):
                print(f"{name:16s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss'] / GIB:5.2f} GiB "
                      f"(+{(r['peak_rss'] - r['base_rss']) / GIB:5.2f} GiB over imports+features)"
                      f"  [{_fmt_t(r['timings'])}]")
            t_ratio = dense["seconds"] / sparse["seconds"]
            rest_d = dense["seconds"] - dense["timings"]["knn"]
            rest_s = sparse["seconds"] - sparse["timings"]["knn"]
            print(f"speed-up {t_ratio:.1f}x total, {rest_d / rest_s:.1f}x excluding the k-NN "
                  f"search ({rest_d:.1f} s vs {rest_s:.1f} s); peak RSS ratio "
                  f"{sparse['peak_rss'] / dense['peak_rss']:.3f} (added memory ratio "
                  f"{(sparse['peak_rss'] - sparse['base_rss']) / max(1, dense['peak_rss'] - dense['base_rss']):.3f})")
            print(f"ARI(dense labels, sparse labels) = {ari:.6f}; labels identical: "
                  f"{bool(np.array_equal(lab_d, lab_s))}")
            st = cluster_stats(lab_s, ids)
            print(f"clusters {st['clusters']}, outliers {st['outliers']}, ARI vs true ids "
                  f"{st['ari']:.3f}, purity {st['purity']:.3f}\n", flush=True)
            f.unlink()

        rows = []
        for n in args.sizes:
            d = args.scale_dim
            f = tmp / f"scale-{n}.npy"
            ids = make_features(f, n, d, **_synth_args(args))
            print(f"== scaling row: N={n:,} D={d}, k-NN {args.knn} {args.knn_options} ==",
                  flush=True)
            r, lab = run_worker("sparse", f, tmp, args, knn_method=args.knn,
                                recall=args.recall_queries)
            st = cluster_stats(lab, ids)
            info = r["info"]
            print(f"{r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / GIB:5.2f} GiB "
                  f"(+{(r['peak_rss'] - r['base_rss']) / GIB:5.2f} GiB over imports+features)"
                  f"  [{_fmt_t(r['timings'])}]")
            print(f"recall@{args.k1} of the {args.knn} lists vs exact ({args.recall_queries} "
                  f"queries): {r.get('recall', float('nan')):.4f}; encoding nnz "
                  f"{info['encoding_nnz']:,}, triples {info['triples']:,}, stored "
                  f"{info['stored']:,}")
            if "ari_vs_exact" in r:
                print(f"ARI(labels with {args.knn} k-NN, labels with exact k-NN) = "
                      f"{r['ari_vs_exact']:.4f} (exact run: {r['exact_seconds']:.1f} s)")
            print(f"clusters {st['clusters']}, outliers {st['outliers']}, ARI vs true ids "
                  f"{st['ari']:.3f}, purity {st['purity']:.3f}\n", flush=True)
            rows.append((n, r["seconds"]))
            f.unlink()
        for (n0, t0), (n1, t1) in zip(rows, rows[1:]):
            slope = math.log(t1 / t0) / math.log(n1 / n0)
            print(f"time N={n0:,} -> {n1:,}: x{t1 / t0:.1f} for x{n1 / n0:.0f} samples "
                  f"(grows as N^{slope:.2f})")


if __name__ == "__main__":
    main()
