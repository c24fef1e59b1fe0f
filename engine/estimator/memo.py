"""Memoised pure work of the estimator, keyed explicitly: fit and the planner ask for the same model many times."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import GpuSpec

Cache = dict[tuple, tuple[ModelSpec, GpuSpec | None, Any]]


def memoised(cache: Cache, key: tuple, model: ModelSpec, gpu: GpuSpec | None, compute: Callable[[], Any],
             limit: int = 256) -> Any:
    """`compute()` memoised per key and the model and GPU objects, by identity (a caller's own spec is not a
    preset's); the cache is emptied once it holds `limit` answers."""
    full_key = (id(model), id(gpu), key)
    hit = cache.get(full_key)
    if hit is not None and hit[0] is model and hit[1] is gpu:
        return hit[2]
    if len(cache) >= limit:
        cache.clear()
    value = compute()
    cache[full_key] = (model, gpu, value)  # holding the specs keeps their ids from being reused
    return value
