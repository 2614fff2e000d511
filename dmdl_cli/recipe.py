"""Typed recipes: every number a paper would print, loaded from YAML and validated on load.

A recipe is a tree of dataclasses. ``load_recipe(path, overlays=..., overrides=...)`` reads the
base YAML file, merges overlay files on top of it (later wins, key by key), applies
``--set a.b=value`` overrides, and validates the result: an unknown key or a value of the wrong
type or out of range raises :class:`~dmdl_cli.errors.DmdlError` naming the key and the file.

How files compose: a data set recipe (``recipes/sysu.yaml``) is complete on its own: any key it
omits takes the default below. An overlay (``recipes/ablation/baseline.yaml``) names only the
keys it changes. ``--set`` is applied last.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from dmdl_cli.datasets import DATASET_NAMES
from dmdl_cli.errors import DmdlError

ARCHS = ("resnet50_agw", "resnet50", "resnet18")
KNN_METHODS = ("exact", "ivf", "hnsw")
ASSOCIATION_METHODS = ("nearest-alternating", "hungarian", "cluster-sample-alternating")
AMP_MODES = ("off", "fp16", "bf16")
# Command-line choices (declared once here; the CLI shows them in --help).
CLUSTER_MODALITIES = ("visible", "infrared", "both")
EXPORT_FORMATS = ("onnx", "torchscript", "both")
TRIPLET_MODES = ("per-modality", "joint")
LOSS_REDUCTIONS = ("sum-modalities", "mean")
MEMORY_UPDATES = ("per-sample", "batch-mean")
INTRA_TARGETS = ("hard", "refined")
# How BatchNorm groups a training batch: "joint" normalises each process's whole forward batch;
# "reference" normalises the slices the reference's multi-GPU DataParallel forwards
# (docs/training.md, "BatchNorm groups").
BN_GROUPS = ("joint", "reference")
# Which memory rows a stage-2 gradient reads: "fixed" the rows of the forward pass; "in-place"
# those the reference's memory backward reads, after earlier backward nodes of the same batch
# moved them (docs/training.md, "The in-place memory gradient").
MEMORY_GRADIENTS = ("fixed", "in-place")
# How images are resized to the recipe's size when the cache is built (and by embed()): PIL's
# bilinear filter (dmdl's first caches) or bicubic (the reference, for training and test images).
RESIZE_FILTERS = ("bilinear", "bicubic")
# How the two training views are computed (docs/augmentation.md): dmdl-v1 = dmdl's first
# pipeline (uint8 views, normalised on the device; colour jitter and pseudo-colour before the
# crop); reference = the reference implementation's order (jitter and pseudo-colour after the
# crop; erasing and channel operations on the normalised float view the loader returns).
AUGMENT_PIPELINES = ("dmdl-v1", "reference")
# Random erasing fills: per-pixel uniform noise in [0, 255], the ImageNet mean colour, black,
# per-pixel N(0, 1) noise on the normalised scale (timm's pixel mode, the reference).
ERASING_FILLS = ("random", "mean", "zero", "normal")
# Pseudo-colour schemes of infrared view B: three distinct formula maps (COLOUR_MAPS), output
# channel c = channel c of map c; or one OpenCV map per output channel drawn from that
# channel's candidates (OPENCV_COLOUR_MAPS), channel c of its BGR output (the reference).
PSEUDO_COLOUR_SCHEMES = ("formula-distinct", "opencv-per-channel")
# Stage 2's cross-modality batches: ids of the union of both modalities, each paired with a
# random id of the other modality where it has none (the reference), or only shared ids.
CROSS_SAMPLERS = ("union", "shared")
# CBT's MMD: the unbiased U-statistic on the BN-neck features (the reference), or the biased
# V-statistic on the L2-normalised features (dmdl's earlier form).
MMD_FORMS = ("unbiased-bn-neck", "biased-normalised")
# Label refinement's 2-component GMM: one per cluster, or one over all labelled samples.
CONFIDENCE_GMMS = ("per-cluster", "global")
# The most boxes one random erasing tries (the augmentation draws a fixed block of random
# numbers per view, sized by this bound).
ERASING_ATTEMPTS_MAX = 10
# Colour maps of the infrared pseudo-colour view (formulae in dmdl_cli/data/colour_maps.py).
COLOUR_MAPS = ("jet", "hot", "hsv", "ocean", "rainbow", "gnuplot", "cool", "spring", "summer",
               "winter", "autumn")
# OpenCV's colour maps the reference draws from (COLORMAP_AUTUMN = 0, JET = 2, OCEAN = 5,
# INFERNO = 14, CIVIDIS = 17, DEEPGREEN = 21), stored in dmdl_cli/data/opencv_colour_maps.json.
OPENCV_COLOUR_MAPS = ("autumn", "jet", "ocean", "inferno", "cividis", "deepgreen")
NEVER = "never"  # an epoch threshold that is never reached
# Sane ranges of integer keys: far beyond any published setting, small enough that a typo
# (one digit too many) is refused by name instead of exhausting memory in numpy or torch.
MAX_IMAGE_SIDE = 2048  # pixels (image height or width, padding)
MAX_EPOCHS = 10_000
MAX_ITERS = 100_000  # steps per epoch (the reference: 200); also run.checkpoint_every
MAX_BATCH_FACTOR = 1024  # clusters per batch (P), instances per cluster (K)
MAX_IMAGES_PER_BATCH = 65_536  # feature and BatchNorm batches, DBSCAN min_samples
MAX_IMAGES = 10_000_000  # images of a data set
MAX_NEIGHBOURS = 10_000  # k of k-NN, Jaccard, re-ranking, refinement top-k
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it
MAX_PROCESSES = 1024  # loader processes, CPU threads
MAX_IDENTITIES = 100_000  # identities of the synthetic set
MAX_KERNELS = 64  # MMD kernels
MAX_TRIALS = 1000  # gallery sampling trials
MAX_INT = 2**31 - 1  # any other integer: nothing the tool counts comes near it
# Label-free selection (docs/selection.md): "last" keeps the last epoch; the others are the
# criteria of dmdl_cli/clustering/criteria.py a rule may choose a checkpoint by.
SELECT_CRITERIA = ("last", "eps_robustness", "label_ari", "label_nmi", "unified_ari", "pairs_kept",
                   "mutual_nn", "matching_cost", "association_cost", "effective_rank")
SELECT_TIES = ("later", "earlier")  # which epoch a tie goes to
# What stage 2's selection may also choose: only its own models ("stage2"), or, by one of the
# criteria its record of the model it started from defines (stability needs a previous epoch),
# that model when it scores better.
SELECT_BETWEEN_STAGES = ("stage2", "mutual_nn", "matching_cost", "association_cost",
                         "eps_robustness", "effective_rank")
STAGE2_STARTS = ("final", "selected")  # the stage-1 model stage 2 starts from


def _choice(default: Any, choices: Iterable[Any]) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


def _ranged(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


def _threshold(default: int | str) -> Any:
    """An epoch threshold (0-based epoch number) or ``never``; compared with ``epochs`` (one the
    schedule never reaches acts as ``never``, with a warning)."""
    return field(default=default, metadata={"min": 0, "threshold": True, "schedule": True})


def _positive(default: float) -> Any:
    """A number above 0 (0 itself excluded: a learning rate of 0 trains nothing)."""
    return field(default=default, metadata={"above": 0.0})


def _between(default: Any, lo: float, hi: float) -> Any:
    """A value in the open interval (lo, hi): both ends excluded."""
    return field(default=default, metadata={"above": lo, "below": hi})


def _epoch_count(default: int | str) -> Any:
    """A number of first epochs (>= 0), i.e. the epoch from which what follows them starts;
    ``never``: they last the whole stage. Compared with ``epochs`` like a threshold."""
    return field(default=default, metadata={"min": 0, "threshold": True, "schedule": True})


def _pair(default: tuple[float, float], above: float, hi: float | None = None) -> Any:
    """A range ``[lo, hi]`` written as a two-number list with ``above < lo <= hi (<= hi_max)``."""
    return field(default_factory=lambda: list(default), metadata={"pair": (above, hi)})


def _overrides(section: str) -> Any:
    """A mapping of keys of the recipe section ``section`` to values that replace them for one
    stage; each key and value is validated as that section's own (empty: no override)."""
    return field(default_factory=dict, metadata={"overrides": section})


