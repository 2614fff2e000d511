"""dmdl: unsupervised visible-infrared person re-identification with DMDL.

Command line: ``dmdl --help``. Python: :func:`dmdl_cli.embed` returns L2-normalised embeddings
of images for a checkpoint (see ``dmdl_cli/inference.py``).
"""
from __future__ import annotations

__version__ = "0.1.0"


def embed(images, checkpoint, **kwargs):  # noqa: ANN001 - thin lazy re-export
    """L2-normalised embeddings (N, D) of PIL images or paths; see :func:`dmdl_cli.inference.embed`."""
    from dmdl_cli.inference import embed as _embed

    return _embed(images, checkpoint, **kwargs)


__all__ = ["__version__", "embed"]
