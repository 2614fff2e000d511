"""What every stage reads, built once per command by the command runner (``dmdl_cli/runner.py``).

A stage is a function of a :class:`StageContext` (and its own options): the workspace, the
resolved recipe, the stage's record in the table of stages, the runtime, the ledger entry of
this command, the checkpoint it loads (``--checkpoint``, resolved once by the runner) and,
opened on first use, the index, the image cache and that checkpoint's model. Nothing here
decides policy (locks, ledger, force or resume): the runner does that before it hands the
context over.

This module imports no torch: the model loader is imported when :meth:`StageContext.model` is
first called, and the runtime is selected by the runner only for a stage whose record says it
runs on a device (``StageSpec.device``), so prepare-data and select run without torch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dmdl_cli.data.cache import ImageCache, open_cache
from dmdl_cli.data.index import IndexTable, read_index
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import Recipe
from dmdl_cli.stages import StageSpec
from dmdl_cli.workspace import StageRun, Workspace

if TYPE_CHECKING:  # both import torch: loaded only by stages that run a network
    from dmdl_cli.model.loading import LoadedModel
    from dmdl_cli.runtime import Runtime


@dataclass
class StageContext:
    ws: Workspace
    recipe: Recipe
    spec: StageSpec
    runtime: Runtime | None  # None for a stage that runs on no device (StageSpec.device)
    ledger: StageRun | None = None  # this command's ledger entry (None on DDP ranks other than 0)
    # what a stage that loads a checkpoint loads (dmdl_cli.stages.resolve_checkpoint): a path,
    # "imagenet" (the untrained backbone), None (nothing trained yet)
    checkpoint: Path | str | None = None

    @functools.cached_property
    def index(self) -> IndexTable:
        """The workspace's image index (every split), recorded as an input in the ledger."""
        index = read_index(self.ws.index_path)
        # the sha256 the manifest holds: the runner checked the file against it
        self._record_input(self.ws.index_path, (self.ws.dataset or {}).get("index_sha256"))
        return index

    @functools.cached_property
    def cache(self) -> ImageCache:
        """``(N_all, H, W, 3)`` uint8 images at the recipe's size, row i = index row i, each
        row checked against its checksum as it is read; recorded as an input in the ledger
        (the sha256 of the file as prepared; :meth:`record_reads` adds what was read)."""
        height, width = self.recipe.data.height, self.recipe.data.width
        path = self.ws.cache_path(height, width)
        cache = open_cache(path, len(self.index), height, width, resize=self.recipe.data.resize)
        self._record_input(path, cache.sha256)
        return cache

    def record_reads(self) -> None:
        """Add to the cache's ledger record which rows this command read (each one checked
        against its checksum) and the sha256 of their checksums (``ImageCache.read_summary``);
        written with the entry's final state."""
        cache = self.__dict__.get("cache")  # only when the command opened it
        if self.ledger is not None and cache is not None:
            self.ledger.add_input(cache.path, cache.sha256, write=False, **cache.read_summary())

    @functools.cached_property
    def train_rows(self) -> np.ndarray:
        """``(N,)`` index rows of the training split; refuses an index without any."""
        rows = self.index.rows(split="train")
        if len(rows) == 0:
            raise DmdlError(f"{self.ws.index_path} has no train rows: nothing to train on")
        return rows

    def model(self) -> LoadedModel:
        """The network of :attr:`checkpoint` (``dmdl_cli.model.loading.resolve_model``), on the
        runtime's device, recorded as an input of this command in the ledger (the command's
        entry is written from here on)."""
        if self.runtime is None:
            raise RuntimeError(f"{self.spec.command} loads a model: its record in the table of "
                               f"stages needs device=True (dmdl_cli/stages.py)")
        from dmdl_cli.model.loading import resolve_model  # torch: only a stage with a device

        loaded = resolve_model(self.ws, self.recipe, self.checkpoint)
        loaded.model.to(self.runtime.device)
        if self.ledger is not None:
            if loaded.path is not None:
                self.ledger.add_input(loaded.path, loaded.sha256)  # the bytes that were loaded
            self.ledger.set(checkpoint=loaded.name)
        return loaded

    def _record_input(self, path, sha256: str | None) -> None:
        """Index and cache are opened before a stage's checks are done: their records reach
        the ledger with the next write (the model, an output), so a refusal leaves none."""
        if self.ledger is not None:
            self.ledger.add_input(path, sha256, write=False)

    def record_input(self, *paths) -> None:
        """Record workspace files this command read (with their sha256) in the ledger."""
        if self.ledger is not None:
            for path in paths:
                self.ledger.add_input(path)

    def record_output(self, *paths) -> None:
        """Record files this command wrote (with their sha256) in the ledger."""
        if self.ledger is not None:
            for path in paths:
                self.ledger.add_output(path)

    @property
    def folder(self) -> Path:
        """``WS/<folder>``: the workspace folder this command's stage owns and writes into."""
        return self.ws.root / self.spec.folder

    def output(self, name: str) -> Path:
        """``WS/<folder>/<name>``: where this command writes its file ``name``."""
        return self.folder / name