def _names(default: Iterable[str], choices: Iterable[str]) -> Any:
    """A non-empty list of names, each one of ``choices``."""
    default = list(default)
    return field(default_factory=lambda: list(default), metadata={"items": tuple(choices)})


@dataclass
class DataRecipe:
    """Input images: the data set and the size of the cache and of the network input."""

    dataset: str = _choice("synthetic", DATASET_NAMES)  # a record of dmdl_cli/datasets.py
    height: int = _ranged(288, 16, MAX_IMAGE_SIDE)
    width: int = _ranged(144, 8, MAX_IMAGE_SIDE)
    trial: int = _ranged(1, 1, 10)  # RegDB split trial
    # the filter that resizes every image to height x width in the cache (RESIZE_FILTERS); a
    # cache built with another filter is rebuilt by a plain `dmdl prepare-data`
    resize: str = _choice("bilinear", RESIZE_FILTERS)


@dataclass
class ModelRecipe:
    """The shared two-modality backbone (docs/method.md section 5)."""

    arch: str = _choice("resnet50_agw", ARCHS)
    pretrained: str | None = "imagenet"  # "imagenet" (V1 file), "imagenet-v2", a .pth path, or null
    gem_p: float = _ranged(3.0, 1.0)
    last_stride: int = _choice(1, (1, 2))


@dataclass
class ClusterRecipe:
    """Pseudo-labelling: k-reciprocal Jaccard distance + DBSCAN (docs/method.md section 2)."""

    k1: int = _ranged(30, 1, MAX_NEIGHBOURS)
    k2: int = _ranged(6, 1, MAX_NEIGHBOURS)
    eps: float = _between(0.6, 0.0, 1.0)  # Jaccard distances lie in [0, 1]: 0 or 1 clusters nothing
    min_samples: int = _ranged(4, 1, MAX_IMAGES_PER_BATCH)
    knn: str = _choice("exact", KNN_METHODS)
    flip_average: bool = True  # average train features with the horizontal flip before clustering


