"""Generation engines: transformers (CPU fallback, reference) and vLLM (the fast path).

The vLLM modules (``vllm_common``, ``vllm_engine``, ``vllm_async``) import vLLM lazily;
importing this package never imports vLLM.
"""

from scalerl.engines.base import (
    Completion,
    Engine,
    EngineError,
    GroupRequest,
    InPlaceEngine,
    SamplingSettings,
    Throttled,
    WeightSource,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "GroupRequest",
    "InPlaceEngine",
    "SamplingSettings",
    "Throttled",
    "WeightSource",
]
