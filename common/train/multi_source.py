"""Several teachers as one TeacherSource (common/train/loop.py) for a multi-teacher run.

Each teacher keeps its own source (its feature cache, `CachedTeacher`, or a live eval-mode
forward, `LiveTeacher`); this class hands the loop their features under one key per distilled
(teacher, layer) pair, so the distiller, its projectors and the loop see k pairs as they see k
layers of one teacher. No teacher logits: several teachers serve logit-free methods only.

Every source draws the epoch's batch order from the same generator state, so all teachers read
the same rows in the same order; each cached source then checks its rows once per epoch, as alone.
"""
from __future__ import annotations

import torch

from common.train.loop import TeacherSource


class MultiTeacher:
    """The features of several teachers' sources under pair keys: `keys[t]` maps teacher t's
    layer index to the key the distiller knows the pair by."""

    def __init__(self, sources: list[TeacherSource], keys: list[dict[int, int]]) -> None:
        if len(sources) != len(keys):
            raise ValueError(f"{len(sources)} sources but {len(keys)} key maps")
        self.sources, self.keys = sources, keys
        self._own: list[dict[int, torch.Tensor] | None] = []  # per later source: first batch's id -> its own batch

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The first source's batches; every other source orders the same generator state, so its
        batches hold the same rows (checked), and it is handed its own tensors (a cached source knows
        its epoch's batches by identity). A source that orders otherwise (block reads of a huge cache)
        reads the first source's batches, checked per batch."""
        state = generator.get_state()
        first = self.sources[0].batch_order(indices, batch_size, generator)
        after = generator.get_state()
        self._own = []
        for source in self.sources[1:]:
            generator.set_state(state)
            own = source.batch_order(indices, batch_size, generator)
            same = len(own) == len(first) and all(torch.equal(a, b) for a, b in zip(first, own))
            self._own.append({id(a): b for a, b in zip(first, own)} if same else None)
        generator.set_state(after)
        self._first = first  # kept alive: the ids above stay theirs for the epoch
        return first

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        feats: dict[int, torch.Tensor] = {}
        for t, (source, keys) in enumerate(zip(self.sources, self.keys)):
            own = indices
            if t > 0 and self._own and self._own[t - 1] is not None:
                own = self._own[t - 1].get(id(indices), indices)  # type: ignore[union-attr]
            got, _ = source.batch(own, images)
            for layer, key in keys.items():
                feats[key] = got[layer]
        return feats, None