@dataclass
class StageRecipe:
    """What both training stages read: schedule, optimiser, batch, losses and their ramps.

    Epochs are counted from 0. Thresholds (``stage1.refine_from``, ``stage2.onehot_epochs``,
    ``stage2.cross_sampler_from``) hold from the epoch named on (``epoch >= value``); ``never``
    turns them off. Triplet ramp entries ``[e, w]`` hold strictly after the epoch named
    (``epoch > e``), as in the reference implementation; ``triplet_ramp: never`` (or ``[]``) is
    no triplet. A threshold the schedule never reaches acts as ``never``: the commands name
    every such key in one warning line (:func:`unreached_thresholds`), so a schedule shortened
    with ``--set stageN.epochs=1`` runs as it is.
    """

    epochs: int = _ranged(50, 1, MAX_EPOCHS)
    iters: int = _ranged(200, 1, MAX_ITERS)
    lr: float = _positive(3.5e-4)
    weight_decay: float = _ranged(5e-4, 0.0)
    lr_step: int = _ranged(20, 1, MAX_EPOCHS)  # step decay every lr_step epochs
    lr_gamma: float = _ranged(0.1, 0.0, 1.0)
    clusters_per_batch: int = _ranged(8, 1, MAX_BATCH_FACTOR)  # P
    instances: int = _ranged(16, 1, MAX_BATCH_FACTOR)  # K images per cluster and modality
    temp: float = _ranged(0.05, 1e-6)  # contrastive temperature tau
    momentum: float = _ranged(0.2, 0.0, 1.0)  # memory momentum: m <- momentum*m + (1-momentum)*f
    # per-sample: each sample of a batch moves its row in turn, in batch order (the reference);
    # batch-mean: a row moves once per step towards the mean of its samples
    memory_update: str = _choice("per-sample", MEMORY_UPDATES)
    triplet_margin: float = _ranged(0.3, 0.0)
    # Triplet weight sigma: [[epoch, weight], ...]: strictly after `epoch` the weight is `weight`
    # (`never`: no entry, no triplet).
    triplet_ramp: list = field(default_factory=lambda: [[15, 0.25], [25, 0.5], [35, 1.0]],
                               metadata={"ramp": True})
    # per-modality: batch-hard within the visible and within the infrared images, summed (the
    # reference); joint: one batch-hard over the whole batch (stage 1: cross-modal pairs are
    # always negatives)
    triplet: str = _choice("per-modality", TRIPLET_MODES)
    # sum-modalities: each term is the sum over the modalities of its batch mean (the
    # reference); mean: terms over the whole batch (CAI, likelihood, triplet) are batch means
    loss_reduction: str = _choice("sum-modalities", LOSS_REDUCTIONS)
    # draw a cluster's other instances from cameras other than the anchor's where possible
    camera_aware_sampling: bool = True
    refine_topk: int = _ranged(3, 1, MAX_NEIGHBOURS)  # k of the refined targets' top-k softmax
    # this stage's augmentation: `augment:` with these keys replaced ({erasing_scale: [0.02, 0.6]})
    augment: dict = _overrides("augment")


@dataclass
class Stage1Recipe(StageRecipe):
    """Stage 1 (per-modality clusters) refines its labels from an epoch on."""

    refine_from: int | str = _threshold(30)  # first epoch with label refinement (before: c = 1)


@dataclass
class Stage2Recipe(StageRecipe):
    """Stage 2 adds what only exists with a unified identity space. It refines from its first
    epoch on, after ``onehot_epochs`` epochs of one-hot targets."""

    onehot_epochs: int | str = _epoch_count(5)  # first epochs with one-hot targets (never: all)
    cross_sampler_from: int | str = _threshold(40)  # epoch from which batches are cross-modality
    # k1 of the modality that adopts the other's ids this epoch (the association method says
    # which: nearest-alternating the visible one on even epochs, the infrared one on odd ones;
    # hungarian none); null = cluster.k1. Stage 2 only, so stage 1's results do not depend on it
    k1_adopting: int | None = _ranged(None, 1, MAX_NEIGHBOURS)
    # the modality that adopted the other's ids this epoch also moves the other's memory rows
    cross_memory_update: bool = True
    # add a batch-hard triplet over all images on unified ids while the cross sampler is on
    triplet_all_modalities: bool = True
    # targets of L_intra: hard labels (the reference) or the refined targets (which feed CAI)
    intra_targets: str = _choice("hard", INTRA_TARGETS)
    # fixed: memory gradients read the rows of the forward pass; in-place: infrared samples'
    # gradients read the rows the visible samples of the same batch already moved, as the
    # reference's memory backward does (docs/training.md)
    memory_gradient: str = _choice("fixed", MEMORY_GRADIENTS)
    # ids of the cross-modality batches: union (each id, with a random partner id of the other
    # modality where it has no images there; one shuffled order per epoch, reused) or shared
    cross_sampler: str = _choice("shared", CROSS_SAMPLERS)
    # label refinement's GMM: one per unified id, or one over all labelled samples (RegDB)
    confidence_gmm: str = _choice("per-cluster", CONFIDENCE_GMMS)
    # the stage-1 model stage 2 starts from: stage1/final.pt, or the one `dmdl select --stage
    # stage1` chose by the recipe's select: rule (stage1/selected.pt; docs/selection.md)
    start_from: str = _choice("final", STAGE2_STARTS)


@dataclass
class TrainRecipe:
    """Settings shared by both stages that change the trained numbers."""

    seed: int = _ranged(1, 0, MAX_SEED)
    amp: str = _choice("fp16", AMP_MODES)  # GPU only; CPU runs in fp32
    channels_last: bool = True
    # Clean train images over which BatchNorm running statistics are re-estimated before each
    # epoch's clustering features and before final.pt (0 = off: the reference behaviour).
    bn_recalibration: int = _ranged(0, 0, MAX_IMAGES)
    # Images per batch of that re-estimation: the statistics are a mean over batches, so the
    # batch size is part of the result (unlike run.feature_batch).
    bn_recalibration_batch: int = _ranged(256, 2, MAX_IMAGES_PER_BATCH)
    # BatchNorm statistics of a training step: "joint" over each process's whole forward batch
    # (both views, both modalities); "reference" per slice of the global batch as the
    # reference's DataParallel over `bn_slices` GPUs cuts it (each modality's [view A; view B]
    # images in `bn_slices` consecutive chunks, chunk g of both modalities one group), with the
    # running statistics taken from the first slice only. The same on any number of processes.
    bn_groups: str = _choice("joint", BN_GROUPS)
    bn_slices: int = _ranged(4, 1, 64)  # the reference ran on 4 GPUs


@dataclass
class RunRecipe:
    """How a run executes, never what it computes: no compatibility hash covers this section,
    so changing a key here keeps checkpoints resumable and stage-1 results usable by stage 2."""

    # training DataLoader processes; decoding threads in prepare-data
    workers: int = _ranged(4, 0, MAX_PROCESSES)
    checkpoint_every: int = _ranged(50, 1, MAX_ITERS)  # steps between resume points (and at each epoch end)
    log_every: int = _ranged(10, 1, MAX_ITERS)  # steps between `step` records of log.jsonl (and each epoch end)
    eval_every: int = _ranged(0, 0, MAX_EPOCHS)  # epochs between test-set monitoring (0 = off); logged only
    # Images per batch of feature extraction (eval mode: each image's embedding is computed on
    # its own, so the batch size changes nothing beyond floating-point rounding)
    feature_batch: int = _ranged(256, 1, MAX_IMAGES_PER_BATCH)
    keep_epochs: bool = False  # also keep epoch-NNN.pt per epoch
    # Also write TensorBoard event files to WS/<stage>/tensorboard (needs the `tensorboard` extra).
    tensorboard: bool = False
    # CPU threads of torch and faiss in this process (0: OMP_NUM_THREADS when set, else torch's
    # default). The count changes how floating-point sums are split, so CPU results differ in
    # the last digits between thread counts, never in what is computed.
    threads: int = _ranged(0, 0, MAX_PROCESSES)


