"""The network (:mod:`.backbone`) and the CAI backdoor-adjusted prediction (:mod:`.cai`)."""
from dmdl_cli.model.backbone import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ReIDNet,
    build_model,
    model_signature,
    normalize_batch,
)
from dmdl_cli.model.weights import imagenet_weight_candidates
from dmdl_cli.model.cai import cai_log_prob, cai_loss, modality_prior

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ReIDNet",
    "build_model",
    "cai_log_prob",
    "cai_loss",
    "imagenet_weight_candidates",
    "modality_prior",
    "model_signature",
    "normalize_batch",
]
