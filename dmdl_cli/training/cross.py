"""Stage 2, ``train-cross``: cross-modality learning with CAI and CBT.

Per epoch: cluster each modality (the modality that adopts the other's ids this epoch, as the
association method says, with ``stage2.k1_adopting``), associate the clusters into one identity
space (``association.method``, ``clustering/association.py``), build one memory per modality
keyed by the unified ids it has (``M_vis``, ``M_ir``) and a fused memory over all images of
each unified id (``M_fused``), GMM confidences on the unified labels (``cbt.refine``), the
modality prior P(m). Per batch, with unified labels y, two views A/B and refined targets t
from the fused memory (one-hot for the first ``stage2.onehot_epochs`` epochs or without
``cbt.refine``):

    L = L_intra + L_id + sigma(epoch) * triplet + w_align * MMD(A, B)
    L_id = mu * L_CAI  with ``cai.enabled``;  L_fused  without (the baseline)

- L_intra: contrastive loss of each sample against its own modality's memory, on hard labels
  (``stage2.intra_targets: hard``, the reference) or on refined targets (``refined``);
- L_fused: contrastive loss against the fused memory, i.e. likelihood modelling P(y | x);
- L_CAI: -sum_y t(y) log P(y | do(x)), P(y | do(x)) = sum_m P(y | x, m) P(m) (``model/cai.py``).
  CAI *replaces* likelihood modelling, as the paper and docs/method.md section 3 state: with CAI on,
  L_fused is logged but not trained on. The fused memory is kept either way: its similarities
  give the refined targets' top-k part (``view_targets``);
- each term is the sum over the two modalities of its batch mean (``stage2.loss_reduction:
  sum-modalities``, the reference; ``mean``: L_CAI, L_fused and the triplet are batch means);
- triplet: batch-hard on the BN-neck features, within each modality (``stage2.triplet:
  per-modality``) plus, while the cross-modality sampler is on
  (``stage2.cross_sampler_from``), one over all images on unified ids
  (``stage2.triplet_all_modalities``). ``joint``: one batch-hard over the joint batch, and
  cross-modal positives only once the cross-modality sampler is on (dmdl's earlier form).

Memories update after each step (``stage2.memory_update``): per-modality with the stage
momentum, and with ``stage2.cross_memory_update`` the modality that adopted the other's ids
this epoch (``nearest-alternating``: visible on even epochs, infrared on odd) also moves the
other modality's rows of its unified ids (semi-cross-modality update: L_intra and CAI's
P(y|x,m) then see other-modality prototypes). Under an association without an adopting modality
(``hungarian``) neither ``stage2.k1_adopting`` nor ``stage2.cross_memory_update`` applies, and
the run says so. Per-sample order as in the reference: visible samples before
infrared ones (view A before view B) for the per-modality memories, infrared before visible
for the fused memory, which moves with CAI's confidence-weighted momentum
0.2 / max(t(y), 0.2) when ``cai.confidence_momentum``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dmdl_cli.clustering.association import (
    AssociationInput,
    ModalitySamples,
    adopter,
    associate,
    association_accuracy,
    association_chance,
)
from dmdl_cli.clustering.criteria import EpochLabels
from dmdl_cli.clustering.modalities import MODALITIES, cluster_modalities, criteria_labels, describe
from dmdl_cli.clustering.pseudo_labels import centroids as cluster_centroids
from dmdl_cli.console import log
from dmdl_cli.context import StageContext
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.cai import cai_log_prob_from_logits, modality_prior
from dmdl_cli.model.loading import load_model
from dmdl_cli.provenance import check_made_with
from dmdl_cli.recipe import Recipe, reached, triplet_weight
from dmdl_cli.selected import start_checkpoint
from dmdl_cli.stages import stage_spec
from dmdl_cli.training.labelling import (
    confidences,
    labelling_of_rows,
    log_criteria,
    make_memory,
    restore_memories,
    stage_batches,
    write_labels_file,
)
from dmdl_cli.training.hooks import Hook
from dmdl_cli.training.loop import run_stage
from dmdl_cli.training.losses import (
    batch_hard_triplet,
    cross_modal_triplet,
    reduce_over_modalities,
    sample_cross_entropy,
)
from dmdl_cli.training.memory import confidence_momentum
from dmdl_cli.training.objectives import (
    alignment,
    memory_contrast,
    stage_triplet,
    update_batch,
    view_targets,
)
from dmdl_cli.training.state import EpochState, StageLogic, TrainState
from dmdl_cli.workspace import load_checkpoint

FUSED = "fused"


def clustering_k1(recipe: Recipe, epoch: int) -> dict[int, int] | None:
    """Per-modality k1 overrides of this epoch's clustering: ``stage2.k1_adopting`` for the
    modality adopting the other's ids (the reference's k1 alternation); None without it or
    without an adopting modality."""
    k1, adopting = recipe.stage2.k1_adopting, adopter(recipe.association.method, epoch)
    return None if k1 is None or adopting is None else {adopting: k1}


def memory_updates(modality: torch.Tensor, adopting: int | None, cross: bool) -> dict[int, torch.Tensor]:
    """Which samples move each per-modality memory: ``{m: (N,) bool}``.

    Every sample moves its own modality's memory; with ``cross`` (``cross_memory_update``) the
    samples of the ``adopting`` modality (None: none) also move the other's.
    """
    out = {}
    for m in MODALITIES:
        movers = modality == m
        if cross and adopting is not None and m != adopting:
            movers = movers | (modality == adopting)
        out[m] = movers
    return out


def unified_memory_ids(labels: np.ndarray, modality: np.ndarray, m: int) -> np.ndarray:
    """Sorted unified ids that have at least one pseudo-labelled image of modality ``m``."""
    sel = (modality == m) & (labels >= 0)
    return np.unique(labels[sel]).astype(np.int64)


@dataclass
class Stage2Epoch(EpochState):
    """Stage 2's epoch: unified identity labels over both modalities; memories per modality
    (rows: the unified ids it has, ``ids[m]``) and the fused one (rows: every unified id)."""

    ids: dict[int, np.ndarray] = field(default_factory=dict)  # per modality: sorted unified ids
    prior: np.ndarray | None = None  # modality prior P(m) of CAI (model/cai.py)
    num_ids: int = 0  # unified identities this epoch
    # on the device, rebuilt by restore_epoch:
    ids_t: dict[int, torch.Tensor] = field(default_factory=dict)
    prior_t: torch.Tensor | None = None
    row_of_id: dict[int, torch.Tensor] = field(default_factory=dict)  # (num_ids,) row of memory m, -1
    cross_mode: bool = False  # the cross-modality sampler is on this epoch
    # (N_all,) each modality's own cluster ids per index row (-1 outlier or test row), before
    # the association: what the next epoch's criteria compare with
    clusters: np.ndarray | None = None

    def saved(self) -> dict[str, Any]:
        out = {**super().saved(), "ids": self.ids, "prior": self.prior, "num_ids": self.num_ids}
        if self.clusters is not None:
            out["clusters"] = self.clusters
        return out


class CrossModalityStage(StageLogic):
    spec = stage_spec("stage2")

    def initial_model(self, ctx: StageContext, *, resuming: bool):
        ws, recipe = ctx.ws, ctx.recipe
        upstream = stage_spec(self.spec.upstream)
        if not upstream.final(ws).is_file():
            raise DmdlError(f"{upstream.final(ws)} is missing: run `dmdl {upstream.command} "
                            f"--workspace {ws.root}` first (stage 2 starts from the stage-1 model)")
        path, pointer = start_checkpoint(ws, self.spec, recipe)  # stage2.start_from
        state = load_checkpoint(path, what="stage-1 checkpoint")
        check_made_with(ws, upstream, path, state["meta"], recipe,
                        f"re-run `dmdl {upstream.command} --force` with them")
        model, _ = load_model(state, recipe, path=path, check=True, what="stage-1 checkpoint")
        if not resuming:  # when resuming, the weights come from last.pt
            chosen = f" (stage 1's selected model, {ws.rel(pointer)})" if pointer else ""
            log(f"stage 2 starts from {ws.rel(path)}{chosen}")
        method = recipe.association.method
        if all(adopter(method, epoch) is None for epoch in range(recipe.stage2.epochs)):
            log(f"association.method {method}: no modality adopts the other's ids, so "
                "stage2.k1_adopting and stage2.cross_memory_update do not apply")
        return model, str(path)

    def upstream_files(self, ctx: StageContext) -> list:
        path, pointer = start_checkpoint(ctx.ws, self.spec, ctx.recipe)
        return [p for p in (pointer, path) if p is not None]

    def prepare_epoch(self, t: TrainState) -> Stage2Epoch:
        recipe, stage, epoch = t.recipe, t.stage, t.epoch
        feats = t.train_features()  # (N_train, D)
        clusters, inp, assoc = self.cluster(t, feats, epoch, announce=True)
        feats_of = t.train_position  # index row -> row of feats
        labels = np.full(len(t.ctx.index), -1, dtype=np.int64)  # unified ids per index row
        cluster_ids = np.full(len(t.ctx.index), -1, dtype=np.int64)  # each modality's own
        for m in MODALITIES:
            labels[clusters[m].rows] = assoc.labels[m]
            cluster_ids[clusters[m].rows] = clusters[m].labels
        modality = t.ctx.index.modality.astype(np.int64)
        labelled = np.flatnonzero(labels >= 0)
        fused = _centroids(feats, feats_of[labelled], labels[labelled])
        conf = np.ones(len(labels), dtype=np.float32)
        if recipe.cbt.refine and len(labelled):
            conf[labelled] = confidences(feats[feats_of[labelled]], fused, labels[labelled], stage.temp,
                                         stage.confidence_gmm)
        ids = {m: unified_memory_ids(labels, modality, m) for m in MODALITIES}
        memories = {}
        for m in MODALITIES:
            rows = np.flatnonzero((modality == m) & (labels >= 0))
            dense = np.searchsorted(ids[m], labels[rows])  # unified id -> row of memory m
            memories[m] = make_memory(_centroids(feats, feats_of[rows], dense), stage)
        memories[FUSED] = make_memory(fused, stage)
        prior = modality_prior(torch.from_numpy(labels), torch.from_numpy(modality)).numpy()
        self.log_labels(t, clusters, inp, assoc, prior, conf[labelled])
        log_criteria(t, criteria_labels(clusters, assoc.labels), feats, epoch)
        write_labels_file(t, epoch, labels, confidence=conf)
        return Stage2Epoch(epoch, labels, conf, memories, ids=ids, prior=prior,
                           num_ids=int(assoc.num_ids), clusters=cluster_ids)

    @staticmethod
    def cluster(t: TrainState, feats: np.ndarray, epoch: int, *, announce: bool):
        """Epoch ``epoch``'s clusters of the train features ``feats`` (N, D) per modality (the
        adopting modality with ``stage2.k1_adopting``; with the re-runs at eps -+
        ``select.eps_delta`` of the criteria), the association's input and its result.
        ``announce``: the epoch's own labelling, with its diagnostics and log lines."""
        recipe = t.recipe
        clusters = cluster_modalities(recipe.cluster, feats, t.ctx.train_rows, t.modality,
                                      t.true_ids if announce else None, clustering_k1(recipe, epoch),
                                      margin=recipe.select.eps_delta)
        if announce:
            for m in MODALITIES:
                log(f"epoch {epoch + 1} {MODALITY_NAMES[m]}: {describe(clusters[m].stats)}")
        feats_of = t.train_position  # index row -> row of feats
        inp = AssociationInput(epoch, {m: ModalitySamples(c.labels, feats[feats_of[c.rows]], c.centroids)
                                       for m, c in clusters.items()})
        return clusters, inp, associate(recipe.association.method, inp, recipe.association)

    def final_labelling(self, t: TrainState, feats: np.ndarray) -> EpochLabels:
        clusters, _, assoc = self.cluster(t, feats, t.stage.epochs, announce=False)
        return criteria_labels(clusters, assoc.labels)

    def saved_labelling(self, t: TrainState, saved: dict[str, Any]) -> EpochLabels | None:
        clusters = saved.get("clusters")  # a last.pt of an older dmdl holds only unified ids
        return None if clusters is None else labelling_of_rows(t, clusters, saved["labels"])

    @staticmethod
    def log_labels(t: TrainState, clusters, inp: AssociationInput, assoc, prior: np.ndarray,
                   conf: np.ndarray) -> None:
        """The epoch's ``labels`` record and line: clusters, unified ids, the modality prior,
        the mean confidence of the labelled images, and the association accuracy on data sets
        with identities (a diagnostic: training never reads true identities)."""
        recipe, epoch = t.recipe, t.epoch
        record = {"kind": "labels", "epoch": epoch, "step": 0, "unified_ids": int(assoc.num_ids),
                  **{MODALITY_NAMES[m]: clusters[m].stats for m in MODALITIES},
                  "prior": prior.tolist(), "mean_confidence": float(conf.mean()) if len(conf) else 1.0}
        if t.true_ids is not None:
            truth = np.full(len(t.ctx.index), -1, dtype=np.int64)
            truth[t.ctx.train_rows] = t.true_ids
            true_ids = {m: truth[clusters[m].rows] for m in MODALITIES}
            record["association_accuracy"] = association_accuracy(inp, assoc, true_ids)
            # what a random linking scores, to read the accuracy against
            record["association_chance"] = association_chance(inp, true_ids)
        log(f"epoch {epoch + 1}: {assoc.num_ids} unified identities ({recipe.association.method})"
            + (f", association accuracy {record['association_accuracy']:.3f} (diagnostic; a "
               f"random linking: {record['association_chance']:.3f})"
               if "association_accuracy" in record else ""))
        t.log(record)

    def restore_epoch(self, t: TrainState, saved: dict[str, Any]) -> Stage2Epoch:
        stage, device, index = t.stage, t.runtime.device, t.ctx.index
        memories = restore_memories(saved["memories"], stage, device)
        cross_mode = reached(stage.cross_sampler_from, saved["epoch"])
        batches = stage_batches(stage, index, t.recipe.train.seed, saved["labels"], saved["epoch"],
                                "cross-modality" if cross_mode else "per-modality")
        num_ids, ids = saved["num_ids"], saved["ids"]
        row_of_id = {}
        for m in MODALITIES:
            table = torch.full((num_ids,), -1, dtype=torch.long)
            table[torch.from_numpy(ids[m])] = torch.arange(len(ids[m]))
            row_of_id[m] = table.to(device)
        return Stage2Epoch(
            saved["epoch"], saved["labels"], saved["conf"], memories, batches,
            labels_t=torch.from_numpy(saved["labels"]).to(device),
            conf_t=torch.from_numpy(saved["conf"]).to(device),
            ids=ids, prior=saved["prior"], num_ids=num_ids,
            ids_t={m: torch.from_numpy(ids[m]).to(device) for m in MODALITIES},
            prior_t=torch.as_tensor(saved["prior"], dtype=torch.float32, device=device),
            row_of_id=row_of_id, cross_mode=cross_mode, clusters=saved.get("clusters"))

    def batch_loss(self, t: TrainState, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float], Callable[[], None]]:
        recipe, stage, epoch, state = t.recipe, t.stage, t.epoch, t.epoch_state
        rows, modality = batch["rows"], batch["modality"]
        b = rows.shape[0]
        labels = state.labels_t[rows]  # (B,) unified ids
        conf = state.conf_t[rows]
        refine = recipe.cbt.refine and reached(stage.onehot_epochs, epoch)
        bn = batch["bn"].float()  # (2B, D) BN-neck features, views A then B
        feat = F.normalize(bn, dim=1)
        fa, fb = feat[:b], feat[b:]
        both_labels, both_mod = torch.cat([labels, labels]), torch.cat([modality, modality])  # (2B,)
        late = late_memories(state, fa, fb, labels, modality, adopter(recipe.association.method, epoch),
                             stage, recipe.cai.enabled)
        terms = identity_terms(stage, recipe.cai.enabled, state, feat, labels, modality, conf,
                               refine, late)
        sigma = triplet_weight(stage.triplet_ramp, epoch)
        triplet = feat.new_zeros(())
        if sigma > 0:
            triplet = self.triplet(stage, bn, both_labels, both_mod, state.cross_mode)
        align = alignment(bn, modality, recipe) if recipe.cbt.align else feat.new_zeros(())
        identity = recipe.cai.weight * terms.cai if recipe.cai.enabled else terms.fused
        loss = terms.intra + identity + sigma * triplet + recipe.cbt.align_weight * align
        parts = {"intra": terms.intra.item(), "fused": terms.fused.item(), "cai": terms.cai.item(),
                 "triplet": triplet.item(), "align": align.item()}

        def update() -> None:
            self.update_memories(t, fa, fb, labels, modality, terms.ta, terms.tb)

        return loss, parts, update

    @staticmethod
    def triplet(stage, feat: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                cross_mode: bool) -> torch.Tensor:
        """Stage 2's triplet on ``feat (2B, D)`` with unified ``labels`` and ``modality``."""
        if stage.triplet == "joint" and cross_mode:
            term = cross_modal_triplet(feat, labels, modality, stage.triplet_margin)
        else:
            term = stage_triplet(stage, feat, labels, modality)
        if cross_mode and stage.triplet_all_modalities:
            term = term + batch_hard_triplet(feat, labels, stage.triplet_margin)
        return term

    @staticmethod
    def update_memories(t: TrainState, fa, fb, labels, modality, ta, tb) -> None:
        """Momentum updates of the per-modality memories and the fused memory (module doc)
        after a step on views ``fa``, ``fb`` (B, D) with targets ``ta``, ``tb``."""
        recipe, stage, state = t.recipe, t.stage, t.epoch_state
        if ta.dim() == 2:  # (2B,) target probability t(y) of each view's own label
            own_target = torch.cat([ta.gather(1, labels[:, None]).squeeze(1),
                                    tb.gather(1, labels[:, None]).squeeze(1)])
        else:
            own_target = torch.ones(2 * labels.shape[0], device=fa.device)
        feat, lab, mod = update_batch(fa, fb, labels, modality)
        movers = memory_updates(mod, adopter(recipe.association.method, t.epoch),
                                stage.cross_memory_update)
        for m in MODALITIES:
            sel = movers[m]
            if bool(sel.any()):
                state.memories[m].update(feat[sel], state.row_of_id[m][lab[sel]])
        feat, lab, _, target = update_batch(fa, fb, labels, modality, own_target, first=INFRARED)
        momentum = None
        if recipe.cai.enabled and recipe.cai.confidence_momentum:
            momentum = confidence_momentum(target, base=stage.momentum)
        state.memories[FUSED].update(feat, lab, momentum)