# Keys a stage used to carry but never read: an old recipe naming one is refused with the reason.
REMOVED_KEYS = {
    "stage1.cross_sampler_from": "stage 1 has no unified identities to sample across modalities "
                                 "(stage2.cross_sampler_from sets stage 2's)",
    "stage1.onehot_epochs": "stage 1 trains on hard labels until stage1.refine_from",
    "stage2.refine_from": "stage 2 refines from its first epoch on, after stage2.onehot_epochs "
                          "epochs of one-hot targets",
}

# Keys that moved: an old recipe naming one is refused with its new name and why it moved.
_RUN_SECTION = "the `run:` section holds the settings that change no result"
MOVED_KEYS = {
    "data.workers": ("run.workers", _RUN_SECTION),
    "train.checkpoint_every": ("run.checkpoint_every", _RUN_SECTION),
    "train.eval_every": ("run.eval_every", _RUN_SECTION),
    "train.feature_batch": ("run.feature_batch", _RUN_SECTION),
    "train.keep_epochs": ("run.keep_epochs", _RUN_SECTION),
    "train.tensorboard": ("run.tensorboard", _RUN_SECTION),
    "cluster.k1_adopting": ("stage2.k1_adopting", "only stage 2 reads it, so stage 1's results "
                            "no longer depend on it"),
}


@dataclass
class AugmentRecipe:
    """CBT data level: probabilities and strengths of the two views (docs/method.md section 4,
    docs/augmentation.md).

    Values are the paper's and, where it is silent, its reference implementation's; the
    defaults are dmdl's first pipeline (``dmdl-v1``), so a recipe written before ``pipeline``
    existed trains what it trained. Whether the views are modality-specific comes from
    ``cbt.augment``; the image size from ``data``.
    """

    # the order and number format of the operations (AUGMENT_PIPELINES)
    pipeline: str = _choice("dmdl-v1", AUGMENT_PIPELINES)
    pad: int = _ranged(10, 0, MAX_IMAGE_SIDE)  # zero padding before the random crop back to the input size
    flip_p: float = _ranged(0.5, 0.0, 1.0)  # horizontal flip
    # random erasing of one box: probability, area fraction range, aspect ratio range (drawn
    # log-uniformly), boxes tried until one fits, fill (one of ERASING_FILLS)
    erasing_p: float = _ranged(0.5, 0.0, 1.0)
    erasing_scale: list = _pair((0.02, 0.5), 0.0, 1.0)
    erasing_ratio: list = _pair((0.3, 1 / 0.3), 0.0)
    erasing_attempts: int = _ranged(10, 1, ERASING_ATTEMPTS_MAX)
    erasing_fill: str = _choice("random", ERASING_FILLS)
    # colour jitter of visible view B: factors in [max(0, 1 - s), 1 + s], hue shift in [-h, h]
    jitter_brightness: float = _ranged(0.5, 0.0)
    jitter_contrast: float = _ranged(0.5, 0.0)
    jitter_saturation: float = _ranged(0.5, 0.0)
    jitter_hue: float = _ranged(0.5, 0.0, 0.5)
    jitter_p: float = _ranged(1.0, 0.0, 1.0)
    channel_exchange_p: float = _ranged(1.0, 0.0, 1.0)  # visible view B: one channel in all three
    # IR view A: with this probability one of four equally likely choices: R, G or B copied into
    # all three channels, or the grayscale slot ...
    ir_channel_copy_p: float = _ranged(0.5, 0.0, 1.0)
    # ... which turns the view gray with this probability and leaves it unchanged otherwise
    # (dmdl-v1: always; the reference: 0.5, so 75 % copy, 12.5 % gray, 12.5 % unchanged)
    ir_gray_p: float = _ranged(1.0, 0.0, 1.0)
    ir_pseudo_colour_p: float = _ranged(1.0, 0.0, 1.0)  # IR view B: false colours
    ir_pseudo_colour_scheme: str = _choice("formula-distinct", PSEUDO_COLOUR_SCHEMES)
    # formula-distinct: candidate maps (COLOUR_MAPS); three distinct ones per image when >= 3
    ir_pseudo_colour_maps: list = _names(("jet", "hot", "hsv", "ocean", "rainbow", "gnuplot"),
                                         COLOUR_MAPS)
    # opencv-per-channel: candidates (OPENCV_COLOUR_MAPS) of the red, green and blue output
    # channels, one drawn per channel (the reference's pairs: COLORMAP 5 / 17, 14 / 0, 21 / 2)
    ir_opencv_maps_red: list = _names(("ocean", "cividis"), OPENCV_COLOUR_MAPS)
    ir_opencv_maps_green: list = _names(("inferno", "autumn"), OPENCV_COLOUR_MAPS)
    ir_opencv_maps_blue: list = _names(("deepgreen", "jet"), OPENCV_COLOUR_MAPS)

    def __post_init__(self) -> None:  # sections built in code are checked as a file would be
        check_section(self, AugmentRecipe, "augment", type(self).__name__)


