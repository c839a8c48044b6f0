"""Generation engines: transformers (CPU fallback, reference) and vLLM (the fast path).

``vllm_engine`` imports vLLM lazily; importing this package never imports vLLM.
"""

from scalerl.engines.base import (
    Completion,
    Engine,
    EngineError,
    GroupRequest,
    SamplingSettings,
    Throttled,
    WeightSource,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "GroupRequest",
    "SamplingSettings",
    "Throttled",
    "WeightSource",
]
