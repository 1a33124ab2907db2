"""Tensor- and expert-parallel layer bodies under `jax.shard_map`, chosen by the mesh the model is given.

`Llama4.set_parallel(Parallel(mesh))` (what `LLM(mesh=...)` does) switches every layer to the bodies below; the
single-device model is untouched. Parameters stay sharded as `mavjax.sharding.RULES` says; these functions take
their local shards and keep every layer to one all-reduce per half-layer:

- attention: q/k/v and the attention itself are partitioned by XLA (heads over the mesh); the output projection
  runs under shard_map on each device's heads, giving a partial sum [B, T, D];
- FFN: dense SwiGLU on each device's slice of hidden units; MoE: the shared expert on each device's slice of
  its hidden units plus the routed experts (below), one partial sum;
- at each of the two layer boundaries the partial sums are reduced, added to the residual and normalised by the
  next RMSNorm in one function, `allreduce_residual_rmsnorm`, so a faster all-reduce (the one-shot kernel of
  pallas_kernels/allreduce.py) can fuse all three.

Routed experts (experts over the `expert` axis, each expert's hidden units over `tensor`):

- decode / few tokens (`moe_local`): activations are replicated, so each device computes the (token, expert)
  pairs whose expert is one of its own, on its slice of hidden units; the rest are masked. The partial
  outputs join the shared expert's partial sum in the layer's one psum over both axes.
- prefill / many tokens (`moe_exchange`): each expert-axis shard takes 1/E of the tokens, sends every
  (token, expert) pair to the shard owning the expert with `all_to_all`, computes grouped GEMMs over what it
  received (its own experts only) and sends the results back. `ragged_all_to_all` would send only the real
  rows, but XLA:CPU does not implement it ("HLO opcode ragged-all-to-all is not supported by XLA:CPU
  ThunkEmitter", jax 0.10.2), and these paths must be checkable on CPU; so the exchange is a dense
  `all_to_all` of fixed-size buffers, sized so that nothing is ever dropped (see `moe_exchange`).
  `Parallel(exchange="ragged")` opts into `ragged_all_to_all` (`moe_exchange_ragged`: only real rows travel);
  on CPU it runs an all_gather emulation of the primitive, so its offsets are tested here and the primitive
  itself only on GPUs.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mavjax.sharding import ShardingError, spec_for

# At or above this many tokens in a MoE call (prefill, large batches) the routed experts exchange tokens
# between expert shards; below it (decode) every device works on the replicated tokens it already holds.
EXCHANGE_MIN_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a model runs over a mesh (a static, hashable part of the model graph).
    `allreduce`: "xla" (psum, then add, then norm: the reference) or "oneshot" (the NVLink peer-memory kernel,
    GPU only, unverified until run on two GPUs). `exchange_min_tokens`: the MoE decode/prefill switch."""
    mesh: Mesh
    expert_axis: str = "expert"
    tensor_axis: str = "tensor"
    allreduce: str = "xla"
    exchange_min_tokens: int = EXCHANGE_MIN_TOKENS
    exchange: str = "all_to_all"
    # How the vocabulary-sharded logits become whole on every device (`logits`): "psum" (each device adds its
    # slice into zeros: one all-reduce), "all_gather", or "gspmd" (left sharded; XLA partitions the sampler's
    # argmax / sort itself). MAVJAX_LOGITS_GATHER sets the default (A/B runs on GPUs).
    logits_gather: str = dataclasses.field(default_factory=lambda: os.environ.get("MAVJAX_LOGITS_GATHER", "psum"))

    def __post_init__(self):
        if self.logits_gather not in ("psum", "all_gather", "gspmd"):
            raise ValueError(f"logits_gather must be 'psum', 'all_gather' or 'gspmd', got {self.logits_gather!r}")
        if self.allreduce not in ("xla", "oneshot"):
            raise ValueError(f"allreduce must be 'xla' or 'oneshot', got {self.allreduce!r}")
        if self.exchange not in ("all_to_all", "ragged"):
            raise ValueError(f"exchange must be 'all_to_all' or 'ragged', got {self.exchange!r}")
        for a in (self.expert_axis, self.tensor_axis):
            if a not in self.mesh.shape:
                raise ShardingError(f"mesh has no axis {a!r} (axes {tuple(self.mesh.shape)})")

    @property
    def axes(self) -> tuple[str, str]:
        return (self.expert_axis, self.tensor_axis)

    def spec(self, var) -> P:
        """The PartitionSpec a parameter is stored with (the rules), i.e. the shard shard_map hands its body."""
        return spec_for(var.get_metadata()["logical_axes"], var.shape, self.mesh, "")

    def axis_spec(self, var, logical: str):
        """The mesh axes (or None) that the dimension of parameter `var` named `logical` is split over."""
        spec = tuple(self.spec(var))
        i = tuple(var.get_metadata()["logical_axes"]).index(logical)
        return spec[i] if i < len(spec) else None

    def smap(self, f, in_specs, out_specs):
        # check_vma off: the bodies' P() outputs come out of a psum (replicated by construction), and the
        # exchange's all_to_all / ragged buffers are per-device values the checker cannot follow through scatters.
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ---- the fused layer boundary -------------------------------------------------------------------------------
def allreduce_residual_rmsnorm(partial, residual, scale, eps, axis_names, impl: str = "xla"):
    """Inside shard_map: sum `partial` [..., D] over `axis_names`, add `residual` [..., D], RMS-normalise with
    `scale` [D]. Returns (new residual, normed), both replicated. "xla": psum then add then norm (the
    reference); "oneshot": every device writes its partial into every peer's buffer over NVLink and each sums
    locally, the residual add in the same kernel, the norm after it in XLA (pallas_kernels/allreduce.py, GPU
    only)."""
    from mavjax.model import rms_norm

    if impl == "oneshot":
        from pallas_kernels.allreduce import oneshot_allreduce_residual_rmsnorm

        return oneshot_allreduce_residual_rmsnorm(partial, residual, scale, eps, axis_names)
    x = residual + jax.lax.psum(partial, axis_names).astype(residual.dtype)
    return x, rms_norm(x, scale, eps)


