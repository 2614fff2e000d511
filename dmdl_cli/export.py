"""Stage `export`: the embedding network as ONNX and/or TorchScript, checked against PyTorch.

Writes into ``WS/export/``:

* ``model.onnx`` (``--format onnx|both``): the eval-mode embedding network. Opset <= 17 goes
  through torch's TorchScript-based exporter (``dynamo=False``: fast, proven on ResNets, emits
  the requested opset natively); opset >= 18 through the ``torch.export``-based one.
* ``model.ts`` (``--format torchscript|both``): the same network traced with ``torch.jit.trace``.
* ``preprocess.json``: everything a deployment needs to feed the graph and read its output
  (input size, RGB order, 0-255 -> /255, ImageNet mean/std, NCHW, batch, output size, whether
  flip averaging is included: it is not), the checkpoint name and sha256, the recipe hash,
  file sizes / checksums, and the parity figures.

**The graph takes the already normalised float tensor** ``(B, 3, H, W)``:
``x = (rgb / 255 - mean) / std`` per channel (:func:`~dmdl_cli.model.backbone.normalize_batch`,
the one preprocessing shared by training, evaluation and export), and returns the L2-normalised
embedding ``(B, D)``. Flip averaging (what ``dmdl evaluate`` does) is not baked in: run the graph
on ``x`` and on ``x[..., ::-1]`` (mirrored along W), add the two outputs, L2-normalise the sum.

GeM pooling is exported with its exponent as a constant (``Clip -> Pow(p) -> ReduceMean ->
Pow(1/p)``), without the autocast guard the training module carries.

The parity check runs each exported file (onnxruntime's CPUExecutionProvider; ``torch.jit.load``)
and the PyTorch model on real images of the workspace cache (test rows, or train rows if there
are none) and fails when the largest absolute difference of the embeddings exceeds
``tolerance`` (1e-4 in fp32). Files are renamed into place only when every check passed, so a
failed export leaves an earlier one untouched. With ``dynamic_batch`` the check also runs
batches of 1 and 7; without it the graph has a fixed batch of 1.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from dmdl_cli import __version__
from dmdl_cli.atomic import atomic_output, remove_temporaries, sha256_file, write_failure
from dmdl_cli.console import console, log
from dmdl_cli.context import StageContext
from dmdl_cli.data.cache import read_rows
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import IMAGENET_MEAN, IMAGENET_STD, GeM, ReIDNet, normalize_batch
from dmdl_cli.model.loading import LoadedModel
from dmdl_cli.recipe import Recipe

__all__ = [
    "FORMATS",
    "FILES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "export_model",
    "exportable_model",
    "export_onnx",
    "export_torchscript",
    "onnx_runner",
    "torchscript_runner",
    "parity",
    "parity_rows",
    "reference_embeddings",
    "require_onnx",
]

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
PREPROCESS_FILE = "preprocess.json"
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
#: Highest opset sent through the TorchScript-based ONNX exporter; higher ones use dynamo.
LEGACY_MAX_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 23
#: Batch sizes checked in addition to the full parity batch when the batch is dynamic.
DYNAMIC_CHECK_BATCHES = (1, 7)
_EXTRA_HINT = "pip install 'dmdl[export]' (or `make venv`)"

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 -> (B, D) float32


# --------------------------------------------------------------------------------------------
# the network as exported
# --------------------------------------------------------------------------------------------
class StaticGeM(nn.Module):
    """GeM with a constant exponent: ``(B, C, H, W) -> (B, C)``, same value as :class:`GeM`.

    Exports as ``Clip(min=eps) -> Pow(p) -> ReduceMean(H, W) -> Pow(1/p)`` with scalar
    constants, with no cast of a parameter and no autocast region in the graph.
    """

    def __init__(self, p: float, eps: float) -> None:
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


def exportable_model(model: ReIDNet) -> ReIDNet:
    """A frozen eval-mode copy of ``model`` whose GeM pooling exports cleanly (see StaticGeM).

    ``model`` itself is left as it was.
    """
    net = copy.deepcopy(model).cpu().float().eval()
    if isinstance(net.pool, GeM):
        net.pool = StaticGeM(float(net.pool.p.detach()), net.pool.eps)
    for param in net.parameters():
        param.requires_grad_(False)
    return net


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation notices for torch.jit / the TorchScript-based exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*onnx.*", category=UserWarning)
        yield


def require_onnx(opset: int) -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a DmdlError naming the export extra when they are missing."""
    try:
        import onnx
        import onnxruntime
        if opset > LEGACY_MAX_OPSET:
            import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
    except ImportError as err:
        raise DmdlError(
            f"ONNX export needs the export extra ({err.name or 'onnx/onnxruntime'} is not "
            f"installed): {_EXTRA_HINT}; `--format torchscript` works without it"
        ) from None
    return onnx, onnxruntime


