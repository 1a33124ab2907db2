"""FP8 weight quantization of a loaded model (`LLM(path, quantize="fp8")`).

Every projection weight that `mavjax.model` declares with `contract` axes (attention, dense MLPs, shared and
routed experts) becomes float8_e4m3fn with a float32 scale per output channel (amax over the contracted axes
/ 448, pallas_kernels.fp8_gemm's scheme), in the FP8 model's stored layout (`mavjax.model.stored_layout`: the
attention and dense-MLP weights output first); embedding, LM head, router and norms stay as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.model import Llama4, stored_layout
from pallas_kernels.fp8_gemm import quantize_weight_per_channel


def quantize_weight(w, contract: tuple[int, ...]):
    """w [...] -> (float8_e4m3fn [...], float32 scale over the non-contracted axes)."""
    keep = tuple(i for i in range(w.ndim) if i not in contract)
    perm = tuple(contract) + keep
    wt = jnp.transpose(w, perm)
    q2, s2 = quantize_weight_per_channel(wt.reshape(int(np.prod([w.shape[i] for i in contract])), -1))
    q = jnp.transpose(q2.reshape(wt.shape), np.argsort(perm))
    return q, s2.reshape([w.shape[i] for i in keep])


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_stored(w, perm, contract):
    """A weight in its bf16 layout -> (FP8 in the stored layout, scale), for `stored_layout`'s (perm, contract):
    quantize_weight of jnp.transpose(w, perm). Used on load (quantize_model) and by the converter."""
    return quantize_weight(jnp.transpose(w, perm), contract)


def quantize_model(model: Llama4) -> Llama4:
    """A `quant="fp8"` copy of a bf16/f32 model (same kernels choice). Parameters are moved one by one, so the
    peak is the model plus one weight."""
    q = nnx.eval_shape(lambda: Llama4(model.cfg, dtype=model.dtype, kernels=model.kernels, quant="fp8"))
    src = dict(nnx.to_flat_state(nnx.state(model)))
    dst = dict(nnx.to_flat_state(nnx.state(q)))
    for path, var in dst.items():
        name = path[-1]
        if isinstance(name, str) and name.endswith("_scale"):
            continue  # filled with its weight
        value = src[path].get_value()
        layout = stored_layout(var)
        if layout is not None:
            w8, scale = quantize_stored(value, *layout)
            var.set_value(w8)
            dst[path[:-1] + (name + "_scale",)].set_value(scale)
        else:
            var.set_value(value)
    nnx.update(q, nnx.from_flat_state(dst))
    return q