# ---- the token embedding and the LM head ---------------------------------------------------------------------
def _mesh_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def embed(par: Parallel, table, tokens):
    """table [V, D] (vocabulary sharded by the rules), tokens [B, T] -> [B, T, D] replicated: each device looks
    up the tokens its rows hold (zeros for the others) and one psum joins them (vLLM's vocabulary-parallel
    embedding). Left to GSPMD, XLA:GPU all-gathered the whole table for every lookup: 1 GB per decode step
    for Maverick over 2 H200s, 3.7 ms of a 4.4 ms step (docs/benchmarks.md section 8)."""
    spec = spec_for(("vocab", "embed"), table.shape, par.mesh, "embed")
    vocab_axes = _mesh_axes(spec[0])
    if not vocab_axes:
        return table[tokens]

    def body(table, tokens):
        rows = table.shape[0]  # this device's slice of the vocabulary: [start, start + rows)
        local = tokens - jax.lax.axis_index(vocab_axes) * rows
        mine = (local >= 0) & (local < rows)
        x = jnp.take(table, jnp.where(mine, local, 0), axis=0)  # [B, T, D]
        return jax.lax.psum(jnp.where(mine[..., None], x, jnp.zeros((), x.dtype)), vocab_axes)  # exact: one term

    return par.smap(body, (P(spec[0], None), P()), P())(table, tokens)