# --------------------------------------------------------------------------------------------
# exporters: each writes one file and says how
# --------------------------------------------------------------------------------------------
def _example(height: int, width: int, dynamic_batch: bool) -> torch.Tensor:
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced at 2.
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2 if dynamic_batch else 1, 3, height, width, generator=gen)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path, *, opset: int,
                dynamic_batch: bool) -> str:
    """Write ``net`` as ONNX to ``path`` (checked with onnx.checker); returns the exporter name."""
    onnx, _ = require_onnx(opset)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    try:
        with _quiet_torch(), torch.no_grad():
            if opset <= LEGACY_MAX_OPSET:
                exporter = "torch.onnx (TorchScript-based)"
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset,
                                  dynamic_axes=axes, do_constant_folding=True, **names)
            else:
                exporter = "torch.onnx (torch.export-based)"
                shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset,
                                            dynamic_shapes=shapes, verbose=False, **names)
                Path(path).write_bytes(program.model_proto.SerializeToString())
        onnx.checker.check_model(str(path))
    except DmdlError:
        raise
    except Exception as err:  # noqa: BLE001 - exporter failures become one actionable line
        disk = write_failure(err)
        if disk is not None:  # a full disk, not the opset: atomic_output names the file
            raise disk from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        other = 18 if opset <= LEGACY_MAX_OPSET else LEGACY_MAX_OPSET
        raise DmdlError(
            f"ONNX export at opset {opset} failed ({type(err).__name__}: {first}); try "
            f"--opset {other}, or --format torchscript"
        ) from None
    return exporter


