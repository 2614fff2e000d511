"""Cost of the label-free criteria (dmdl_cli/clustering/criteria.py) against one epoch's
pseudo-labelling, at SYSU-MM01 size on the CPU.

    python benchmarks/criteria_bench.py [--visible 22258] [--infrared 11909] [--dim 2048]
        [--repeat 3] [--threads 1]

Features: synthetic, L2-normalised, with planted identities (``benchmarks/cluster_bench.py``'s
generator: 395 identities, look-alike families, heavy-tailed sizes), one set per modality at
SYSU-MM01's train sizes (22,258 visible and 11,909 infrared images, D = 2,048).

Rows:

- the labelling itself, timed once through the training's own path
  (``clustering/modalities.py: cluster_modalities``: exact k-NN, sparse Jaccard, DBSCAN,
  statistics and centroids of each modality). Feature extraction is not counted: the
  denominator is the clustering alone, the part the criteria are added to;
- what the criteria add: the same Jaccard graph stored up to eps + delta instead of eps (built
  from the same k-NN lists, so only the storage differs) and DBSCAN at eps on it; the two
  DBSCAN re-runs at eps -+ delta; the stability (ARI / NMI against a previous labelling: here
  the labels at eps - delta stand in for it, same sizes); eps robustness; cross-modality
  consistency (mutual NN, Hungarian matching, association cost); pair stability and unified
  ARI; the effective rank on ``--rank-samples`` rows; the label alarms; and
  ``epoch_criteria`` end to end on the prepared labels (which repeats the small rows).

Each criterion row is the median of ``--repeat`` runs (the two graphs alternately, their
difference's median). Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _cluster_bench():
    spec = importlib.util.spec_from_file_location("cluster_bench", REPO / "benchmarks" / "cluster_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls of ``fn`` and its last result."""
    seconds, out = [], None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--visible", type=int, default=22258)
    p.add_argument("--infrared", type=int, default=11909)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ids", type=int, default=395, help="planted identities per modality")
    p.add_argument("--k1", type=int, default=30)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--eps", type=float, default=0.6)
    p.add_argument("--min-samples", type=int, default=4)
    p.add_argument("--delta", type=float, default=0.02, help="select.eps_delta")
    p.add_argument("--rank-samples", type=int, default=1024, help="select.rank_samples")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="faiss / BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the feature files (default: a temp dir)")
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    import faiss  # noqa: F401 - imports are not part of a measurement
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401

    from dmdl_cli.clustering.association import AssociationInput, ModalitySamples, associate
    from dmdl_cli.clustering.criteria import (
        EpochLabels, ModalityLabels, cross_modality, effective_rank, epoch_criteria,
        eps_robustness, label_agreement, label_alarms, linked_clusters, pair_stability,
    )
    from dmdl_cli.clustering.eps import jaccard_graph, labels_at, relabel_around
    from dmdl_cli.clustering.jaccard import jaccard_distance
    from dmdl_cli.clustering.modalities import cluster_modalities
    from dmdl_cli.clustering.neighbors import knn
    from dmdl_cli.clustering.pseudo_labels import centroids, dbscan_precomputed
    from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
    from dmdl_cli.recipe import ClusterRecipe

    bench = _cluster_bench()
    cfg = ClusterRecipe(k1=args.k1, k2=args.k2, eps=args.eps, min_samples=args.min_samples)
    sizes = {VISIBLE: args.visible, INFRARED: args.infrared}
    print(f"machine: {len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"at start; {args.threads} faiss/BLAS thread(s)")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        feats = []
        for m, n in sizes.items():
            path = Path(tmp) / f"{MODALITY_NAMES[m]}.npy"
            bench.make_features(path, n, args.dim, per_id=n / args.ids, latent=128, sigma=1.2,
                                spread=0.7, family=10, iso=0.3, seed=args.seed + m)
            feats.append(np.load(path))
            path.unlink()
    x = np.concatenate(feats)  # (N, D): visible rows first
    del feats
    modality = np.repeat([VISIBLE, INFRARED], [sizes[VISIBLE], sizes[INFRARED]]).astype(np.int8)
    print(f"features: {sizes[VISIBLE]:,} visible + {sizes[INFRARED]:,} infrared x {args.dim}; "
          f"k1={cfg.k1} k2={cfg.k2} eps={cfg.eps} min_samples={cfg.min_samples} "
          f"delta={args.delta}\n", flush=True)

    # --- the labelling, as the training runs it
    t = time.perf_counter()
    clusters = cluster_modalities(cfg, x, np.arange(len(x)), modality)
    labelling = time.perf_counter() - t
    for m in sizes:
        s = clusters[m].stats
        print(f"{MODALITY_NAMES[m]}: {s['clusters']} clusters, {s['outliers']} outliers, "
              f"{s['seconds']:.1f} s")
    rows: list[tuple[str, float]] = []

    # --- storing the graph up to eps + delta instead of eps (same k-NN lists), DBSCAN at eps
    graphs, now, before = {}, {}, {}
    storage = dbscan_extra = 0.0
    for m in sizes:
        xm = x[modality == m]
        neighbors = knn(xm, cfg.k1)
        differences = []
        for _ in range(max(1, args.repeat)):  # interleaved: load changes hit both alike
            t_eps, g_eps = timed(lambda: jaccard_distance(xm, k1=cfg.k1, k2=cfg.k2,
                                                          neighbors=neighbors, max_distance=cfg.eps), 1)
            t_reach, graphs[m] = timed(lambda: jaccard_graph(xm, cfg, reach=cfg.eps + args.delta,
                                                             neighbors=neighbors), 1)
            differences.append(t_reach - t_eps)
        storage += statistics.median(differences)
        d_eps, _ = timed(lambda: dbscan_precomputed(g_eps, eps=cfg.eps, min_samples=cfg.min_samples),
                         args.repeat)
        d_reach, lab = timed(lambda: labels_at(graphs[m], cfg.eps, cfg.min_samples), args.repeat)
        dbscan_extra += d_reach - d_eps
        assert np.array_equal(lab, clusters[m].labels), "the graph up to eps + delta changed the labels"
        print(f"{MODALITY_NAMES[m]}: graph entries {g_eps.nnz:,} up to eps, "
              f"{graphs[m].distances.nnz:,} up to eps + delta", flush=True)
        del g_eps, neighbors
    rows.append(("Jaccard graph stored to eps + delta (vs eps)", storage))
    rows.append(("DBSCAN at eps on that graph (vs the eps graph)", dbscan_extra))

    t_rel = 0.0
    for m in sizes:
        sec, (tighter, looser) = timed(lambda: relabel_around(graphs[m], cfg.eps, args.delta,
                                                              cfg.min_samples), args.repeat)
        t_rel += sec
        now[m] = ModalityLabels(clusters[m].labels, clusters[m].centroids, tighter, looser)
        # the previous epoch's stand-in: the labels at eps - delta and their centroids
        before[m] = ModalityLabels(tighter, centroids(x[modality == m], tighter))
    rows.append(("DBSCAN at eps - delta and eps + delta", t_rel))
    rows.append(("stability: ARI + NMI vs the previous labels",
                 sum(timed(lambda: label_agreement(now[m].labels, before[m].labels), args.repeat)[0]
                     for m in sizes)))
    rows.append(("eps robustness (contingency counts)",
                 sum(timed(lambda: eps_robustness(now[m].labels, now[m].tighter, now[m].looser),
                           args.repeat)[0] for m in sizes)))
    for labels, epoch in ((now, 0), (before, 1)):  # stage 2's association of each epoch
        inp = AssociationInput(epoch, {m: ModalitySamples(labels[m].labels, x[modality == m],
                                                          labels[m].centroids) for m in sizes})
        unified = associate("nearest-alternating", inp).labels
        for m in sizes:
            labels[m].unified = unified[m]

    def cross() -> dict:
        vis, ir = now[VISIBLE], now[INFRARED]
        linked = linked_clusters(vis.labels, vis.unified, ir.labels, ir.unified,
                                 len(vis.centroids), len(ir.centroids))
        return cross_modality(vis.centroids, ir.centroids, linked)

    rows.append(("cross-modality: mutual NN, Hungarian, association cost",
                 timed(cross, args.repeat)[0]))
    rows.append(("pair stability (linked pairs kept)",
                 timed(lambda: pair_stability(now[VISIBLE].unified, now[INFRARED].unified,
                                              before[VISIBLE].unified, before[INFRARED].unified),
                       args.repeat)[0]))
    rows.append((f"effective rank ({args.rank_samples} rows of {len(x):,})",
                 timed(lambda: effective_rank(x, samples=args.rank_samples), args.repeat)[0]))
    rows.append(("alarms: clusters, largest and outlier share",
                 sum(timed(lambda: label_alarms(now[m].labels), args.repeat)[0] for m in sizes)))
    end_to_end, record = timed(lambda: epoch_criteria(EpochLabels(now), EpochLabels(before), x,
                                                      epoch=1, rank_samples=args.rank_samples),
                               args.repeat)

    total = sum(sec for _, sec in rows)
    print(f"\n{'step':58s} {'seconds':>8s} {'% of labelling':>15s}")
    print(f"{'labelling (k-NN, Jaccard, DBSCAN, centroids; both modalities)':58s} "
          f"{labelling:8.2f} {100.0:14.1f}%")
    for name, sec in rows:
        print(f"{'  + ' + name:58s} {sec:8.3f} {100 * sec / labelling:14.2f}%")
    print(f"{'criteria together (the rows above)':58s} {total:8.2f} {100 * total / labelling:14.2f}%")
    print(f"{'  epoch_criteria end to end (labels prepared)':58s} {end_to_end:8.3f} "
          f"{100 * end_to_end / labelling:14.2f}%")
    shown = {k: v for k, v in record.items() if not isinstance(v, dict)}
    print(f"\nrecord: {shown}")


if __name__ == "__main__":
    main()