def logits(par: Parallel, h, w):
    """h [B, T, D] (replicated) @ w [D, V] (vocabulary sharded by the rules) -> float32 logits [B, T, V],
    whole on every device, so the sampler and speculative acceptance after it run locally, with no collective
    of their own (one psum of the logits per step). Left to GSPMD ("gspmd"), every argmax, sort or top-k over
    the sharded logits gets collectives of XLA's choosing inside the decode loop (small NCCL all-gathers for a
    greedy argmax; docs/benchmarks.md section 8 times the modes)."""
    head = lambda h, w: jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)  # noqa: E731
    spec = spec_for(("embed", "vocab"), w.shape, par.mesh, "lm_head")
    vocab_axes = _mesh_axes(spec[1])
    if par.logits_gather == "gspmd" or not vocab_axes:
        return head(h, w)
    V = w.shape[1]

    def body(h, w):
        local = head(h, w)  # [B, T, V/n]
        if par.logits_gather == "all_gather":
            return jax.lax.all_gather(local, vocab_axes, axis=2, tiled=True)
        shard = jax.lax.axis_index(vocab_axes)  # the slice's place, counted over the vocabulary's axes in order
        whole = jnp.zeros(local.shape[:2] + (V,), local.dtype)
        whole = jax.lax.dynamic_update_slice_in_dim(whole, local, shard * local.shape[2], axis=2)
        return jax.lax.psum(whole, vocab_axes)  # exact: every element is one shard's value plus zeros

    return par.smap(body, (P(), P(None, spec[1])), P())(h, w)


# ---- the forward pass ---------------------------------------------------------------------------------------
def hidden_states(model, tokens, positions, cache=None, write_index=None, collect_layers=(), attn_mask=None,
                  fresh_cache=False):
    """`Llama4.hidden_states` over the mesh: same inputs and outputs, every layer boundary fused."""
    from mavjax.kv_cache import KVCache, write_slots
    from mavjax.model import rms_norm, rope_tables

    par: Parallel = model.parallel
    x = model.embed_tokens(tokens)  # [B, T, D]
    rope = rope_tables(model.inv_freq[...], positions)
    cache_pos = None if cache is None else write_slots(cache.pos, positions, write_index)
    layers = list(model.layers)
    h = rms_norm(x, layers[0].attn_norm.scale[...], layers[0].attn_norm.eps)  # no all-reduce before layer 0
    new_kv, taps = [], {}
    for i, layer in enumerate(layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        o, kv = attention(par, layer.attn, h, positions, rope, kv, cache_pos, write_index, attn_mask,
                          fresh_cache)  # [B, T, H, Dh]
        new_kv.append(kv)
        x, h = attn_out(par, layer.attn, o, x, layer.ffn_norm)
        nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else model.norm
        x, h = (moe(par, layer.ffn, h, x, nxt) if layer.is_moe else mlp(par, layer.ffn, h, x, nxt))
        if i in collect_layers:
            taps[i] = x
    if cache is not None:
        cache = KVCache(k=[kv[0] for kv in new_kv], v=[kv[1] for kv in new_kv], pos=cache_pos)
    return h, cache, taps


def attention(par: Parallel, attn, h, positions, rope, kv, cache_pos, write_index, attn_mask, fresh_cache=False):
    """One layer's attention before wo (q/k/v, the cache write, attention): o [B, T, H, Dh] sharded over heads,
    and the updated (k, v). kernels="pallas" runs it under shard_map, each device on its own q heads, kv heads
    and slice of the cache (the rules shard all three alike): a Pallas kernel is opaque to GSPMD, which would
    otherwise gather its operands, weights and the whole KV cache, to every device. The XLA path is left to
    GSPMD, which partitions its einsums the same way."""
    if attn.kernels != "pallas":
        return attn(h, positions, rope, kv, cache_pos, write_index, attn_mask, project=False, fresh_cache=fresh_cache)
    from flax import nnx

    from mavjax.sharding import CACHE_AXES

    graphdef, state = nnx.split(attn)
    arrays, treedef = jax.tree.flatten(state)
    specs = [par.spec(v) for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    o_spec = P(None, None, par.axis_spec(attn.wq, "heads"), None)
    kv_spec = None if kv is None else spec_for(CACHE_AXES, kv[0].shape, par.mesh, "kv cache")
    extra = {"rope": rope, "cache_pos": cache_pos, "write_index": write_index, "attn_mask": attn_mask}
    extra = {k: v for k, v in extra.items() if v is not None}  # shard_map takes arrays, not None

    def body(arrays, h, positions, kv, extra):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))
        return m(h, positions, extra.get("rope"), kv, extra.get("cache_pos"), extra.get("write_index"),
                 extra.get("attn_mask"), project=False, fresh_cache=fresh_cache)

    kv_specs = None if kv is None else (kv_spec, kv_spec)
    out_specs = (o_spec, kv_specs)
    return par.smap(body, (specs, P(), P(), kv_specs, jax.tree.map(lambda _: P(), extra)), out_specs)(
        arrays, h, positions, kv, extra)


