"""The step caches dtx ships, by the name ``sample.cache`` / ``dtx sample --cache`` gives them (registered by the
core's builtin plugin; plugins add more through ``dtx_register_caches``)."""

from __future__ import annotations

from typing import Any, Callable

from .attention_broadcast import PyramidAttentionBroadcast
from .first_block_cache import FirstBlockCache
from .teacache import TeaCache

CACHES: dict[str, Callable[..., Any]] = {"first-block": FirstBlockCache, "teacache": TeaCache,
                                         "pab": PyramidAttentionBroadcast}
