"""Training math: cluster memories, losses and CBT label refinement."""
from dmdl_cli.training.losses import (
    batch_hard_triplet,
    contrastive_loss,
    cross_modal_triplet,
    mmd_multi_kernel,
    modality_triplet,
    pairwise_distances,
    reduce_over_modalities,
    sample_cross_entropy,
)
from dmdl_cli.training.memory import ClusterMemory, confidence_momentum
from dmdl_cli.training.refine import gmm_confidence, refined_targets, sample_losses

__all__ = [
    "ClusterMemory",
    "batch_hard_triplet",
    "confidence_momentum",
    "contrastive_loss",
    "cross_modal_triplet",
    "gmm_confidence",
    "mmd_multi_kernel",
    "modality_triplet",
    "pairwise_distances",
    "reduce_over_modalities",
    "refined_targets",
    "sample_cross_entropy",
    "sample_losses",
]