def export_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``net`` traced with ``torch.jit.trace`` to ``path``; returns the exporter name."""
    try:
        with _quiet_torch(), torch.no_grad():
            traced = torch.jit.trace(net, (example,), check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DmdlError(f"TorchScript export failed ({type(err).__name__}: {first}); "
                        "try --format onnx") from None
    Path(path).write_bytes(buffer.getvalue())
    return "torch.jit.trace"


def onnx_runner(path: Path, *, threads: int | None = None) -> Runner:
    """Run an exported ONNX file with onnxruntime's CPUExecutionProvider on ``threads`` threads
    (default: as many as torch uses, so ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` apply)."""
    _, ort = require_onnx(LEGACY_MAX_OPSET)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # idle workers sleep instead of spinning: the check alternates with PyTorch on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def torchscript_runner(path: Path) -> Runner:
    """Run an exported TorchScript file on the CPU."""
    with _quiet_torch():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def torch_runner(model: nn.Module) -> Runner:
    """The PyTorch reference: ``model`` in eval mode, fp32, CPU."""
    model = model.cpu().float().eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


_EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}
_RUNNERS = {"onnx": onnx_runner, "torchscript": torchscript_runner}


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
def reference_embeddings(reference: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """``reference`` on ``images`` ``(N, 3, H, W)`` fed in chunks of ``batch`` -> ``(N, D)``."""
    return np.concatenate([np.asarray(reference(images[s:s + batch]), dtype=np.float32)
                           for s in range(0, len(images), batch)])


def parity(exported: Runner, want: np.ndarray, images: np.ndarray, batch: int) -> dict[str, Any]:
    """Compare ``exported`` on ``images`` ``(N, 3, H, W)`` fed in chunks of ``batch`` with the
    reference embeddings ``want`` ``(N, D)`` (:func:`reference_embeddings`, same chunks).

    Returns ``{"batch", "images", "max_abs_diff", "min_cosine"}`` over all N embeddings.
    """
    chunks = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        out = np.asarray(exported(chunk), dtype=np.float32)  # (b, D)
        if out.shape != (len(chunk), want.shape[1]):
            raise DmdlError(f"the exported model returned {out.shape} for a batch of "
                            f"{len(chunk)}, PyTorch {(len(chunk), want.shape[1])}: the export is "
                            "broken; try another --opset or --format")
        chunks.append(out)
    got = np.concatenate(chunks)  # (N, D)
    if not np.isfinite(got).all():
        return {"batch": batch, "images": len(images), "max_abs_diff": float("inf"),
                "min_cosine": float("nan")}
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cos = (got * want).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"batch": batch, "images": len(images), "max_abs_diff": float(np.abs(got - want).max()),
            "min_cosine": float(cos.min())}


def parity_rows(index_split: np.ndarray, count: int) -> tuple[np.ndarray, str]:
    """Up to ``count`` rows spread evenly over the test rows (train rows when there are none)."""
    test = np.flatnonzero(index_split == "test")
    rows, source = (test, "test") if len(test) else (np.flatnonzero(index_split == "train"), "train")
    if len(rows) == 0:
        raise DmdlError("the workspace index is empty: no images to check the export on; "
                        "re-run `dmdl prepare-data` with the options that prepared the workspace")
    pick = np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(np.int64))
    return rows[pick], source


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def _formats(fmt: str) -> tuple[str, ...]:
    fmt = fmt.lower()
    if fmt == "both":
        return FORMATS
    if fmt in FORMATS:
        return (fmt,)
    raise DmdlError(f"--format {fmt}: choose onnx, torchscript or both")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _describe(loaded: LoadedModel, recipe: Recipe, height: int, width: int, dynamic_batch: bool,
              checkpoint_path: Path | None) -> dict[str, Any]:
    batch: Any = "batch" if dynamic_batch else 1
    return {
        "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dmdl_version": __version__,
        "model": {
            "arch": loaded.model.arch,
            "embedding_dim": int(loaded.model.feat_dim),
            "checkpoint": loaded.name,
            "checkpoint_path": str(checkpoint_path) if checkpoint_path else None,
            "checkpoint_sha256": loaded.sha256,
            "description": loaded.description,
            "stage": loaded.meta.get("stage"),
            # numbered from 1 like every epoch a person reads (the checkpoint meta counts from 0)
            "epoch": loaded.meta["epoch"] + 1 if isinstance(loaded.meta.get("epoch"), int) else None,
        },
        "recipe_hash": recipe.hash(),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": [batch, 3, height, width],
            "dynamic_batch": dynamic_batch,
            "normalization_in_graph": False,
        },
        "preprocess": {
            "steps": [
                "decode the image and convert it to RGB (a grey / infrared image becomes three "
                "equal channels)",
                f"resize to height {height} x width {width} with {recipe.data.resize} filtering "
                f"(PIL Image.{recipe.data.resize.upper()}, as the dmdl image cache of this model did)",
                "uint8 HWC -> float32 CHW, stack into a batch NCHW",
                "x = (x / 255 - mean) / std per channel (mean/std below, RGB order)",
            ],
            "height": height,
            "width": width,
            "resize": recipe.data.resize,
            "channel_order": "RGB",
            "value_range": [0, 255],
            "scale": 1.0 / 255.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "formula": "x = (rgb_uint8 / 255 - mean) / std",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": [batch, int(loaded.model.feat_dim)],
            "l2_normalized": True,
            "similarity": "cosine = dot product of two embeddings",
        },
        "flip_averaging": {
            "included": False,
            "how": "run the graph on x and on x mirrored along W (x[..., ::-1]), add the two "
                   "embeddings and L2-normalise the sum; dmdl evaluate and "
                   "dmdl_cli.embed(flip=True) do this",
        },
        "files": {},
        "parity": {},
    }


def export_model(
    ctx: StageContext,
    *,
    fmt: str = "both",
    opset: int = 17,
    dynamic_batch: bool = False,
    tolerance: float = 1e-4,
    parity_images: int = 8,
) -> dict[str, Any]:
    """Export the checkpoint's embedding network; returns what ``preprocess.json`` holds.

    The checkpoint is ``ctx.checkpoint`` (the newest stage result, ``imagenet`` or a path).
    ``fmt``: ``onnx``, ``torchscript`` or ``both``. ``tolerance``: largest allowed absolute
    difference of an embedding value between an exported file and PyTorch (fp32) on
    ``parity_images`` cache images. Raises :class:`DmdlError` when a check fails; nothing is
    renamed into ``WS/export`` then. The runner holds the export lock before the checkpoint is
    read.
    """
    formats = _formats(fmt)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise DmdlError(f"--opset {opset}: choose {MIN_OPSET}..{MAX_OPSET} (default 17)")
    if "onnx" in formats:
        require_onnx(opset)  # fail before any work when the extra is missing
    ws, recipe = ctx.ws, ctx.recipe
    loaded = ctx.model()
    height, width = recipe.data.height, recipe.data.width  # the checkpoint's (checked on load)
    check = _ParityCheck.on_cache(ctx, loaded.model, parity_images, tolerance, dynamic_batch)
    out_dir = ctx.folder
    remove_temporaries(out_dir)  # of a killed export: this command holds the export lock alone
    log(f"exporting {escape(loaded.description)} at {height}x{width} "
        f"({'dynamic batch' if dynamic_batch else 'batch 1'}) to {escape(ws.rel(out_dir))}/")
    info = _describe(loaded, recipe, height, width, dynamic_batch,
                     loaded.path.resolve() if loaded.path else None)
    info["parity"] = check.describe()
    net, example = exportable_model(loaded.model), _example(height, width, dynamic_batch)
    with contextlib.ExitStack() as stack:
        # entered first, so renamed last: preprocess.json appears after the files it describes
        preprocess_tmp = stack.enter_context(atomic_output(out_dir / PREPROCESS_FILE))
        for name in formats:
            tmp = stack.enter_context(atomic_output(out_dir / FILES[name]))
            info["files"][name] = _export_one(name, net, example, tmp, opset, dynamic_batch)
            check.run(name, tmp, info["files"][name])
        check.report(ws.rel(out_dir))
        preprocess_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _record_exports(ctx, out_dir, formats, info)
    return info


@dataclass
class _ParityCheck:
    """The exported files against PyTorch on real cache images (module docstring)."""

    images: np.ndarray  # (N, 3, H, W) float32, normalised
    split: str  # the rows they are: "test" ("train" when there are no test rows)
    cache: str  # the cache file, workspace-relative
    tolerance: float
    wanted: dict[int, np.ndarray]  # batch size -> (N, D) reference embeddings fed in that batch
    checks: list[dict[str, Any]] = field(default_factory=list)
    table_rows: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @classmethod
    def on_cache(cls, ctx: StageContext, model: nn.Module, count: int, tolerance: float,
                 dynamic_batch: bool) -> "_ParityCheck":
        rows, split = parity_rows(ctx.index.split, count)
        images = normalize_batch(torch.from_numpy(read_rows(ctx.cache, rows)).permute(0, 3, 1, 2))
        images_np = images.numpy()
        batches = [len(images_np), *DYNAMIC_CHECK_BATCHES] if dynamic_batch else [1]
        reference = torch_runner(model)
        cache = ctx.ws.rel(ctx.ws.cache_path(ctx.recipe.data.height, ctx.recipe.data.width))
        return cls(images_np, split, cache, tolerance,
                   {b: reference_embeddings(reference, images_np, b) for b in batches})

    def describe(self) -> dict[str, Any]:
        """The ``parity`` entry of preprocess.json; its ``checks`` fill in as files are checked."""
        return {"images": len(self.images), "rows": f"{self.split} rows of {self.cache}",
                "tolerance": self.tolerance,
                "reference": "PyTorch eval mode, fp32, CPU",
                "runtime": {"onnx": "onnxruntime CPUExecutionProvider",
                            "torchscript": "torch.jit.load, CPU"},
                "checks": self.checks}

    def run(self, name: str, path: Path, file_info: dict[str, Any]) -> None:
        """Run the exported file ``path`` at every batch size and compare with PyTorch."""
        runner = _RUNNERS[name](path)
        for i, batch in enumerate(self.wanted):
            check = parity(runner, self.wanted[batch], self.images, batch)
            check["format"] = name
            check["passed"] = bool(check["max_abs_diff"] <= self.tolerance)
            self.checks.append(check)
            if not check["passed"]:
                self.failures.append(f"{name} at batch {batch}: max |diff| {check['max_abs_diff']:.2e}")
            first = [name, FILES[name], _mib(file_info["bytes"]), f"{file_info['export_seconds']:.1f} s"]
            self.table_rows.append([*(first if i == 0 else [""] * 4), str(batch),
                                    f"{check['max_abs_diff']:.2e}", f"{check['min_cosine']:.7f}",
                                    "[green]ok[/]" if check["passed"] else "[bold red]FAIL[/]"])

    def report(self, out_dir: str) -> None:
        """Print the parity table; refuse (nothing renamed into place) when a check failed."""
        console.print(_parity_table(self.table_rows, len(self.images), self.split, self.tolerance))
        if self.failures:
            raise DmdlError(
                f"export parity check failed ({'; '.join(self.failures)} > {self.tolerance:g}) on "
                f"{len(self.images)} images of {self.cache}: the exported graph does not match "
                f"PyTorch; nothing was written to {out_dir}; try another --opset or --format")


def _export_one(name: str, net: nn.Module, example: torch.Tensor, tmp: Path, opset: int,
                dynamic_batch: bool) -> dict[str, Any]:
    """Export ``net`` as format ``name`` into ``tmp``; returns its entry of ``files``."""
    start = time.perf_counter()
    if name == "onnx":
        exporter = export_onnx(net, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
    else:
        exporter = export_torchscript(net, example, tmp)
    return {"path": FILES[name], "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
            "exporter": exporter, "export_seconds": round(time.perf_counter() - start, 2),
            **({"opset": opset} if name == "onnx" else {})}


def _record_exports(ctx: StageContext, out_dir: Path, formats: tuple[str, ...],
                    info: dict[str, Any]) -> None:
    """Every file is in place: record them, drop stale exports of an earlier run, say so."""
    ctx.record_output(*(out_dir / FILES[name] for name in formats), out_dir / PREPROCESS_FILE)
    for name in set(FORMATS) - set(formats):
        stale = out_dir / FILES[name]
        if stale.exists():
            stale.unlink()
            log(f"removed {escape(ctx.ws.rel(stale))} (an earlier export, not described by "
                f"{PREPROCESS_FILE})")
    if ctx.ledger is not None:
        ctx.ledger.set(files={n: info["files"][n]["bytes"] for n in formats},
                    max_abs_diff=max(c["max_abs_diff"] for c in info["parity"]["checks"]))
    written = ", ".join(f"{out_dir / FILES[n]} ({_mib(info['files'][n]['bytes'])})" for n in formats)
    log(f"wrote {escape(written)} and {escape(str(out_dir / PREPROCESS_FILE))}")


def _parity_table(rows: list[list[str]], n_images: int, source: str, tolerance: float) -> Table:
    table = Table(title=f"export parity vs PyTorch fp32 on {n_images} {source} images "
                        f"(tolerance {tolerance:g})")
    for col, justify in (("format", "left"), ("file", "left"), ("size", "right"),
                         ("export", "right"), ("batch", "right"), ("max |diff|", "right"),
                         ("min cosine", "right"), ("check", "left")):
        table.add_column(col, justify=justify)
    for row in rows:
        table.add_row(*row)
    return table