@dataclass
class SyntheticRecipe:
    """The embedded synthetic data set (``data.dataset: synthetic``): what ``prepare-data``
    generates, and the strengths of its generative model (docs/synthetic.md).

    Cue strengths are spreads *between identities*; nuisance strengths are per-image
    variations. Colour and intensity values live in [0, 1]; lengths are fractions of the figure
    height unless said otherwise.
    """

    # identities: test = ids/3, val = ids/9 (rounded), train = the rest (90: 50 / 10 / 30)
    ids: int = _ranged(90, 3, MAX_IDENTITIES)
    seed: int = _ranged(0, 0, MAX_SEED)  # every draw of the generator derives from it
    height: int = _ranged(96, 32, MAX_IMAGE_SIDE)  # generated image size in pixels (the cache resizes it)
    width: int = _ranged(48, 16, MAX_IMAGE_SIDE)
    jpeg_quality: int = _ranged(90, 1, 100)

    # --- visible-only cues (strong) ---
    colour_spread: float = _ranged(1.0, 0.0)  # garment RGB: uniform in a cube of this side around mid-grey
    colour_noise: float = _ranged(0.03, 0.0)  # per-image sd of the garment colour (RGB units)
    cast_strength: float = _ranged(0.2, 0.0)  # visible camera colour cast: per-channel gain in 1 +- this

    # --- cross-modal cues (weak) ---
    shape_spread: float = _ranged(0.2, 0.0)  # relative sd of height, shoulder/hip width, head, legs
    # share of identities whose upper garment has a pattern (stripes or checks); the lower
    # garment gets one with half this probability
    texture_prob: float = _ranged(0.7, 0.0, 1.0)
    texture_contrast: float = _ranged(0.6, 0.0)  # pattern amplitude, relative intensity (both modalities)
    material_spread: float = _ranged(0.6, 0.0)  # spread of the garments' thermal brightness (IR units)
    # how far the visible luminance of a garment follows its IR brightness: 0 = independent;
    # > 0 near-infrared cameras (SYSU-MM01, LLCM), which see reflected light; < 0 thermal cameras
    # (RegDB), where high-emissivity fabrics (bright in IR) are darker in visible light
    material_coupling: float = _ranged(0.8, -1.0, 1.0)
    object_prob: float = _ranged(0.6, 0.0, 1.0)  # share carrying a bag (left, right) or a backpack

    # --- per-image nuisance ---
    scale_jitter: float = _ranged(0.08, 0.0)  # figure size varies by +- this fraction
    shift_jitter: float = _ranged(0.08, 0.0)  # figure position: +- this fraction of the width
    shear_jitter: float = _ranged(0.06, 0.0)  # lean: horizontal shear (figure units per height)
    limb_jitter: float = _ranged(0.035, 0.0)  # arm swing and stride offsets
    flip_prob: float = _ranged(0.5, 0.0, 1.0)
    illum_jitter: float = _ranged(0.12, 0.0)  # global brightness gain varies by +- this
    pixel_noise: float = _ranged(0.02, 0.0)  # sd of the visible per-pixel noise
    ir_noise: float = _ranged(0.04, 0.0)  # sd of the infrared per-pixel noise
    ir_blur: float = _ranged(0.6, 0.0)  # sd (pixels) of the gaussian blur of infrared images
    occlusion_prob: float = _ranged(0.15, 0.0, 1.0)  # an obstacle covering the bottom or a side

    def __post_init__(self) -> None:  # sections built in code are checked as a file would be
        check_section(self, SyntheticRecipe, "synthetic", type(self).__name__)

    def generator_settings(self) -> dict[str, Any]:
        """Everything but ``ids`` and ``seed``: how each image looks."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("ids", "seed")}


@dataclass
class CBTRecipe:
    """Collaborative Bias-free Training switches (optimization-level debiasing)."""

    augment: bool = True  # modality-specific views (off: two standard views)
    refine: bool = True  # GMM confidence + top-k soft targets (off: hard labels)
    align: bool = True  # multi-kernel MMD between view A and view B features
    align_weight: float = _ranged(1.0, 0.0)
    mmd_kernels: int = _ranged(5, 1, MAX_KERNELS)
    mmd_kernel_mul: float = _ranged(2.0, 1.0)
    mmd: str = _choice("biased-normalised", MMD_FORMS)  # estimator and features of the alignment


@dataclass
class CAIRecipe:
    """Causality-inspired Adjustment Intervention (model-level debiasing), stage 2 only."""

    enabled: bool = True
    weight: float = _ranged(0.5, 0.0)  # mu
    confidence_momentum: bool = True  # fused memory momentum 0.2 / max(t(y), 0.2)


@dataclass
class AssociationRecipe:
    """How stage 2 links the two modalities' clusters (``clustering/association.py``)."""

    method: str = _choice("nearest-alternating", ASSOCIATION_METHODS)
    # cluster-sample-alternating (the reference's RegDB stage 2): of every `sample_cycle` epochs
    # the first `cluster_epochs` link clusters as nearest-alternating does; on the others every
    # sample of the adopting modality takes the label of its nearest sample of the other
    sample_cycle: int = _ranged(5, 1)
    cluster_epochs: int = _ranged(2, 0)


@dataclass
class EvalRecipe:
    trials: int = _ranged(10, 1, MAX_TRIALS)
    shots: int = _choice(1, (1, 10))
    rerank_k1: int = _ranged(20, 1, MAX_NEIGHBOURS)
    rerank_k2: int = _ranged(6, 1, MAX_NEIGHBOURS)
    rerank_lambda: float = _ranged(0.3, 0.0, 1.0)