def _operands(par: Parallel, **named):
    """name -> (value, spec) for the parameters (nnx Variables, or None) a shard_map body takes."""
    vals, specs = {}, {}
    for name, var in named.items():
        if var is not None:
            vals[name], specs[name] = var[...], par.spec(var)
    return vals, specs


def attn_out(par: Parallel, attn, o, residual, norm):
    """Output projection on each device's heads, then the fused all-reduce + residual + ffn_norm.
    o [B, T, H, Dh] (heads sharded as wo's), residual [B, T, D]."""
    from mavjax.model import dense

    w, s = _operands(par, wo=attn.wo, wo_scale=attn.wo_scale, norm=norm.scale)
    heads = par.axis_spec(attn.wo, "heads")

    def body(o, residual, w):
        # [B, T, H/n, Dh] x [H/n, Dh, D] (FP8: [D, H/n, Dh]) -> [B, T, D]
        partial = dense(o, w["wo"], w.get("wo_scale"), 2, attn.kernels, attn.w_nk)
        return allreduce_residual_rmsnorm(partial, residual, w["norm"], norm.eps, par.axes, par.allreduce)

    return par.smap(body, (P(None, None, heads, None), P(), s), (P(), P()))(o, residual, w)


def mlp(par: Parallel, ffn, h, residual, norm):
    """Dense SwiGLU on each device's hidden units, then the fused boundary. h, residual [B, T, D]."""
    w, s = _operands(par, gate=ffn.w_gate, gate_s=ffn.w_gate_scale, up=ffn.w_up, up_s=ffn.w_up_scale,
                     down=ffn.w_down, down_s=ffn.w_down_scale, norm=norm.scale)

    def body(h, residual, w):
        partial = _swiglu(h, w, ffn.kernels, ffn.w_nk)  # [B, T, D], partial over the hidden units
        return allreduce_residual_rmsnorm(partial, residual, w["norm"], norm.eps, par.axes, par.allreduce)

    return par.smap(body, (P(), P(), s), (P(), P()))(h, residual, w)


def _swiglu(x, w, kernels, w_nk=False):
    from mavjax.model import swiglu

    return swiglu(x, w["gate"], w.get("gate_s"), w["up"], w.get("up_s"), w["down"], w.get("down_s"), kernels, w_nk)


