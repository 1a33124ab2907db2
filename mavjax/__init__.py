"""mavjax: Llama 4 Maverick inference in JAX/Pallas."""

from mavjax import xla_flags

xla_flags.apply_defaults()  # before anything starts JAX's backend: see mavjax/xla_flags.py

from mavjax.api import LLM, GenerationOutput, PromptError
from mavjax.config import ConfigError, Llama4Config, preset
from mavjax.sampling import SamplingError, SamplingParams

__all__ = ["LLM", "GenerationOutput", "PromptError", "Llama4Config", "ConfigError", "preset", "SamplingParams",
           "SamplingError"]
