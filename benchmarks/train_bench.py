"""Training throughput: images/s and the share of step time spent waiting for data.

Runs the stage-1 step (two augmented views, cluster-memory contrastive loss, MMD alignment,
memory update) on random images with random pseudo labels, as the training loop does.
Prints one row per configuration; never asserts. Examples:

    python benchmarks/train_bench.py                          # resnet18 128x64 on the CPU
    python benchmarks/train_bench.py --arch resnet50_agw --height 288 --width 144 --amp fp16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmdl_cli.data.augment import AugmentConfig  # noqa: E402
from dmdl_cli.data.sampling import ResumableBatchSampler, epoch_batches  # noqa: E402
from dmdl_cli.data.train_dataset import ViewDataset, collate_items  # noqa: E402
from dmdl_cli.model.backbone import build_model, normalize_batch  # noqa: E402
from dmdl_cli.training.losses import contrastive_loss, mmd_multi_kernel  # noqa: E402
from dmdl_cli.recipe import AMP_MODES, Recipe  # noqa: E402
from dmdl_cli.runtime import AMP_DTYPES  # noqa: E402
from dmdl_cli.training.memory import ClusterMemory  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = AMP_DTYPES[args.amp] if device.type == "cuda" else None
    n, h, w = args.images, args.height, args.width
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.u8"
        cache = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, h, w, 3))
        cache[:] = rng.integers(0, 256, size=cache.shape, dtype=np.uint8)
        cache.flush()
        modality = (np.arange(n) % 3 == 2).astype(np.int8)  # 2/3 visible, 1/3 infrared
        labels = rng.integers(0, args.clusters, size=n)
        dataset = ViewDataset(path, modality, AugmentConfig(), shape=(n, h, w, 3))
        batches = epoch_batches(labels, modality=modality, num_instances=args.instances,
                                clusters_per_batch=args.clusters_per_batch, iters=args.steps + args.warmup,
                                seed=0, epoch=0)
        steps = [[(row, seed, view) for view in (0, 1) for row, seed in keys] for keys in batches]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=ResumableBatchSampler(steps),
                                             collate_fn=collate_items, num_workers=args.workers,
                                             pin_memory=device.type == "cuda",
                                             prefetch_factor=4 if args.workers else None)
        model = build_model(args.arch).to(device).train()
        if args.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        stage = Recipe().stage1  # the memory of stage 1 with the recipe's defaults
        memory = ClusterMemory(model.feat_dim, args.clusters, temp=stage.temp,
                               momentum=stage.momentum, rule=stage.memory_update).to(device)
        memory.features.copy_(F.normalize(torch.randn(args.clusters, model.feat_dim), dim=1))
        optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4)
        scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        wait = compute = 0.0
        images = 0
        t0 = time.perf_counter()
        for step, raw in enumerate(loader):
            t1 = time.perf_counter()
            x = normalize_batch(raw["images"]).to(device, non_blocking=True)  # (2B, 3, H, W) views A, B
            if args.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            b = raw["images"].shape[0] // 2
            y = torch.from_numpy(labels[raw["row"][:b].numpy()]).to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                _, bn = model(x)
            f = F.normalize(bn.float(), dim=1)
            loss = contrastive_loss(memory.logits(f[:b]), y) + contrastive_loss(memory.logits(f[b:]), y)
            loss = loss + mmd_multi_kernel(f[:b], f[b:])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                memory.update(torch.cat([f[:b], f[b:]]), torch.cat([y, y]))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if step >= args.warmup:
                wait += t1 - t0
                compute += t2 - t1
                images += 2 * b
            t0 = time.perf_counter()
    total = wait + compute
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "images_per_s": images / total, "data_wait_share": wait / total, "step_s": total / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--amp", default="fp16", choices=AMP_MODES)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--clusters-per-batch", type=int, default=8)
    parser.add_argument("--instances", type=int, default=4, help="K per cluster and modality")
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    r = run(args)
    batch = 2 * 2 * args.clusters_per_batch * args.instances
    print(f"{'arch':<14}{'input':>9}{'batch':>7}{'amp':>6}  {'device':<24}{'img/s':>9}{'data wait':>11}{'s/step':>8}")
    amp = args.amp if r["device"].startswith("cpu") is False else "off"
    print(f"{args.arch:<14}{args.height:>5}x{args.width:<3}{batch:>7}{amp:>6}  {r['device']:<24}"
          f"{r['images_per_s']:>9.1f}{100 * r['data_wait_share']:>10.1f}%{r['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