def moe(par: Parallel, ffn, h, residual, norm):
    """MoE layer over the mesh: shared expert + routed experts as one partial sum, then the fused boundary.
    h, residual [B, T, D]. Routing is computed replicated (the router is small and replicated); with
    expert=1 every device holds a slice of every expert, so the Pallas pair kernels route the tokens themselves
    from the replicated logits, as on one device (mavjax.model.MoE.routes_in_kernels)."""
    from mavjax.model import route, router_logits, shared_in_moe_kernels

    B, T, D = h.shape
    flat = h.reshape(B * T, D)
    E_axis = par.mesh.shape[par.expert_axis]
    exchange = B * T >= par.exchange_min_tokens and E_axis > 1
    N = B * T
    in_kernels = E_axis == 1 and ffn.w_gate_scale is not None and ffn.routes_in_kernels(N)
    # (logits [N, E],) for the kernels to route, or XLA's (ids [N, k], scores [N, k])
    routing = (router_logits(flat, ffn.router[...]),) if in_kernels else route(flat, ffn.router[...], ffn.top_k)
    if exchange:  # each expert shard takes N/E_axis tokens: pad to a multiple (pad rows' outputs are dropped)
        Np = -(-N // E_axis) * E_axis
        flat, *routing = (jnp.pad(a, ((0, Np - N), (0, 0))) for a in (flat, *routing))
    w, s = _operands(par, gate=ffn.w_gate, up=ffn.w_up, down=ffn.w_down, gate_s=ffn.w_gate_scale,
                     up_s=ffn.w_up_scale, down_s=ffn.w_down_scale, sh_gate=ffn.shared.w_gate,
                     sh_gate_s=ffn.shared.w_gate_scale, sh_up=ffn.shared.w_up, sh_up_s=ffn.shared.w_up_scale,
                     sh_down=ffn.shared.w_down, sh_down_s=ffn.shared.w_down_scale, norm=norm.scale)
    _check_expert_layout(par, s)
    kernels = ffn.shared.kernels

    def body(x, routing, residual, w):
        sh = {k[3:]: v for k, v in w.items() if k.startswith("sh_")}
        experts = (w["gate"], w["up"], w["down"])
        scales = None if "gate_s" not in w else (w["gate_s"], w["up_s"], w["down_s"])
        rides = (not exchange and scales is not None
                 and shared_in_moe_kernels(kernels, (N, ffn.top_k), sh["gate"], experts[0]))
        # decode with expert=1 (the shared expert's units then split like the routed experts'): it rides in the
        # Pallas pair kernels, as on one device (mavjax.model.MoE)
        shared = (sh["gate"], sh["up"], sh["down"], (sh["gate_s"], sh["up_s"], sh["down_s"])) if rides else None
        if in_kernels:
            from pallas_kernels.moe_gemm import moe_fp8_pairs

            partial = moe_fp8_pairs(x, None, None, *experts, scales, shared=shared, router_logits=routing[0],
                                    interpret=jax.default_backend() == "cpu")
            partial = partial if rides else partial + _swiglu(x, sh, kernels)
        elif rides:
            partial = moe_local(x, *routing, *experts, scales, par.expert_axis, kernels, shared=shared)
        else:
            idx, scores = routing
            shared = _swiglu(x, sh, kernels)  # [N, D] partial
            if exchange and par.exchange == "ragged":
                routed = moe_exchange_ragged(x, idx, scores, *experts, scales, par.expert_axis, kernels)
            elif exchange:
                routed = moe_exchange(x, idx, scores, *experts, scales, par.expert_axis, kernels)
            else:
                routed = moe_local(x, idx, scores, *experts, scales, par.expert_axis, kernels)
            partial = shared + routed
        partial = partial[:N].reshape(B, T, D)
        return allreduce_residual_rmsnorm(partial, residual, w["norm"], norm.eps, par.axes, par.allreduce)

    return par.smap(body, (P(), P(), P(), s), (P(), P()))(flat, tuple(routing), residual, w)


def _check_expert_layout(par: Parallel, specs):
    """The routed-expert bodies assume experts split over the expert axis and hidden units over the tensor
    axis (not split where that axis has size 1); a rules table saying otherwise is refused here."""
    e, t = (a if par.mesh.shape[a] > 1 else None for a in par.axes)
    for name, want in (("gate", (e, None, t)), ("up", (e, None, t)), ("down", (e, t, None))):
        got = tuple(specs[name]) + (None,) * (3 - len(specs[name]))
        if got != want:
            raise ShardingError(f"routed expert weight {name} is sharded {specs[name]}, but the shard_map MoE "
                                f"needs experts over {par.expert_axis!r} and their hidden units over "
                                f"{par.tensor_axis!r}")


# ---- routed experts inside shard_map --------------------------------------------------------------------------
def moe_local(x, idx, scores, w_gate, w_up, w_down, scales, expert_axis, kernels="xla", shared=None):
    """Decode: x [N, D] replicated; idx/scores [N, k] global expert ids; w_* this device's experts
    [E/Ne, D, F/Nt] (and [E/Ne, F/Nt, D]). Pairs routed elsewhere get score 0 and the sentinel expert E/Ne,
    which the grouped GEMM leaves outside every group (no work) and the per-pair gather clamps (zero input).
    kernels="pallas" (FP8 experts): the Pallas MoE kernels, which drop such pairs (no weight read, zero output),
    so a device reads only the experts it owns that were routed to.
    shared (Pallas path only): this device's shard of the shared expert, computed in the same kernels and
    added (`pallas_kernels.moe_gemm.moe_fp8_pairs`). Returns this device's partial sum [N, D]."""
    from mavjax.model import moe_experts, use_pallas

    E_loc = w_gate.shape[0]
    e0 = jax.lax.axis_index(expert_axis) * E_loc
    local = (idx >= e0) & (idx < e0 + E_loc)
    lsc = jnp.where(local, scores, jnp.zeros_like(scores))
    if use_pallas(kernels, "moe") and scales is not None:
        from pallas_kernels.moe_gemm import moe_fp8

        return moe_fp8(x, jnp.where(local, idx - e0, E_loc), lsc, w_gate, w_up, w_down, scales, shared=shared,
                       interpret=jax.default_backend() == "cpu",
                       mosaic=None if use_pallas(kernels, "mosaic") else False)
    if shared is not None:
        raise ValueError("moe_local: shared= is for the Pallas path (FP8 experts)")
    return moe_experts(x, jnp.where(local, idx - e0, E_loc), lsc, w_gate, w_up, w_down, scales)


def moe_exchange(x, idx, scores, w_gate, w_up, w_down, scales, expert_axis, kernels="xla"):
    """Prefill: x [N, D] replicated (N a multiple of the expert-axis size Ne); idx/scores [N, k].
    This device's expert shard c takes tokens [c*N/Ne, (c+1)*N/Ne) and returns their routed outputs placed at
    those rows of a zero [N, D] (a partial sum over both mesh axes: other rows come from the other shards,
    and each device holds only its slice of hidden units).

    Buffer sizing (no drops): a shard's Pc = (N/Ne)*k pairs may all be routed to experts of one shard (any
    skew), so the send buffer has Pc slots per destination: [Ne, Pc, D]. The all_to_all hands each shard
    [Ne, Pc, D] (Pc slots from each source), again enough for everything. Unfilled slots carry the sentinel
    expert id E/Ne, which the grouped GEMM leaves outside every group. Memory: N*k*D per device per buffer,
    the size of the replicated activations times k."""
    Ne, E_loc = jax.lax.axis_size(expert_axis), w_gate.shape[0]
    N, D = x.shape
    k = idx.shape[1]
    Nc = N // Ne
    c = jax.lax.axis_index(expert_axis)
    xc = jax.lax.dynamic_slice_in_dim(x, c * Nc, Nc)  # [Nc, D]
    ic = jax.lax.dynamic_slice_in_dim(idx, c * Nc, Nc).reshape(-1)  # [Pc]
    sc = jax.lax.dynamic_slice_in_dim(scores, c * Nc, Nc).reshape(-1)  # [Pc]
    Pc = Nc * k
    token = jnp.arange(Pc) // k  # [Pc] source token of each pair
    dest = ic // E_loc  # [Pc] owning shard
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=Ne)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.zeros((Pc,), jnp.int32).at[order].set(jnp.arange(Pc, dtype=jnp.int32) - starts[dest[order]])
    send_x = jnp.zeros((Ne, Pc, D), x.dtype).at[dest, slot].set(xc[token] * sc[:, None])  # score scales the input
    send_e = jnp.full((Ne, Pc), E_loc, jnp.int32).at[dest, slot].set(ic % E_loc)
    recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0)  # [Ne, Pc, D]: recv[s] = what shard s sent here
    recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0)  # [Ne, Pc]
    y = expert_rows(recv_x.reshape(Ne * Pc, D), recv_e.reshape(-1), w_gate, w_up, w_down, scales,
                    kernels)  # [Ne*Pc, D]
    back = jax.lax.all_to_all(y.reshape(Ne, Pc, D), expert_axis, 0, 0)  # [Ne, Pc, D]: my pairs' outputs
    out = jnp.zeros((Nc, D), y.dtype).at[token].add(back[dest, slot])  # [Nc, D]
    return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((N, D), y.dtype), out, c * Nc, axis=0)