@dataclass
class SelectRecipe:
    """How a checkpoint and DBSCAN's eps are chosen without labels (docs/selection.md): the
    rule is part of the hashed recipe, so a run states it before it starts."""

    # the criterion the epoch is chosen by (SELECT_CRITERIA; "last": the last epoch)
    criterion: str = _choice("label_ari", SELECT_CRITERIA)
    # models trained fewer epochs than this in their stage: never chosen
    warmup: int = _ranged(1, 0, MAX_EPOCHS)
    # criterion values within this of the best count as tied; a tie goes to the `tie` epoch
    tolerance: float = _ranged(0.0, 0.0)
    tie: str = _choice("later", SELECT_TIES)
    # collapse guard: an epoch (or eps) whose largest cluster holds more than this share of a
    # modality's images is never chosen (1: no guard)
    max_largest_share: float = _ranged(0.5, 0.0, 1.0)
    eps_delta: float = _between(0.02, 0.0, 0.5)  # eps robustness: DBSCAN at eps -+ this (SpCL's)
    # eps sweep (`dmdl cluster --eps-sweep`): the first peak of robustness reaching this share
    # of the best is picked
    sweep_min_peak: float = _ranged(0.5, 0.0, 1.0)
    rank_samples: int = _ranged(1024, 2, MAX_IMAGES)  # train feature rows of the effective rank (RankMe)
    # stage 2's selection: "stage2" chooses among its own models only; a criterion also keeps
    # the model stage 2 started from (stage 1's) when that scores better by it than stage 2's
    # choice, beyond `tolerance` (on data where the association fails, stage 2 can end below it)
    between_stages: str = _choice("stage2", SELECT_BETWEEN_STAGES)


def _stage2_defaults() -> Stage2Recipe:
    return Stage2Recipe(triplet_ramp=[[10, 0.5], [20, 1.0]], refine_topk=10)