@dataclass
class IdentityTerms:
    """Stage 2's identity terms of a batch and the targets they were computed with."""

    intra: torch.Tensor  # L_intra, against each sample's own modality memory
    fused: torch.Tensor  # likelihood term against the fused memory (trained without CAI)
    cai: torch.Tensor  # L_CAI (0 when CAI is off)
    ta: torch.Tensor  # targets of view A: (B,) unified ids or (B, num_ids) refined
    tb: torch.Tensor  # targets of view B


def identity_terms(stage, cai_enabled: bool, state: Stage2Epoch, feat: torch.Tensor,
                   labels: torch.Tensor, modality: torch.Tensor, conf: torch.Tensor, refine: bool,
                   late: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> IdentityTerms:
    """L_intra, the fused likelihood term and L_CAI of a batch (module docstring).

    ``feat`` ``(2B, D)`` L2-normalised, views A then B; ``labels``, ``modality``, ``conf``
    ``(B,)``; ``late`` from :func:`late_memories` (empty: every gradient reads the forward's
    memory rows). Each per-modality memory's logits are computed once for the whole batch and
    feed both L_intra and CAI's P(y | x, m), as in the reference.
    """
    b = labels.shape[0]
    fa, fb = feat[:b], feat[b:]
    both_mod = torch.cat([modality, modality])
    fused = state.memories[FUSED]
    za, zb = fused.logits(fa), fused.logits(fb)  # (B, num_ids)
    ta, tb = view_targets(labels, conf, za, zb, stage.refine_topk, refine)
    per_sample = torch.cat([sample_cross_entropy(za, ta), sample_cross_entropy(zb, tb)])
    loss_fused = reduce_over_modalities(per_sample, both_mod, stage.loss_reduction)
    logits = {m: state.memories[m].logits(feat, *late.get(m, (None, None))) for m in MODALITIES}
    intra = memory_contrast(state.memories, lambda m, sel: state.row_of_id[m][labels[sel]], fa, fb,
                            modality, conf, stage.refine_topk,
                            refine and stage.intra_targets == "refined",
                            logits=lambda m, sel: (logits[m][:b][sel], logits[m][b:][sel]))
    cai = feat.new_zeros(())
    if cai_enabled:
        soft = torch.cat([q if q.dim() == 2 else F.one_hot(q, state.num_ids).float() for q in (ta, tb)])
        log_p = cai_log_prob_from_logits([logits[m] for m in MODALITIES],
                                         [state.ids_t[m] for m in MODALITIES], state.prior_t,
                                         state.num_ids)  # (2B, num_ids)
        cai = reduce_over_modalities(-(soft * log_p).sum(dim=1), both_mod, stage.loss_reduction)
    return IdentityTerms(intra, loss_fused, cai, ta, tb)


def late_memories(state: Stage2Epoch, fa: torch.Tensor, fb: torch.Tensor, labels: torch.Tensor,
                  modality: torch.Tensor, adopting: int | None, stage, cai_enabled: bool
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """What the in-place memory gradient (``stage2.memory_gradient: in-place``) reads: per
    memory m, ``(late (2B,) bool, rows (C_m, D))``, the batch rows whose gradient against m
    reads ``rows`` instead of the forward's.

    The reference computes the infrared samples' memory terms first and the visible ones'
    second; its memory autograd functions move memory rows inside ``backward``, which runs in
    reverse order. So the visible samples' nodes move their memories (their own, and the
    infrared one on the epochs they adopt its ids) before the infrared samples' nodes compute
    their input gradients, which read the moved rows, for every memory the infrared samples
    move themselves (their own; the visible one on the epochs they adopt its ids): against a
    memory they do not move the reference uses a copy taken in the forward. The result is an
    instance-level pull of the infrared samples toward this batch's visible samples of the same
    unified id. Visible gradients read the forward's rows. Empty with ``fixed``.

    Without CAI nothing changes either: only CAI's P(y | x, m) reads a sample's logits against
    the *other* modality's memory, so without it those autograd nodes reach no loss term and
    autograd never runs their backward (nor the memory moves inside it); the infrared samples'
    own-memory node then reads rows no visible node moved.
    """
    if stage.memory_gradient != "in-place" or not cai_enabled:
        return {}
    feat, lab, mod = update_batch(fa, fb, labels, modality)  # the reference's update order
    movers = memory_updates(mod, adopting, stage.cross_memory_update)
    late = torch.cat([modality, modality]) == INFRARED  # (2B,) rows of infrared samples
    out = {}
    for m in MODALITIES:
        visible = movers[m] & (mod == VISIBLE)
        if bool((movers[m] & (mod == INFRARED)).any()) and bool(visible.any()):
            out[m] = (late, state.memories[m].moved(feat[visible], state.row_of_id[m][lab[visible]]))
    return out


def _centroids(feats: np.ndarray, positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, D) L2-normalised centroids of ``feats[positions]`` grouped by dense ``labels``
    (``(0, D)`` without any row)."""
    if len(positions) == 0:
        return np.zeros((0, feats.shape[1]), np.float32)
    return cluster_centroids(feats[positions], labels)


def train_cross(ctx: StageContext, *, resume: bool = False, force: bool = False,
                deterministic: bool = False, hooks: Sequence[Hook] = ()):
    """Stage 2 in the context the command runner built (see ``run_stage``)."""
    return run_stage(ctx, CrossModalityStage(), resume=resume, force=force,
                     deterministic=deterministic, hooks=hooks)
