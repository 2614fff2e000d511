"""How well the eps sweep's label-free rule finds planted clusters (dmdl_cli/clustering/eps.py).

    python benchmarks/eps_rule_bench.py [--seeds 100 101 102] [--grid 0.1:0.9:0.05]

Features with a known structure: people in families of look-alikes (:func:`planted`). A small
eps splits people, a large eps merges families into clusters that are stable too, so a rule
that only maximises robustness picks the families. For every configuration of a grid (people,
images per person, noise, family size) and seed, the sweep runs on one Jaccard graph and each
rule's eps is scored by the ARI of its labels against the planted people, divided by the best
ARI over the eps grid (1 = the rule found the best eps of the grid). Prints per rule the share
of configurations with a ratio >= 0.9, the mean and the worst ratio. The rules:

- ``first-peak``: the rule of ``dmdl cluster --eps-sweep`` (:func:`pick_eps`);
- ``max``: the eps of highest robustness (ties: the smaller eps), for comparison.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def planted(n_ids: int, per_id: int, dim: int, sigma: float, family: int, spread: float,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit features (n_ids * per_id, dim) float32 and person ids: ``n_ids`` people in
    families of ``family`` look-alikes (person centres ``spread`` around a random family
    centre), ``sigma`` isotropic noise per image (norms relative to the unit centres)."""
    rng = np.random.default_rng(seed)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    families = unit(rng.standard_normal((-(-n_ids // family), dim)))
    centres = unit(families[np.arange(n_ids) // family]
                   + spread * rng.standard_normal((n_ids, dim)) / np.sqrt(dim))
    ids = np.repeat(np.arange(n_ids), per_id)
    x = unit(centres[ids] + sigma * rng.standard_normal((len(ids), dim)) / np.sqrt(dim))
    return x.astype(np.float32), ids


def main(argv: list[str] | None = None) -> None:
    from dmdl_cli.clustering.eps import eps_sweep, jaccard_graph, parse_eps_grid, sweep_reach
    from dmdl_cli.recipe import ClusterRecipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--grid", default="0.1:0.9:0.05")
    args = p.parse_args(argv)
    grid = parse_eps_grid(args.grid)
    ratios: dict[str, list[float]] = {"first-peak": [], "max": []}
    configs = list(itertools.product((30, 40), (10, 20), (0.4, 0.5, 0.6), (1, 3, 4), args.seeds))
    for n_ids, per_id, sigma, family, seed in configs:
        x, ids = planted(n_ids, per_id, 32, sigma, family, 0.5 if family > 1 else 1.0, seed)
        # k1 and min_samples scaled to the images per person, as the data set recipes do
        cfg = ClusterRecipe(k1=10 if per_id == 20 else 6, k2=4 if per_id == 20 else 3,
                            min_samples=4 if per_id == 20 else 3)
        graph = jaccard_graph(x, cfg, reach=sweep_reach(grid))
        result = eps_sweep({0: graph}, grid, min_samples=cfg.min_samples, true_ids={0: ids})
        ari = {row.eps: row.ari for row in result.rows}
        best = max(ari.values())
        top = max(result.scores, key=lambda e: (result.scores[e], -e))
        ratios["first-peak"].append(ari[result.picked] / best if result.picked is not None else 0.0)
        ratios["max"].append(ari[top] / best)
    print(f"{len(configs)} configurations (people 30/40, 10/20 images each, noise 0.4-0.6, "
          f"families of 1/3/4, seeds {args.seeds}), eps grid {args.grid}")
    print(f"{'rule':12s} {'ratio >= 0.9':>13s} {'mean ratio':>11s} {'worst':>7s}")
    for rule, values in ratios.items():
        v = np.asarray(values)
        print(f"{rule:12s} {np.mean(v >= 0.9):13.3f} {v.mean():11.3f} {v.min():7.3f}")


if __name__ == "__main__":
    main()
