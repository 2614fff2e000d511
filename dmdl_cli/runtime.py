"""Where and how tensors run: device, AMP, channels_last, threads, seeding, DDP (torchrun)."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from dmdl_cli.recipe import AMP_MODES, Recipe

# recipe.AMP_MODES, in its order: the dtype each mode autocasts to
AMP_DTYPES = dict(zip(AMP_MODES, (None, torch.float16, torch.bfloat16), strict=True))
# Set to 1 to keep the recipe's AMP and channels_last on the CPU (slow: fp16 kernels on a CPU are
# many times slower than fp32). For tests and `benchmarks/gpu_check.py --cpu`, which exercise
# the GPU's mixed-precision branches on machines without one.
CPU_AMP_ENV = "DMDL_CPU_AMP"


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32 (on the CPU unless DMDL_CPU_AMP=1)
    channels_last: bool
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Move a normalised float batch (B, 3, H, W) to the device in the chosen memory format."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def select_runtime(recipe: Recipe, *, deterministic: bool = False) -> Runtime:
    """GPU when present (AMP and channels_last from the recipe), else fp32 on the CPU (the
    recipe's AMP on the CPU too with ``DMDL_CPU_AMP=1``).

    Under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised here: nccl on GPUs,
    gloo on the CPU; each rank takes GPU ``LOCAL_RANK``. ``run.threads`` sets the CPU threads
    of torch and faiss.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
        os.environ["OMP_NUM_THREADS"] = str(recipe.run.threads)  # faiss reads it (clustering)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic
        amp = AMP_DTYPES[recipe.train.amp]
        channels_last = recipe.train.channels_last
    else:
        device = torch.device("cpu")
        amp, channels_last = None, False
        if os.environ.get(CPU_AMP_ENV) == "1":
            amp, channels_last = AMP_DTYPES[recipe.train.amp], recipe.train.channels_last
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return Runtime(device, amp, channels_last, rank, world_size)


def make_grad_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose small gradients would underflow); a pass-through otherwise
    (bf16 has fp32's exponent range). On the runtime's device, so it also runs on the CPU."""
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, for checkpoints, as tensors and plain containers only (what
    ``torch.load(weights_only=True)`` reads): numpy's MT19937 key becomes an int64 tensor."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["key"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Evaluate ``model`` and restore its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