def moe_exchange_ragged(x, idx, scores, w_gate, w_up, w_down, scales, expert_axis, kernels="xla"):
    """`moe_exchange` with `ragged_all_to_all`: only the real (token, expert) rows travel. Same inputs and output.

    Each shard sorts its Pc pairs by owning shard and sends each run to its owner. The count matrix
    C[source, destination] (an all_gather of Ne ints per shard) gives every offset: shard j's receive buffer
    holds the runs from sources 0, 1, ... in order, so source s writes at sum_{s' < s} C[s', j]. Receive buffer:
    Ne*Pc = N*k rows, what arrives if every pair of every shard goes to this one (no drops); rows past what
    arrived keep the sentinel expert id and the grouped GEMM leaves them out. The results go back by the same
    offsets read the other way."""
    Ne, E_loc = jax.lax.axis_size(expert_axis), w_gate.shape[0]
    N, D = x.shape
    k = idx.shape[1]
    Nc = N // Ne
    me = jax.lax.axis_index(expert_axis)
    xc = jax.lax.dynamic_slice_in_dim(x, me * Nc, Nc)  # [Nc, D]
    ic = jax.lax.dynamic_slice_in_dim(idx, me * Nc, Nc).reshape(-1)  # [Pc]
    sc = jax.lax.dynamic_slice_in_dim(scores, me * Nc, Nc).reshape(-1)  # [Pc]
    Pc, R = Nc * k, N * k
    token = jnp.arange(Pc) // k
    dest = ic // E_loc
    order = jnp.argsort(dest, stable=True)
    xs = (xc[token] * sc[:, None])[order]  # [Pc, D] runs by destination; the score scales the input
    es = (ic % E_loc)[order].astype(jnp.int32)[:, None]  # [Pc, 1]
    counts = jnp.bincount(dest, length=Ne).astype(jnp.int32)  # [Ne] pairs to each shard
    C = jax.lax.all_gather(counts, expert_axis)  # [Ne src, Ne dst]
    send_off = jnp.cumsum(counts) - counts  # where each run starts in xs
    land_off = (jnp.cumsum(C, axis=0) - C)[me]  # [Ne] where my run lands in each destination's buffer
    recv = C[:, me]  # [Ne] rows from each source
    a2a = _ragged_all_to_all if jax.default_backend() != "cpu" else _ragged_all_to_all_emulated
    rx = a2a(xs, jnp.zeros((R, D), xs.dtype), send_off, counts, land_off, recv, expert_axis)  # [R, D]
    re = a2a(es, jnp.full((R, 1), E_loc, jnp.int32), send_off, counts, land_off, recv, expert_axis)[:, 0]
    y = expert_rows(rx, re, w_gate, w_up, w_down, scales, kernels)  # [R, D]
    # Back: the run from source s sits at recv offset sum_{s' < s} C[s', me]; it returns to where s took it from
    # (its send offset for me: sum_{d < me} C[s, d]).
    back = a2a(y, jnp.zeros((Pc, D), y.dtype), jnp.cumsum(recv) - recv, recv,
               (jnp.cumsum(C, axis=1) - C)[:, me], counts, expert_axis)  # [Pc, D] in xs's order
    out = jnp.zeros((Nc, D), y.dtype).at[token[order]].add(back)  # [Nc, D]
    return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((N, D), y.dtype), out, me * Nc, axis=0)


