"""How much cross-modality signal does the embedded synthetic set offer a network in a CPU budget?

A DIAGNOSTIC UPPER BOUND, not a result of dmdl: the recipe's network is trained *with the true
train identities* (which dmdl never reads) by a cosine-softmax classifier on batches of P
identities x (K visible + K infrared) images, plain horizontal flips, Adam. Every
``--eval-every`` steps the test split is evaluated with the same protocol as ``dmdl evaluate``
(all-search, IR query, single-shot, ``eval.trials`` galleries). Nothing here is tuned on the
test split or feeds back into a recipe; it bounds what the unsupervised pipeline could reach
with the same network, input size and number of steps.

    python benchmarks/synthetic_ceiling.py --workspace runs/demo [--steps 240] [--lr 3.5e-4]

The workspace must have been prepared (``dmdl prepare-data --dataset synthetic``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmdl_cli.data.cache import open_cache, read_rows  # noqa: E402
from dmdl_cli.data.index import INFRARED, VISIBLE, read_index  # noqa: E402
from dmdl_cli.evaluation.evaluate import run_protocol  # noqa: E402
from dmdl_cli.features.extract import extract_features  # noqa: E402
from dmdl_cli.model.backbone import normalize_batch  # noqa: E402
from dmdl_cli.model.loading import initial_model  # noqa: E402
from dmdl_cli.recipe import load_recipe  # noqa: E402
from dmdl_cli.runtime import select_runtime  # noqa: E402
from dmdl_cli.workspace import Workspace  # noqa: E402


def all_search(model, cache, index, test_rows, runtime, recipe) -> dict:
    feats = extract_features(model, cache, test_rows, runtime, flip=False,
                             batch_size=recipe.run.feature_batch)  # (N_test, D)
    mean, _, _ = run_protocol(recipe.data.dataset, "all-search", feats, index.select(test_rows),
                              recipe, trials=recipe.eval.trials, shots=recipe.eval.shots)
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--eval-every", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3.5e-4)
    parser.add_argument("--ids-per-batch", type=int, default=16)
    parser.add_argument("--per-modality", type=int, default=2, help="K images per identity and modality")
    parser.add_argument("--temp", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ws = Workspace(args.workspace)
    recipe = load_recipe(ws.root / "recipe.yaml")
    runtime = select_runtime(recipe, deterministic=True)
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    train_rows, test_rows = index.rows(split="train"), index.rows(split="test")
    ids = np.unique(index.pids[train_rows])
    members = {(p, m): train_rows[(index.pids[train_rows] == p) & (index.modality[train_rows] == m)]
               for p in ids for m in (VISIBLE, INFRARED)}
    torch.manual_seed(args.seed)
    model = initial_model(recipe).to(runtime.device)
    classifier = torch.nn.Parameter(F.normalize(torch.randn(len(ids), model.feat_dim), dim=1))
    optimizer = torch.optim.Adam([*model.parameters(), classifier], lr=args.lr,
                                 weight_decay=recipe.stage1.weight_decay)
    rng = np.random.default_rng(args.seed)
    label_of = {p: i for i, p in enumerate(ids)}

    def report(step: int, seconds: float, loss: float | None) -> None:
        m = all_search(model, cache, index, test_rows, runtime, recipe)
        loss_text = "" if loss is None else f"  train loss {loss:6.3f}"
        print(f"step {step:5d}  all-search Rank-1 {100 * m['cmc'][0]:5.1f}  mAP {100 * m['mAP']:5.1f}"
              f"  mINP {100 * m['mINP']:5.1f}{loss_text}  ({seconds:.0f} s)", flush=True)

    print(f"{recipe.model.arch} {recipe.data.height}x{recipe.data.width}, {len(ids)} train identities "
          f"(true labels: an upper bound, not a dmdl result), lr {args.lr}, "
          f"{args.ids_per_batch} ids x {args.per_modality}+{args.per_modality} images per step")
    report(0, 0.0, None)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        chosen = rng.choice(ids, size=min(args.ids_per_batch, len(ids)), replace=False)
        rows = np.concatenate([rng.choice(members[(p, m)], args.per_modality, replace=True)
                               for p in chosen for m in (VISIBLE, INFRARED)])
        images = torch.from_numpy(read_rows(cache, rows)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        flip = torch.from_numpy(rng.random(len(rows)) < 0.5)
        images[flip] = torch.flip(images[flip], dims=[3])
        target = torch.tensor([label_of[p] for p in index.pids[rows]], device=runtime.device)
        model.train()
        _, bn = model(runtime.to_input(normalize_batch(images)))  # (B, D)
        logits = F.normalize(bn.float(), dim=1) @ F.normalize(classifier, dim=1).T / args.temp
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            report(step, time.perf_counter() - start, loss.item())


if __name__ == "__main__":
    main()
