"""Benchmark of the evaluation metrics: vectorised ``rank_metrics`` vs a per-query loop.

Two cases with realistic sizes and identity structure, random L2-normalised features:

* ``sysu``  — SYSU-MM01 all-search, single-shot: 96 test identities, 3,803 IR queries (cams 3, 6)
  and ~6,775 visible images (cams 1, 2, 4, 5, 301 identity-camera pairs present); the gallery
  (301 images) is drawn by ``build_trials`` per trial; cam-3/cam-2 exclusion; de-duplicated CMC.
* ``regdb`` — RegDB visible-to-thermal: 206 identities x 10 images per modality (2,060 x 2,060),
  new features per trial (each RegDB trial is a separately trained model); plain CMC.

For each case and trial the distance matrix (``2 - 2 q g^T`` in float32) and the metrics are
timed separately; the loop implementation (written here, following the structure of the
SYSU/AGW reference code but with a stable sort) is timed on the same distances, and both results
are checked equal. Run from the repository root: ``python benchmarks/eval_bench.py``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmdl_cli.evaluation.metrics import mean_std, rank_metrics  # noqa: E402
from dmdl_cli.evaluation.protocols import build_trials  # noqa: E402


# ---------------------------------------------------------------------------- reference loop
def loop_rank_metrics(dist, q_pids, g_pids, *, max_rank=20, exclude=None, dedup=True):
    """Per-query evaluation in the style of the reference code (one Python iteration/query)."""
    num_q, num_g = dist.shape
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = np.argsort(dist[i], kind="stable")
        keep = np.ones(num_g, dtype=bool) if exclude is None else ~exclude[i][order]
        ranked_ids = g_pids[order][keep]
        orig_cmc = (ranked_ids == q_pids[i]).astype(np.int32)
        if not np.any(orig_cmc):
            continue
        if dedup:
            first_idx = np.unique(ranked_ids, return_index=True)[1]
            new_ids = ranked_ids[np.sort(first_idx)]
            cmc = (new_ids == q_pids[i]).astype(np.int32).cumsum()
        else:
            cmc = orig_cmc.cumsum()
            cmc[cmc > 1] = 1
        curve = np.ones(max_rank)                     # past the list end the hit stays found
        curve[: min(max_rank, cmc.size)] = cmc[:max_rank]
        all_cmc.append(curve)
        hits = orig_cmc.cumsum()
        pos = np.flatnonzero(orig_cmc)
        all_inp.append(hits[pos[-1]] / (pos[-1] + 1.0))
        all_ap.append((hits[pos] / (pos + 1.0)).sum() / orig_cmc.sum())
    return {
        "cmc": np.mean(all_cmc, axis=0),
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "num_valid": len(all_ap),
    }


# ---------------------------------------------------------------------------- synthetic data
def _features(rng, centers, pids, shift, noise):
    """``(N, D)`` float32 L2-normalised: identity centre + modality/camera shift + noise.

    In 2048 dimensions unit-variance noise against identity centres of scale ``--signal``
    (default 0.25) gives a retrieval task of moderate difficulty (mAP of a few tens of %),
    like a partly trained cross-modality model.
    """
    x = centers[pids] + shift + noise * rng.standard_normal((len(pids), centers.shape[1]))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sysu_metadata(rng, n_ids=96, n_ir=3803, n_vis=6775, n_pairs=301):
    """Test rows with SYSU-MM01 sizes: (pids, cams, modality)."""
    vis_cams = np.array([1, 2, 4, 5])
    # 301 of the 96 x 4 (id, visible cam) pairs, every identity in at least one camera
    all_pairs = np.stack(np.meshgrid(np.arange(n_ids), vis_cams, indexing="ij"), -1).reshape(-1, 2)
    must = np.array([[p, rng.choice(vis_cams)] for p in range(n_ids)])
    rest = all_pairs[~(all_pairs[:, None, :] == must[None]).all(-1).any(1)]
    pairs = np.concatenate([must, rest[rng.choice(len(rest), n_pairs - n_ids, replace=False)]])
    # every pair gets at least one image; the rest are spread at random
    vis_pair = np.concatenate([np.arange(len(pairs)),
                               rng.integers(0, len(pairs), n_vis - len(pairs))])
    ir_p = np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, n_ir - n_ids)])
    pids = np.concatenate([pairs[vis_pair, 0], ir_p])
    cams = np.concatenate([pairs[vis_pair, 1], rng.choice([3, 6], n_ir)])
    mods = np.concatenate([np.zeros(n_vis, np.int64), np.ones(n_ir, np.int64)])
    return pids.astype(np.int64), cams.astype(np.int64), mods


def _distance(q, g):
    """``(Q, G)`` float32 squared Euclidean distance of unit vectors: ``2 - 2 q g^T``."""
    return 2.0 - 2.0 * (q @ g.T)


def _same(a, b):
    return (a["num_valid"] == b["num_valid"] and np.allclose(a["cmc"], b["cmc"], atol=1e-12)
            and abs(a["mAP"] - b["mAP"]) < 1e-9 and abs(a["mINP"] - b["mINP"]) < 1e-9)


def bench_sysu(args, rng):
    pids, cams, mods = _sysu_metadata(rng)
    centers = args.signal * rng.standard_normal((96, args.dim))
    cam_shift = {c: args.shift * rng.standard_normal(args.dim) for c in (1, 2, 3, 4, 5, 6)}
    shift = np.stack([cam_shift[c] for c in cams])
    feats = _features(rng, centers, pids, shift, args.noise)
    t0 = time.perf_counter()
    trials = build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods,
                          trials=args.trials)
    t_protocol = time.perf_counter() - t0
    t_dist = t_vec = t_loop = 0.0
    vec, ok = [], True
    for t in trials:
        t0 = time.perf_counter()
        dist = _distance(feats[t.query], feats[t.gallery])
        t1 = time.perf_counter()
        out = rank_metrics(dist, pids[t.query], pids[t.gallery], cams[t.query], cams[t.gallery],
                           exclude=t.exclude, dedup=t.dedup)
        t2 = time.perf_counter()
        t_dist += t1 - t0
        t_vec += t2 - t1
        vec.append(out)
        if not args.skip_loop:
            ref = loop_rank_metrics(dist, pids[t.query], pids[t.gallery], exclude=t.exclude,
                                    dedup=t.dedup)
            t_loop += time.perf_counter() - t2
            ok &= _same(out, ref)
    shape = f"{len(trials[0].query)} x {len(trials[0].gallery)}"
    return "sysu all-search", shape, t_protocol, t_dist, t_vec, t_loop, ok, mean_std(vec)


def bench_regdb(args, rng):
    n_ids, per = 206, 10
    pids = np.repeat(np.arange(n_ids), per)
    t_dist = t_vec = t_loop = 0.0
    vec, ok = [], True
    for _ in range(args.trials):
        centers = args.signal * rng.standard_normal((n_ids, args.dim))
        vis_shift, ir_shift = args.shift * rng.standard_normal((2, args.dim))
        q = _features(rng, centers, pids, vis_shift, args.noise)     # visible queries
        g = _features(rng, centers, pids, ir_shift, args.noise)      # thermal gallery
        cams_q, cams_g = np.ones(len(pids), np.int64), np.full(len(pids), 2, np.int64)
        t0 = time.perf_counter()
        dist = _distance(q, g)
        t1 = time.perf_counter()
        out = rank_metrics(dist, pids, pids, cams_q, cams_g, dedup=False)
        t2 = time.perf_counter()
        t_dist += t1 - t0
        t_vec += t2 - t1
        vec.append(out)
        if not args.skip_loop:
            ref = loop_rank_metrics(dist, pids, pids, dedup=False)
            t_loop += time.perf_counter() - t2
            ok &= _same(out, ref)
    return "regdb v->t", f"{len(pids)} x {len(pids)}", 0.0, t_dist, t_vec, t_loop, ok, mean_std(vec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--dim", type=int, default=2048, help="feature dimension")
    ap.add_argument("--signal", type=float, default=0.25, help="scale of identity centres")
    ap.add_argument("--shift", type=float, default=0.3,
                    help="scale of the per-camera / per-modality offset")
    ap.add_argument("--noise", type=float, default=1.0, help="scale of per-image noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+", choices=["sysu", "regdb"], default=["sysu", "regdb"])
    ap.add_argument("--skip-loop", action="store_true", help="do not run the per-query loop")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    rows = []
    for case in args.cases:
        rows.append((bench_sysu if case == "sysu" else bench_regdb)(args, rng))

    head = (f"{'case':<16} {'Q x G':>12} {'trials':>6} {'protocol s':>10} {'dist s':>8} "
            f"{'metrics s':>9} {'total s':>8} {'loop s':>8} {'speed-up':>8} {'equal':>5}")
    print(head)
    print("-" * len(head))
    for name, shape, t_p, t_d, t_v, t_l, ok, _ in rows:
        loop = f"{t_l:8.3f}" if not args.skip_loop else f"{'-':>8}"
        ratio = f"{t_l / t_v:7.1f}x" if not args.skip_loop else f"{'-':>8}"
        same = ("yes" if ok else "NO") if not args.skip_loop else "-"
        print(f"{name:<16} {shape:>12} {args.trials:>6} {t_p:10.3f} {t_d:8.3f} {t_v:9.3f} "
              f"{t_p + t_d + t_v:8.3f} {loop} {ratio} {same:>5}")
    print()
    for name, *_, summary in rows:
        c = summary["cmc"]
        print(f"{name:<16} R1 {100 * c[0]:5.2f}  R10 {100 * c[9]:5.2f}  R20 {100 * c[19]:5.2f}  "
              f"mAP {100 * summary['mAP']:5.2f} (+/- {100 * summary['mAP_std']:.2f})  "
              f"mINP {100 * summary['mINP']:5.2f}")
    print("(total = protocol sampling + distances + rank_metrics; loop = metrics only)")
    return 0 if all(r[6] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
