"""Benchmark of `dmdl export`: export time, file sizes, parity, onnxruntime vs torch CPU latency.

For each architecture (default ``resnet18`` and ``resnet50_agw``, seeded random initialisation
with randomised BatchNorm statistics so that no layer is trivially the identity) at the paper's
input size 288 x 144, the network as ``dmdl export`` writes it (:func:`exportable_model`, dynamic
batch) is exported

* to ONNX with each requested opset (17: TorchScript-based exporter; 18: torch.export-based),
* to TorchScript (``torch.jit.trace``),

and every file is timed, measured, checked against the PyTorch model (max |diff| and min cosine
of the L2-normalised embeddings over ``--images`` random normalised inputs, batch 8 then 1) and
timed on the CPU: PyTorch eager, TorchScript and onnxruntime (CPUExecutionProvider), median of
``--repeats`` runs after one warm-up, at batch 1 and ``--batch``, all with ``--threads`` threads.

Run from the repository root: ``python benchmarks/export_bench.py [--threads 1]``. Timings
on a shared machine are noisy; the parity figures are not.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dmdl_cli.export import (  # noqa: E402
    export_onnx,
    export_torchscript,
    exportable_model,
    onnx_runner,
    parity,
    reference_embeddings,
    torch_runner,
    torchscript_runner,
)
from dmdl_cli.model.backbone import build_model  # noqa: E402


def make_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, pretrained=None)
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
            mod.running_var.copy_(1.0 + torch.rand(mod.running_var.shape, generator=gen))
            mod.weight.data.copy_(0.5 + 0.5 * torch.rand(mod.weight.shape, generator=gen))
            mod.bias.data.copy_(0.05 * torch.randn(mod.bias.shape, generator=gen))
    return model.eval()


def latency(run, x: np.ndarray, repeats: int) -> float:
    """Median seconds of ``run(x)`` over ``repeats`` runs after one warm-up."""
    run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50_agw"])
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--opsets", nargs="+", type=int, default=[17, 18])
    parser.add_argument("--images", type=int, default=8, help="parity images")
    parser.add_argument("--batch", type=int, default=8, help="second latency batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    console = Console(width=160)
    rng = np.random.default_rng(args.seed)
    h, w = args.height, args.width

    files = Table(title=f"export at {h}x{w} (dynamic batch); parity vs PyTorch fp32 on "
                        f"{args.images} inputs, batch {args.images} and 1")
    for col in ("arch", "format", "exporter", "export s", "size MiB", "max |diff|", "min cosine"):
        files.add_column(col, justify="left" if col in ("arch", "format", "exporter") else "right")
    lat = Table(title=f"CPU latency, median of {args.repeats} (ms), {threads} thread(s), "
                      f"torch {torch.__version__}")
    for col in ("arch", "runtime", "batch 1", f"batch {args.batch}", f"img/s at {args.batch}"):
        lat.add_column(col, justify="left" if col in ("arch", "runtime") else "right")

    with tempfile.TemporaryDirectory(prefix="dmdl-export-bench-") as tmp:
        for arch in args.archs:
            model = make_model(arch, args.seed)
            net = exportable_model(model)
            images = rng.standard_normal((args.images, 3, h, w)).astype(np.float32)
            reference = torch_runner(model)
            wanted = {b: reference_embeddings(reference, images, b) for b in (args.images, 1)}
            example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
            runners = {"torch eager": reference}
            jobs = [(f"onnx opset {o}", "onnx", o) for o in args.opsets] + [("torchscript", "ts", 0)]
            for label, kind, opset in jobs:
                path = Path(tmp) / f"{arch}-{opset}.{kind}"
                start = time.perf_counter()
                if kind == "onnx":
                    exporter = export_onnx(net, example, path, opset=opset, dynamic_batch=True)
                    run = onnx_runner(path, threads=threads)
                else:
                    exporter = export_torchscript(net, example, path)
                    run = torchscript_runner(path)
                seconds = time.perf_counter() - start
                checks = [parity(run, wanted[b], images, b) for b in wanted]
                files.add_row(arch, label, exporter.replace("torch.onnx ", ""), f"{seconds:.1f}",
                              f"{path.stat().st_size / 2**20:.1f}",
                              f"{max(c['max_abs_diff'] for c in checks):.2e}",
                              f"{min(c['min_cosine'] for c in checks):.8f}")
                if kind == "ts":
                    runners["torchscript"] = run
                elif opset == args.opsets[0]:
                    runners[f"onnxruntime ({label})"] = run
                console.print(f"{arch}: {label} done ({seconds:.1f} s)")
            for name, run in runners.items():
                one = latency(run, images[:1], args.repeats)
                many_x = np.concatenate([images] * -(-args.batch // len(images)))[:args.batch]
                many = latency(run, many_x, args.repeats)
                lat.add_row(arch, name, f"{1000 * one:.1f}", f"{1000 * many:.1f}",
                            f"{args.batch / many:.1f}")
                console.print(f"{arch}: {name} latency done")
    console.print(files)
    console.print(lat)


if __name__ == "__main__":
    main()