def _ragged_all_to_all(operand, output, send_off, send_sizes, land_off, recv_sizes, axis):
    return jax.lax.ragged_all_to_all(operand, output, send_off, send_sizes, land_off, recv_sizes, axis_name=axis)


def _ragged_all_to_all_emulated(operand, output, send_off, send_sizes, land_off, recv_sizes, axis):
    """What `ragged_all_to_all` computes (one run per destination), from all_gathers: XLA:CPU has no ragged
    all-to-all, and the offset arithmetic above must be testable on CPU. Not for speed."""
    me = jax.lax.axis_index(axis)
    ops = jax.lax.all_gather(operand, axis)  # [Ne, P, ...]
    so, ss, lo = (jax.lax.all_gather(a, axis)[:, me] for a in (send_off, send_sizes, land_off))  # [Ne] per source
    i = jnp.arange(operand.shape[0])[None, :] - so[:, None]  # [Ne, P] row index within the run sent to me
    ok = (i >= 0) & (i < ss[:, None])
    dst = jnp.where(ok, lo[:, None] + i, output.shape[0])  # out of range: dropped
    return output.at[dst.reshape(-1)].set(ops.reshape(-1, *operand.shape[1:]), mode="drop")


def expert_rows(xs, e, w_gate, w_up, w_down, scales, kernels="xla"):
    """Grouped SwiGLU over rows: xs [R, D] (already score-scaled), e [R] local expert id (E_loc = none) ->
    [R, D] in the same row order; sentinel rows are outside every group and come out zero.
    kernels="pallas" with FP8 experts: the Pallas MoE kernels (`moe_fp8`'s own choice: above 16 rows the sorted
    grouped GEMM, on the Mosaic GPU kernel on a Hopper GPU unless "mosaic" is switched off, docs/benchmarks.md
    section 31; both give sentinel rows no buffer row), reading the FP8 weights directly. XLA's `ragged_dot` path
    upcasts every local expert's weights to bf16 first; on 2 H200s, with it, expert=2 prefill took 4x tensor=2's
    time (section 8; the likely cause, not yet profiled)."""
    from mavjax.model import expert_ragged_dot, use_pallas

    if use_pallas(kernels, "moe") and scales is not None:
        from pallas_kernels.moe_gemm import moe_fp8

        ones = jnp.ones((xs.shape[0], 1), xs.dtype)  # the router score is already on the input
        return moe_fp8(xs, e[:, None], ones, w_gate, w_up, w_down, scales, interpret=jax.default_backend() == "cpu",
                       mosaic=None if use_pallas(kernels, "mosaic") else False)
    E_loc = w_gate.shape[0]
    order = jnp.argsort(e, stable=True)
    se = e[order]
    sizes = jnp.bincount(e, length=E_loc).astype(jnp.int32)  # [E_loc]; sentinel rows not counted
    xs = xs[order]
    sg, su, sd = (None if s is None else s[se] for s in (scales or (None, None, None)))  # [R, F|D]
    sc = lambda y, s: y if s is None else (y * s).astype(y.dtype)  # noqa: E731
    # model.expert_ragged_dot: FP8 experts upcast a chunk at a time; sentinel rows (past sum(sizes)) come out zero
    g = sc(expert_ragged_dot(xs, w_gate, sizes), sg)  # [R, D] x [E, D, F] -> [R, F]
    u = sc(expert_ragged_dot(xs, w_up, sizes), su)  # [R, D] x [E, D, F] -> [R, F]
    y = sc(expert_ragged_dot(jax.nn.silu(g) * u, w_down, sizes), sd)  # [R, F] x [E, F, D]
    return jnp.zeros_like(y).at[order].set(y)
