"""Source pretraining: the CPU miniature of "start from ImageNet weights".

The paper's runs start from an ImageNet backbone: weights learnt with labels, on another
domain, from visible images only. The demo starts from scratch, where the unsupervised pipeline
has little to cluster with. This script makes the miniature of ImageNet for the synthetic
benchmarks: it trains the recipe's backbone (``recipes/demo.yaml``: arch, input size, GeM,
last stride), **with labels**, on the **visible** images of a synthetic *source* set generated
with another seed (other cameras: another domain) and a disjoint identity range (other
people), and saves the trunk as a plain state dict that ``model.pretrained: <file>`` loads.
No infrared image is read and nothing of the target set (the demo / ablation set) is used for
training.

    python benchmarks/source_pretrain.py [--recipe recipes/demo.yaml] \\
        [--out runs/source/backbone.pth] [--target-workspace runs/demo] [--threads 1] [--force]

Loss: cross-entropy of a linear classifier on the BNNeck feature (label smoothing) plus a
batch-hard triplet on the pooled feature, P identities x K images per step, standard
augmentation (pad + crop, flip, random erasing; no colour operation unless ``--grayscale-p``
turns a share of the views gray), Adam. Seeded. Re-running
with the same settings is a no-op (``<out>.json`` holds the settings and the file's sha256);
other settings retrain.

It prints two sanity figures: visible->visible retrieval (cross-camera) of the source set's
held-out identities before and after, and, with ``--target-workspace`` (a prepared dmdl
workspace, e.g. the ablation's ``data``), the target set's all-search IR->visible figures of the
recipe's random initialisation against the pretrained backbone (stage 0: no target training).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmdl_cli.atomic import atomic_write_bytes, atomic_write_json, sha256_file  # noqa: E402
from dmdl_cli.console import log, make_progress  # noqa: E402
from dmdl_cli.data.augment import AugmentConfig, standard_view  # noqa: E402
from dmdl_cli.data.cache import build_cache, open_cache, read_rows  # noqa: E402
from dmdl_cli.data.index import INFRARED, VISIBLE, IndexTable, read_index  # noqa: E402
from dmdl_cli.data.sources import read_sysu  # noqa: E402
from dmdl_cli.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dmdl_cli.evaluation.evaluate import run_protocol  # noqa: E402
from dmdl_cli.features.extract import extract_features  # noqa: E402
from dmdl_cli.evaluation.metrics import rank_metrics  # noqa: E402
from dmdl_cli.model.backbone import build_model, normalize_batch  # noqa: E402
from dmdl_cli.model.loading import initial_model  # noqa: E402
from dmdl_cli.recipe import Recipe, load_recipe  # noqa: E402
from dmdl_cli.runtime import Runtime, select_runtime  # noqa: E402
from dmdl_cli.training.losses import batch_hard_triplet  # noqa: E402
from dmdl_cli.workspace import Workspace  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """Everything the saved weights depend on (the stamp compares all of it)."""

    arch: str
    height: int
    width: int
    gem_p: float
    last_stride: int
    pad: int
    flip_p: float
    erasing_p: float
    data_seed: int = 1  # the demo / ablation set is seed 0
    first_pid: int = 1001  # the demo / ablation set holds persons 1..90
    train_ids: int = 200
    heldout_ids: int = 40  # visible->visible sanity check only
    images_per_cam: int = 5
    epochs: int = 4
    iters: int = 75
    ids_per_batch: int = 16
    instances: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    triplet_margin: float = 0.3
    grayscale_p: float = 0.0  # share of training views turned to gray (luma in all channels)
    seed: int = 0
    format: int = 1  # bump when the training code changes what a setting means


def settings_from(recipe: Recipe, overrides: dict[str, Any]) -> SourceSettings:
    """The recipe's network and augmentation, plus the source-training defaults and overrides."""
    return SourceSettings(
        arch=recipe.model.arch, height=recipe.data.height, width=recipe.data.width,
        gem_p=recipe.model.gem_p, last_stride=recipe.model.last_stride,
        pad=recipe.augment.pad, flip_p=recipe.augment.flip_p, erasing_p=recipe.augment.erasing_p,
        **{k: v for k, v in overrides.items() if v is not None},
    )