@dataclass
class Recipe:
    data: DataRecipe = field(default_factory=DataRecipe)
    synthetic: SyntheticRecipe = field(default_factory=SyntheticRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    cluster: ClusterRecipe = field(default_factory=ClusterRecipe)
    stage1: Stage1Recipe = field(default_factory=Stage1Recipe)
    stage2: Stage2Recipe = field(default_factory=_stage2_defaults)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    run: RunRecipe = field(default_factory=RunRecipe)
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)
    cbt: CBTRecipe = field(default_factory=CBTRecipe)
    cai: CAIRecipe = field(default_factory=CAIRecipe)
    association: AssociationRecipe = field(default_factory=AssociationRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    select: SelectRecipe = field(default_factory=SelectRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, sections: Iterable[str] | None = None) -> str:
        """sha256 (16 hex digits) of the canonical JSON of the named sections (by default all
        but the unhashed ones)."""
        full = self.to_dict()
        if sections is None:
            sections = [name for name in full if name not in UNHASHED_SECTIONS]
        chosen = {name: full[name] for name in sections}
        blob = json.dumps(chosen, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Sections that change how a run executes, never a result: left out of every hash, so changing
# them for a resumed run (or between stage 1 and stage 2) keeps the checkpoints valid.
UNHASHED_SECTIONS = ("run",)



# ---------------------------------------------------------------------------------------------
# Building and validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_FLOAT_LIMIT = 2.0**1023  # an integer beyond it has no float value
_FLOAT_LIMIT = 2.0**1023  # an integer beyond it has no float


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in YAML11_BOOLEANS:  # yes/no/on/off: YAML 1.1's words
            return YAML11_BOOLEANS[value]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < _FLOAT_LIMIT else math.inf
        # PyYAML (YAML 1.1) reads exponents without a dot (`1e-4`) as strings
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        if number is not None:
            if not math.isfinite(number):  # .inf, .nan, 1e400: training would diverge silently
                raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is not a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # an unquoted true/false: YAML's boolean, not a word
            word = "true" if value else "false"
            raise DmdlError(f"recipe key '{key}' ({source}): expected a word, got {word} (YAML "
                            f"reads it as a boolean); quote the word you mean, e.g. '{word}'")
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):  # a tuple: a section built in code
            return copy.deepcopy(list(value))
    elif tp is dict:
        if isinstance(value, Mapping):
            return copy.deepcopy(dict(value))
    else:  # pragma: no cover - a programming error in this file
        raise TypeError(f"unsupported recipe field type {tp!r}")
    raise DmdlError(
        f"recipe key '{key}' ({source}): expected {_type_name(tp)}, got {value!r}"
    )


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise DmdlError(f"recipe key '{prefix}' ({source}): expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown(sorted(set(data) - set(known)), known, prefix, source)
    default = cls()
    values: dict[str, Any] = {}
    for name, fld in known.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = data.get(name, {})
            base = dataclasses.asdict(getattr(default, name))
            merged = _deep_merge(base, sub if isinstance(sub, Mapping) else _raise_mapping(key, sub, source))
            values[name] = _build(tp, merged, key, source)
        elif name not in data:
            values[name] = getattr(default, name)
        else:
            values[name] = _validated(fld, tp, data[name], key, source)
    return cls(**values)


def _refuse_unknown(unknown: list[str], known: Mapping[str, Any], prefix: str, source: str) -> None:
    """Name the first unknown key; a moved or removed one with its new place or the reason."""
    keys = [f"{prefix}.{name}" if prefix else name for name in unknown]
    for key in keys:
        if key in MOVED_KEYS:
            new, why = MOVED_KEYS[key]
            raise DmdlError(f"recipe key '{key}' ({source}) moved to {new}: use {new} instead "
                            f"({why})")
        if key in REMOVED_KEYS:
            section, name = key.split(".", 1)
            raise DmdlError(f"recipe key '{key}' ({source}): {section} has no {name}: "
                            f"{REMOVED_KEYS[key]}; remove the key")
    if keys:
        raise DmdlError(f"unknown recipe key '{keys[0]}' ({source}); known keys here: "
                        f"{', '.join(known)}")


def _validated(fld: dataclasses.Field, tp: Any, raw: Any, key: str, source: str) -> Any:
    """The value of one recipe key: its type coerced, its range, choices, pair or names checked."""
    meta = fld.metadata
    if meta.get("threshold") and raw == NEVER:
        return NEVER
    if meta.get("ramp") and raw == NEVER:  # no ramp entry: the triplet weight stays 0
        return []
    if meta.get("threshold") and not (isinstance(raw, int) and not isinstance(raw, bool)):
        raise DmdlError(f"recipe key '{key}' ({source}): expected an epoch number or "
                        f"'{NEVER}', got {raw!r}")
    value = _coerce(raw, tp, key, source)
    if value is None:
        return value
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is not one of {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is above the maximum {hi}")
    if isinstance(value, int) and not isinstance(value, bool) and hi is None and value > MAX_INT:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is above the maximum {MAX_INT}")
    above, below = meta.get("above"), meta.get("below")
    if above is not None and below is None and not value > above:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} must be above {above:g}")
    if above is not None and below is not None and not above < value < below:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is outside the open interval "
                        f"({above}, {below}); both ends are excluded")
    if isinstance(value, list):
        _check_numbers(value, key, source)
    if "pair" in meta:
        return _checked_pair(value, *meta["pair"], key, source)
    if "items" in meta:
        return _checked_names(value, meta["items"], key, source)
    if "overrides" in meta:
        return _checked_overrides(value, meta["overrides"], key, source)
    return value


def _check_numbers(value: Any, key: str, source: str) -> None:
    """Every number inside a list value (a ramp, a pair) is finite and in the integer range."""
    if isinstance(value, list):
        for item in value:
            _check_numbers(item, key, source)
    elif isinstance(value, float) and not math.isfinite(value):
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is not a finite number")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise DmdlError(f"recipe key '{key}' ({source}): {value!r} is above the maximum {MAX_INT}")


def _checked_pair(value: list, above: float, hi: float | None, key: str, source: str) -> list:
    numbers = [_coerce(x, float, key, source) if not isinstance(x, bool) else x for x in value]
    ok = (len(numbers) == 2 and all(isinstance(x, float) for x in numbers)
          and above < numbers[0] <= numbers[1] and (hi is None or numbers[1] <= hi))
    if not ok:
        bound = f" <= {hi}" if hi is not None else ""
        raise DmdlError(f"recipe key '{key}' ({source}): expected [lo, hi] with "
                        f"{above} < lo <= hi{bound}, got {value!r}")
    return numbers


def _checked_names(value: list, choices: tuple[str, ...], key: str, source: str) -> list:
    if not value:
        raise DmdlError(f"recipe key '{key}' ({source}): name at least one of {', '.join(choices)}")
    for name in value:
        if name not in choices:
            raise DmdlError(f"recipe key '{key}' ({source}): {name!r} is not one of "
                            f"{', '.join(choices)}")
    return list(value)


def _checked_overrides(value: dict, section: str, key: str, source: str) -> dict:
    """Each key of an override mapping must be a key of the recipe section ``section``, and its
    value valid there (validated as that key, named ``<key>.<name>``)."""
    cls = typing.get_type_hints(Recipe)[section]
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, raw in value.items():
        if name not in known:
            raise DmdlError(f"recipe key '{key}.{name}' ({source}): {section} has no key "
                            f"{name!r}; known keys: {', '.join(known)}")
        out[name] = _validated(known[name], hints[name], raw, f"{key}.{name}", source)
    return out


def check_section(section: Any, cls: type, prefix: str, source: str) -> None:
    """Check a section built in code (not read from a file) by the rules of a recipe file:
    every field of ``cls`` is validated, and lists given as tuples are stored as lists."""
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        value = _validated(fld, hints[fld.name], getattr(section, fld.name),
                           f"{prefix}.{fld.name}", source)
        object.__setattr__(section, fld.name, value)


def _raise_mapping(key: str, value: Any, source: str) -> Mapping[str, Any]:
    raise DmdlError(f"recipe key '{key}' ({source}): expected a mapping, got {value!r}")


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# YAML 1.1's boolean words besides true/false. Recipes are read with YAML 1.2's booleans (only
# true/false), so `train.amp: off` stays the word "off"; a key that expects a boolean still
# accepts these words, as YAML 1.1 read them.
YAML11_BOOLEANS = {word: value for words, value in (("yes Yes YES on On ON", True),
                                                    ("no No NO off Off OFF", False))
                   for word in words.split()}


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"'{key}' is given twice (lines {first} and {second}); keep one")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (``off`` is a word) that refuses a key given
    twice in one mapping (PyYAML keeps the second silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            seen[key] = line
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml_text(text: str) -> Any:
    """YAML text as recipes read it (:class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DmdlError(f"recipe file not found: {path}")
    try:
        data = read_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DmdlError(f"recipe file {path} is not a text file (not UTF-8): pass a YAML "
                        "recipe") from None
    except _DuplicateKey as err:
        raise DmdlError(f"recipe file {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DmdlError(f"recipe file {path}{where} is not valid YAML: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DmdlError(f"recipe file {path} must hold a mapping of sections (data:, model:, ...)")
    return data


class OptionOverride(str):
    """A recipe override that a command-line option implies (``--dataset sysu`` sets
    ``data.dataset=sysu``): applied and recorded like ``--set data.dataset=sysu``, but named in
    messages as the option the user typed (``shown``; ``""``: an option left at its default,
    which messages do not name)."""

    shown: str

    def __new__(cls, text: str, shown: str) -> "OptionOverride":
        obj = super().__new__(cls, text)
        obj.shown = shown
        return obj


def _shown(text: str) -> str:
    """How an override is named in messages: ``--set a.b=1``, or the option that implied it."""
    return text.shown if isinstance(text, OptionOverride) else f"--set {text}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``a.b=value`` override; the value is read as YAML (``1e-4``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise DmdlError(f"--set '{text}': expected KEY=VALUE, e.g. --set stage1.epochs=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise DmdlError(f"--set '{text}': the key must look like section.name")
    try:
        value = read_yaml_text(raw) if raw.strip() else None
    except _DuplicateKey as err:
        raise DmdlError(f"--set '{text}': {err}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise DmdlError(f"--set '{text}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def recipe_from_dict(data: Mapping[str, Any], source: str = "recipe", *,
                     check_schedule: bool = True) -> Recipe:
    """Build and validate a recipe; ``check_schedule=False`` skips the checks that relate keys
    to each other (the form of ramp entries), for intermediate states of a merge."""
    recipe = _build(Recipe, data, "", source)
    if not check_schedule:
        return recipe
    for section in dataclasses.fields(recipe):  # every training stage's section
        value = getattr(recipe, section.name)
        if isinstance(value, StageRecipe):
            _check_ramp(value, section.name, source)
    return recipe


def _check_ramp(stage: StageRecipe, name: str, source: str) -> None:
    """Refuse triplet ramp entries that are not ``[epoch, weight]`` pairs (epoch: >= 0 or
    ``never``; weight >= 0)."""
    for entry in stage.triplet_ramp:
        ok = (isinstance(entry, list) and len(entry) == 2
              and (entry[0] == NEVER or (isinstance(entry[0], int) and not isinstance(entry[0], bool)
                                         and entry[0] >= 0))
              and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] >= 0)
        if not ok:
            raise DmdlError(f"recipe key '{name}.triplet_ramp' ({source}): entries are "
                            f"[epoch, weight] pairs with epoch >= 0 (or '{NEVER}') and weight >= 0, "
                            f"got {entry!r}; write '{NEVER}' or [] for no triplet")


def unreached_thresholds(recipe: Recipe, sections: Iterable[str] | None = None) -> list[str]:
    """The epoch thresholds of the training sections (all, or the named ones) that their
    stage's ``epochs`` never reach, as ``key=value`` (a ramp: its unreached entries). Each acts
    as ``never``; the commands name them in one warning line (:func:`schedule_warning`)."""
    found = []
    for section in dataclasses.fields(recipe):
        stage = getattr(recipe, section.name)
        if not isinstance(stage, StageRecipe) or (sections is not None and section.name not in sections):
            continue
        last = stage.epochs - 1  # epochs are counted from 0
        for fld in dataclasses.fields(stage):
            value = getattr(stage, fld.name)
            if fld.metadata.get("schedule") and value != NEVER and value > last:
                found.append(f"{section.name}.{fld.name}={value}")
        # a ramp entry [e, w] holds strictly after epoch e: the last epoch must pass it
        late = [entry for entry in stage.triplet_ramp if entry[0] != NEVER and entry[0] >= last]
        if late:
            shown = ", ".join(f"[{e}, {w}]" for e, w in late)
            found.append(f"{section.name}.triplet_ramp entr{'y' if len(late) == 1 else 'ies'} {shown}")
    return found


def schedule_warning(recipe: Recipe, sections: Iterable[str] | None = None) -> str | None:
    """One line naming every unreached threshold of :func:`unreached_thresholds`, or None."""
    keys = unreached_thresholds(recipe, sections)
    if not keys:
        return None
    epochs = ", ".join(f"{f.name}: {getattr(recipe, f.name).epochs} epoch"
                       f"{'s' if getattr(recipe, f.name).epochs != 1 else ''}"
                       for f in dataclasses.fields(recipe)
                       if isinstance(getattr(recipe, f.name), StageRecipe)
                       and (sections is None or f.name in sections))
    onehot = (" (onehot_epochs: one-hot targets throughout)"
              if any(".onehot_epochs=" in key for key in keys) else "")
    return (f"the schedule ({epochs}; counted from 0) never reaches {'; '.join(keys)}: what "
            f"{'they switch' if len(keys) > 1 else 'it switches'} on stays off in this run{onehot}; "
            f"set {'them' if len(keys) > 1 else 'it'} to '{NEVER}' (a ramp entry: drop it) to say "
            f"so and silence this warning")


def reached(threshold: int | str, epoch: int) -> bool:
    """Whether the 0-based ``epoch`` is at or past an epoch ``threshold`` (``never``: False)."""
    return threshold != NEVER and epoch >= int(threshold)


def load_recipe(
    path: str | Path | None = None,
    *,
    overlays: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
    inherited: Iterable[tuple[str, Mapping[str, Any]]] = (),
) -> Recipe:
    """Load, merge, override and validate a recipe; ``path=None`` starts from the defaults.

    ``inherited``: ``(source, tree)`` pairs merged after the base and before the overlays (the
    sections an upstream stage result was made with, see ``dmdl_cli/provenance.py``).
    """
    overrides = list(overrides)
    tree: dict[str, Any] = {}
    sources = []
    if path is not None:
        tree = _read_yaml(Path(path))
        sources.append(str(path))
        # validate the base on its own first so errors name the right file
        recipe_from_dict(tree, str(path))
    for source, top in inherited:
        tree = _deep_merge(tree, top)
        recipe_from_dict(tree, source)
        sources.append(source)
    for overlay in overlays:
        top = _read_yaml(Path(overlay))
        recipe_from_dict(_deep_merge(tree, top), str(overlay), check_schedule=False)
        tree = _deep_merge(tree, top)
        sources.append(str(overlay))
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(tree, parts, value, text)
        recipe_from_dict(tree, _shown(text) or f"--set {text}", check_schedule=False)
    sources += [shown for shown in map(_shown, overrides) if shown]
    return recipe_from_dict(tree, " + ".join(sources) or "defaults")


def stage_augment(recipe: Recipe, stage: StageRecipe) -> AugmentRecipe:
    """The augmentation a training stage trains with: ``recipe.augment`` with the stage's
    ``augment`` overrides applied (a stage's hash covers them: they are keys of its section)."""
    return dataclasses.replace(recipe.augment, **stage.augment)


def triplet_weight(ramp: list, epoch: int) -> float:
    """The triplet weight sigma at the 0-based ``epoch`` from a ``[[epoch, weight], ...]`` ramp.

    An entry ``[e, w]`` holds strictly after epoch ``e`` (``epoch > e``), as the reference
    implementation writes its ramps (``if epoch > 15: sigma = 0.25``); 0 before the first; an
    entry ``[never, w]`` never holds.
    """
    weight = 0.0
    for start, value in sorted(entry for entry in ramp if entry[0] != NEVER):
        if epoch > start:
            weight = float(value)
    return weight
