"""mavjax: Llama 4 Maverick inference in JAX/Pallas."""

from mavjax.api import LLM, GenerationOutput, PromptError
from mavjax.config import ConfigError, Llama4Config, preset
from mavjax.sampling import SamplingError, SamplingParams

__all__ = ["LLM", "GenerationOutput", "PromptError", "Llama4Config", "ConfigError", "preset", "SamplingParams",
           "SamplingError"]