def generator_config(synthetic: SyntheticConfig | None = None) -> dict[str, Any]:
    """The synthetic generator's settings (the recipe's ``synthetic:`` section without its ids
    and seed, which the source set takes from SourceSettings): part of what the weights depend on."""
    return (synthetic or SyntheticConfig()).generator_settings()


def stamp_path(out: Path) -> Path:
    return out.with_suffix(".json")


def is_up_to_date(out: Path, settings: SourceSettings, synthetic: SyntheticConfig | None = None) -> bool:
    """True when ``out`` exists, its stamp holds these settings and the file's sha256."""
    stamp = stamp_path(out)
    if not (out.is_file() and stamp.is_file()):
        return False
    try:
        saved = json.loads(stamp.read_text())
    except ValueError:
        return False
    return (saved.get("settings") == dataclasses.asdict(settings) and saved.get("generator") == generator_config(synthetic)
            and saved.get("sha256") == sha256_file(out))


# --------------------------------------------------------------------------------------------
# the source set: visible images only
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SourceData:
    table: IndexTable  # visible images of the source set (train and held-out identities)
    cache: np.ndarray  # (N, H, W, 3) uint8, row i = table row i
    train_rows: np.ndarray  # positions of the training identities' images
    heldout_rows: np.ndarray
    labels: np.ndarray  # (N,) class index of every training image, -1 for held-out ones
    num_classes: int


def source_data(folder: Path, s: SourceSettings, synthetic: SyntheticConfig | None = None) -> SourceData:
    """Generate the source set once (kept under ``folder``) with the generator settings of
    ``synthetic`` (the recipe's section), index its visible images, cache them."""
    config = hashlib.sha256(json.dumps(generator_config(synthetic), sort_keys=True).encode()).hexdigest()[:8]
    key = f"seed{s.data_seed}-pid{s.first_pid}-{s.train_ids}+{s.heldout_ids}x{s.images_per_cam}-g{config}"
    root = folder / f"synthetic-{key}"
    if not (root / "synthetic.json").is_file():
        summary = generate(root, ids=(s.train_ids, 0, s.heldout_ids), seed=s.data_seed,
                           images_per_cam=s.images_per_cam, first_pid=s.first_pid, overwrite=True,
                           config=synthetic)
        log(f"generated the source set {root} ({summary['images']} images, {summary['seconds']:.1f} s; "
            f"only its visible images are read)")
    full = read_sysu(root)
    table = full.select(full.modality == VISIBLE)
    cache_path = folder / f"visible-{key}-{s.height}x{s.width}.u8"
    if cache_path.is_file():
        cache = open_cache(cache_path, len(table), s.height, s.width)
    else:
        cache = build_cache(table.paths, cache_path, s.height, s.width)
    train_rows, heldout_rows = table.rows(split="train"), table.rows(split="test")
    classes = np.unique(table.pids[train_rows])
    labels = np.full(len(table), -1, dtype=np.int64)
    labels[train_rows] = np.searchsorted(classes, table.pids[train_rows])
    return SourceData(table, cache, train_rows, heldout_rows, labels, len(classes))


def sample_batch(data: SourceData, s: SourceSettings, rng: np.random.Generator) -> np.ndarray:
    """Rows of one batch: ``ids_per_batch`` training identities x ``instances`` images each."""
    classes = rng.choice(data.num_classes, size=min(s.ids_per_batch, data.num_classes), replace=False)
    rows = []
    for c in classes:
        members = data.train_rows[data.labels[data.train_rows] == c]
        rows.append(rng.choice(members, size=s.instances, replace=len(members) < s.instances))
    return np.concatenate(rows)


def augmented(data: SourceData, rows: np.ndarray, cfg: AugmentConfig, grayscale_p: float,
              generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) uint8 standard views of cache ``rows``, a ``grayscale_p`` share of them gray."""
    images = torch.from_numpy(read_rows(data.cache, rows)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    views = torch.stack([standard_view(img, cfg, generator) for img in images])
    if grayscale_p <= 0:
        return views  # no draw: the generator stream is the one without this option
    gray = torch.rand(len(views), generator=generator) < grayscale_p  # (B,)
    if bool(gray.any()):
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        luma = (views[gray].float() * weights).sum(dim=1, keepdim=True).round().clamp(0, 255)
        views[gray] = luma.to(torch.uint8).expand(-1, 3, -1, -1)
    return views


# --------------------------------------------------------------------------------------------
# training and the sanity figures
# --------------------------------------------------------------------------------------------
def train(model: torch.nn.Module, data: SourceData, s: SourceSettings, runtime: Runtime) -> dict:
    """Supervised training on the source set's training identities; returns the last epoch's
    mean loss and batch accuracy."""
    classifier = torch.nn.Linear(model.feat_dim, data.num_classes, bias=False).to(runtime.device)
    torch.nn.init.normal_(classifier.weight, std=0.001)
    optimizer = torch.optim.Adam([*model.parameters(), *classifier.parameters()], lr=s.lr,
                                 weight_decay=s.weight_decay)
    rng = np.random.default_rng([s.seed, 11])
    generator = torch.Generator().manual_seed(s.seed)
    cfg = AugmentConfig(modality_specific=False, pad=s.pad, flip_p=s.flip_p, erasing_p=s.erasing_p)
    batch = min(s.ids_per_batch, data.num_classes) * s.instances
    model.train()
    summary: dict[str, float] = {}
    with make_progress("img") as progress:
        task = progress.add_task("source pretraining", total=s.epochs * s.iters, per_step=batch, info="")
        for epoch in range(s.epochs):
            losses, hits = [], []
            for _ in range(s.iters):
                rows = sample_batch(data, s, rng)
                x = runtime.to_input(normalize_batch(augmented(data, rows, cfg, s.grayscale_p, generator)))
                target = torch.from_numpy(data.labels[rows]).to(runtime.device)
                with runtime.autocast():
                    pool, bn = model(x)  # (B, D) each
                    logits = classifier(bn)  # (B, C)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=s.label_smoothing)
                loss = loss + s.triplet_weight * batch_hard_triplet(pool, target, s.triplet_margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                hits.append((logits.argmax(1) == target).float().mean().item())
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{s.epochs} loss {losses[-1]:.3f}")
            summary = {"loss": float(np.mean(losses)), "train_batch_accuracy": float(np.mean(hits))}
            log(f"source epoch {epoch + 1}/{s.epochs}: loss {summary['loss']:.3f}, "
                f"batch accuracy {100 * summary['train_batch_accuracy']:.1f} %")
    return summary


def cross_camera_retrieval(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> dict:
    """Every image queries all the others of other cameras: ``{"rank1", "mAP"}`` in %."""
    dist = 2.0 - 2.0 * feats @ feats.T  # (N, N); feats (N, D) L2-normalised
    same_cam = cams[:, None] == cams[None, :]  # also removes every query from its own gallery
    m = rank_metrics(dist, pids, pids, cams, cams, exclude=same_cam)
    return {"rank1": 100 * float(m["cmc"][0]), "mAP": 100 * float(m["mAP"])}


def heldout_retrieval(model: torch.nn.Module, data: SourceData, runtime: Runtime) -> dict:
    """Visible->visible retrieval among the held-out identities, other cameras only."""
    rows = data.heldout_rows
    feats = extract_features(model, data.cache, rows, runtime, flip=False,
                             description="held-out features")  # (N, D) L2-normalised
    return cross_camera_retrieval(feats, data.table.pids[rows], data.table.cams[rows])


def target_stage0(weights: Path, target: Path, runtime: Runtime) -> dict:
    """The target workspace's test split, no target training, the recipe's random init vs
    ``weights``: all-search (IR -> visible) and within-modality cross-camera retrieval (what
    stage 1's clustering starts from)."""
    ws = Workspace(target)
    recipe = load_recipe(ws.root / "recipe.yaml")
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    test_rows = index.rows(split="test")
    test = index.select(test_rows)
    out = {}
    for name, pretrained in (("random_init", None), ("source_pretrained", str(weights))):
        recipe.model.pretrained = pretrained
        model = initial_model(recipe).to(runtime.device)
        feats = extract_features(model, cache, test_rows, runtime, flip=False,
                                 batch_size=recipe.run.feature_batch, description=name)
        mean, _, _ = run_protocol(recipe.data.dataset, "all-search", feats, test,
                                  recipe, trials=recipe.eval.trials, shots=recipe.eval.shots)
        out[name] = {"all_search": {"rank1": 100 * float(mean["cmc"][0]), "mAP": 100 * float(mean["mAP"])}}
        for m, label in ((VISIBLE, "visible"), (INFRARED, "infrared")):
            sel = test.modality == m
            out[name][label] = cross_camera_retrieval(feats[sel], test.pids[sel], test.cams[sel])
    return out


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def pretrain(recipe: Recipe, out: Path, s: SourceSettings, *, force: bool = False,
             target: Path | None = None) -> Path:
    """Train and save unless ``out`` is up to date; returns ``out``."""
    if not force and is_up_to_date(out, s, recipe.synthetic):
        log(f"{out} is up to date (settings in {stamp_path(out)}); nothing to do")
        return out
    runtime = select_runtime(recipe)
    data = source_data(out.parent, s, recipe.synthetic)
    log(f"source set: {data.num_classes} training identities, {len(data.train_rows)} visible "
        f"training images, {len(data.heldout_rows)} held-out images; {s.arch} {s.height}x{s.width}, "
        f"{s.epochs} epochs x {s.iters} steps of {min(s.ids_per_batch, data.num_classes)} x {s.instances} images, "
        f"{torch.get_num_threads()} threads")
    torch.manual_seed(s.seed)
    model = build_model(s.arch, pretrained=None, gem_p=s.gem_p, last_stride=s.last_stride)
    model = model.to(runtime.device)
    before = heldout_retrieval(model, data, runtime)
    start = time.perf_counter()
    summary = train(model, data, s, runtime)
    seconds = time.perf_counter() - start
    after = heldout_retrieval(model, data, runtime)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # saved through a buffer: the bytes (and sha256) depend on the weights only
    torch.save({k: v.cpu() for k, v in model.backbone.state_dict().items()}, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    check_loadable(out, model, s)
    report = {"settings": dataclasses.asdict(s), "generator": generator_config(recipe.synthetic), "sha256": sha256_file(out),
              "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), **summary,
              "heldout_visible_before": before, "heldout_visible_after": after}
    if target is not None:
        report["target_stage0"] = target_stage0(out, target, runtime)
    atomic_write_json(stamp_path(out), report)
    log(f"wrote {out} ({seconds:.0f} s of training); held-out visible->visible Rank-1 / mAP "
        f"{before['rank1']:.1f} / {before['mAP']:.1f} untrained -> {after['rank1']:.1f} / {after['mAP']:.1f}")
    for name, figures in report.get("target_stage0", {}).items():
        log(f"target test split, no target training, {name}: " + "; ".join(
            f"{what} Rank-1 {m['rank1']:.1f} mAP {m['mAP']:.1f}" for what, m in figures.items()))
    return out


def check_loadable(out: Path, model: torch.nn.Module, s: SourceSettings) -> None:
    """The saved file loads through ``model.pretrained`` into exactly the trained trunk."""
    loaded = build_model(s.arch, pretrained=str(out), gem_p=s.gem_p, last_stride=s.last_stride)
    for key, value in loaded.backbone.state_dict().items():
        if not torch.equal(value, model.backbone.state_dict()[key].cpu()):
            raise SystemExit(f"{out}: {key} did not round-trip through model.pretrained")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="network and input size")
    parser.add_argument("--out", default="runs/source/backbone.pth")
    parser.add_argument("--target-workspace", type=Path, default=None,
                        help="prepared workspace whose untrained vs pretrained all-search is printed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--force", action="store_true", help="retrain even when up to date")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="recipe override (section.key=value), e.g. data.height=32")
    for f in dataclasses.fields(SourceSettings):
        if f.default is not dataclasses.MISSING and f.name != "format":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe_path = Path(args.recipe) if Path(args.recipe).is_absolute() else REPO / args.recipe
    recipe = load_recipe(recipe_path, overrides=args.sets)
    names = {f.name for f in dataclasses.fields(SourceSettings)}
    settings = settings_from(recipe, {k: v for k, v in vars(args).items() if k in names})
    out = Path(args.out)
    out = out if out.is_absolute() else (Path.cwd() / out)
    return pretrain(recipe, out.resolve(), settings, force=args.force, target=args.target_workspace)


if __name__ == "__main__":
    main()
