"""EAGLE-3 speculative decoding: jitted prefill, and draft-and-verify rounds inside one `lax.while_loop`.

One round, per row (root = the last emitted token, at position n, not yet run through the target):
1. draft a static tree (`DraftTree`; a chain is the tree with one child per node) depth by depth: the root's
   children are the draft's top tokens after the previous round's catch-up; each depth below the last is one
   draft pass over that depth's nodes, which see the draft cache before n and their own ancestors;
2. verify root + all N nodes in ONE target forward (T = N+1 through the target's KV cache, written at slots
   n..n+N at positions n + depth; a tree adds an ancestors-only mask, a chain needs none), tapping the
   draft's feature layers;
3. accept: at temperature 0 the longest path whose every token is the target's argmax after its parent, plus
   the target's argmax after the path (the bonus token); at temperature > 0 (chain) speculative sampling
   (Leviathan et al. 2023; Chen et al. 2023): accept draft token d with probability min(1, p(d)/q(d)), on the
   first rejection sample from norm(max(0, p - q)), after K acceptances sample the bonus from p. p is the
   target's distribution after temperature, top-k and top-p exactly as `mavjax.sampling.sample` applies them,
   q the draft's softmax at the row's temperature, mapped to target ids through d2t: outputs follow the
   target's distribution whatever the draft;
4. a tree moves the accepted path's target KV entries to slots n+1..n+a (a chain's are already there);
   entries past the path are never read: the next round writes its N+1 slots from n+a+1 before attending,
   and the KV cache's position table masks anything else;
5. the draft catches up on the accepted tokens with the *target's* features (one pass, a+1 valid entries of
   D+1), which yields the next round's root logits; emitted tokens stop at a stop token or the row's budget.

Acceptance is per row; finished rows ride along without advancing. No host round trip per round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.generate import Batch, make_keys, shard_cache
from mavjax.kv_cache import KVCache, write_slots
from mavjax.sampling import filtered_logits, sample


# ---- the static draft tree ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DraftTree:
    """Node 0 is the root; nodes 1..N in breadth-first order, siblings ordered by draft rank (child r of a
    node is the draft's r-th most likely token there). `branching[d]` children per node at depth d."""
    branching: tuple[int, ...]

    def __post_init__(self):
        b = tuple(int(x) for x in self.branching)
        if not b or any(x < 1 for x in b):
            raise ValueError(f"draft tree branching must be a non-empty list of positive integers, got {self.branching!r}")
        object.__setattr__(self, "branching", b)

    @classmethod
    def chain(cls, k: int) -> "DraftTree":
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer, got {k!r}")
        return cls((1,) * int(k))

    @classmethod
    def parse(cls, spec: str) -> "DraftTree":
        """"3,2,1" -> branching (3, 2, 1)."""
        try:
            return cls(tuple(int(x) for x in str(spec).split(",")))
        except ValueError:
            raise ValueError(f"draft tree must be comma-separated branching factors per depth, e.g. 3,2,1; "
                             f"got {spec!r}") from None

    @property
    def is_chain(self) -> bool:
        return all(b == 1 for b in self.branching)

    @property
    def depth(self) -> int:  # D: the most draft tokens one round can accept
        return len(self.branching)

    @property
    def levels(self) -> list[tuple[int, int]]:
        """[(first node, end node) of depth d] for d = 1..D."""
        out, start, width = [], 1, 1
        for b in self.branching:
            width *= b
            out.append((start, start + width))
            start += width
        return out

    @property
    def size(self) -> int:  # N: draft nodes (the root excluded)
        return self.levels[-1][1] - 1

    @property
    def parent(self) -> np.ndarray:
        p = [-1]
        prev = [0]
        for (s, e), b in zip(self.levels, self.branching):
            p += [prev[(i - s) // b] for i in range(s, e)]
            prev = list(range(s, e))
        return np.array(p, np.int32)

    @property
    def node_depth(self) -> np.ndarray:
        d = np.zeros(self.size + 1, np.int32)
        for j, (s, e) in enumerate(self.levels, start=1):
            d[s:e] = j
        return d

    @property
    def ancestors(self) -> np.ndarray:
        """bool [N+1, N+1]: anc[i, j] = node j is node i or one of its ancestors."""
        n, par = self.size + 1, self.parent
        anc = np.eye(n, dtype=bool)
        for i in range(1, n):
            anc[i] |= anc[par[i]]
        return anc


# ---- distributions -----------------------------------------------------------------------------------------
def target_probs(logits, temperature, top_k, top_p):
    """The distribution `mavjax.sampling.sample` draws from: logits [B, T, V] float32, per-row temperature,
    top_k, top_p [B] -> probabilities [B, T, V]; a temperature-0 row gets the one-hot of its argmax."""
    B, T, V = logits.shape
    order, xs = filtered_logits(logits, temperature, top_k, top_p)  # [B, T, V], sorted
    ps = jax.nn.softmax(xs, axis=-1)  # in sorted order
    probs = jnp.zeros_like(ps).at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], order].set(ps)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=probs.dtype)
    return jnp.where((temperature == 0)[:, None, None], greedy, probs)


def speculative_accept(p, q, draft, keys):
    """Speculative sampling for one chain. p [B, K+1, V] target distributions at the root and after each draft
    token, q [B, K, V] the draft distributions the draft tokens [B, K] were drawn from, keys [B] (PRNG keys).
    Returns (accepted count a [B] in 0..K, the token after the accepted prefix [B]): the emitted tokens
    draft[:, :a] + [that token] are distributed as a+1 successive draws from the target's distributions."""
    B, K, V = q.shape
    k_acc, k_fix = jax.vmap(lambda k: tuple(jax.random.split(k, 2)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(k_acc)  # [B, K]
    pd = jnp.take_along_axis(p[:, :K], draft[..., None], axis=-1)[..., 0]  # [B, K] p(d)
    qd = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]  # [B, K] q(d)
    ok = u * qd < pd  # P(accept) = min(1, p/q); strict so that p(d) = 0 never accepts
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B] leading accepts
    pa = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V] target dist after the prefix
    qa = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), a[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(pa - qa, 0.0)  # a == K: q row of zeros -> resid = p_K (the bonus)
    total = resid.sum(-1, keepdims=True)
    resid = jnp.where(total > 0, resid / jnp.where(total > 0, total, 1.0), pa)
    fix = jax.vmap(jax.random.categorical)(k_fix, jnp.log(resid)).astype(jnp.int32)
    return a.astype(jnp.int32), fix


def forced_accepts(rounds, mean: float, K: int):
    """Draft tokens accepted in round r (per row, r = `rounds` [B], counted from 0) under a forced mean acceptance
    length `mean` (tokens per round, 1..K+1): floor((r+1) m) - floor(r m) - 1, so that R rounds emit floor(R m)
    tokens, e.g. m = 3.25: 2, 2, 2, 3, 2, 2, 2, 3, ... accepted drafts (3, 3, 3, 4, ... tokens)."""
    r = rounds.astype(jnp.float32)
    n = jnp.floor((r + 1) * mean) - jnp.floor(r * mean) - 1
    return jnp.clip(n, 0, K).astype(jnp.int32)


# ---- the engine --------------------------------------------------------------------------------------------
class SpecEngine:
    """Target + EAGLE-3 draft: compiled prefill and speculative decode, the same host interface as
    `mavjax.generate.Engine` (prefill -> (first token, state); decode -> (tokens, counts, stats))."""

    # Benchmarks only (`mavjax bench --random-draft --forced-acceptance M`): with random weights nothing is
    # accepted, so greedy chain rounds may instead be told to accept a fixed schedule whose mean is M tokens per
    # round (see `forced_accepts`); the work per round is unchanged. Read when decode is first traced.
    forced_acceptance: float | None = None

    def __init__(self, target, draft, tree: DraftTree, *, pad_id: int = 0, kv_dtype=None, check: bool = True):
        if check:  # off only for one rank's tensor-parallel share of a pair (mavjax.bench), whose fc reads 1/n
            draft.cfg.check_target(target.cfg)
        self.cfg, self.dcfg, self.tree = target.cfg, draft.cfg, tree
        self.tgraph, self.tstate = nnx.split(target)
        self.dgraph, self.dstate = nnx.split(draft)
        parallel = getattr(target, "parallel", None)
        self.mesh = None if parallel is None else parallel.mesh  # the target runs sharded over it
        if self.mesh is not None:  # the draft is small: a replica on every device, next to the target's shards
            from jax.sharding import NamedSharding, PartitionSpec

            self.dstate = jax.device_put(self.dstate, NamedSharding(self.mesh, PartitionSpec()))
        self.kv_dtype = kv_dtype or target.dtype
        self.pad_id = pad_id
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "all_greedy"))
        self._decode = jax.jit(self._decode_impl, static_argnames=("out_len", "all_greedy", "tree"),
                               donate_argnames=("tcache", "dcache"))

    @property
    def extra_slots(self) -> int:
        """Cache slots needed past the last generated position (the tree window, and a chain fallback)."""
        return max(self.tree.size, self.tree.depth) + 2

    def _models(self, tstate, dstate):
        return nnx.merge(self.tgraph, tstate), nnx.merge(self.dgraph, dstate)

    def _features(self, taps):
        return jnp.concatenate([taps[i] for i in self.dcfg.aux_layers], axis=-1)  # [B, T, n_aux * Dt]

    # ---- programs ----------------------------------------------------------------------------------------
    def _prefill_impl(self, tstate, dstate, tokens, lengths, temperature, top_k, top_p, seeds, *, cache_len,
                      all_greedy):
        target, draft = self._models(tstate, dstate)
        B, T = tokens.shape
        tcache = shard_cache(KVCache.create(self.cfg, B, cache_len, self.kv_dtype), self.cfg, self.mesh)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        zero = jnp.zeros((B,), jnp.int32)
        h, tcache, taps = target.hidden_states(tokens, positions, tcache, write_index=zero,
                                               collect_layers=self.dcfg.aux_layers, fresh_cache=True)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        first = sample(target.logits(last)[:, 0], make_keys(seeds, 0), temperature, top_k, top_p,
                       all_greedy=all_greedy)
        # The draft pairs the feature of position p with the token at p+1: the prompt shifted left, then `first`.
        shifted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        shifted = jnp.where(positions == (lengths - 1)[:, None], first[:, None], shifted)  # [B, T]
        dcache = draft.cache(B, cache_len, self.kv_dtype)
        g, dlogits, dcache = draft(shifted, draft.project(self._features(taps)), target.embed_tokens, positions,
                                   dcache, zero, kernels=target.kernels)
        g_root = jnp.take_along_axis(g, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        d_root = jnp.take_along_axis(dlogits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, Vd]
        return first, (tcache, dcache, g_root, d_root)

    # ---- the phases of one round (separate methods so that the benchmark can time each alone) ----------------
    @staticmethod
    def tree_mask(tree: DraftTree, q_nodes, kpos, root_pos, base):
        """[B, T, S]: slots holding positions before the root, or the query node's tree ancestors (node j lives
        at slot base + j). kpos [B, S] is the position table after this call's write."""
        N = tree.size
        slot = jnp.arange(kpos.shape[1], dtype=jnp.int32)[None, :]
        committed = (kpos >= 0) & (kpos < root_pos[:, None])  # [B, S]
        rel = slot - base[:, None]  # [B, S] node index of each slot
        in_tree = (rel >= 0) & (rel <= N)
        rows = jnp.asarray(tree.ancestors)[np.asarray(q_nodes)]  # [T, N+1]
        ok = rows[:, jnp.clip(rel, 0, N)]  # [T, B, S]
        return committed[:, None, :] | (jnp.moveaxis(ok, 0, 1) & in_tree[:, None, :])

    def draft_phase(self, target, draft, tree: DraftTree, dcache, g_root, d_root, root_pos, keys, temperature,
                    sampling: bool):
        """Draft the tree: tokens of nodes 1..N [B, N] (target ids), the chain's draft distributions over the
        target vocabulary [B, D, V] (sampling only, else None), and the draft cache."""
        embed, d2t = target.embed_tokens, draft.d2t[...]
        B, D = g_root.shape[0], tree.depth
        toks, qs = [], []
        front_g, front_l = g_root[:, None], d_root[:, None]  # [B, 1, D], [B, 1, Vd]
        for d, ((s, e), b) in enumerate(zip(tree.levels, tree.branching)):
            if sampling:  # chain: one sample from the draft at the row's temperature
                qd = jax.nn.softmax(front_l[:, 0] / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
                qd = jnp.where((temperature == 0)[:, None],
                               jax.nn.one_hot(jnp.argmax(front_l[:, 0], -1), qd.shape[-1]), qd)
                kd = jax.vmap(lambda k: jax.random.fold_in(k, d))(keys)
                idx = jax.vmap(jax.random.categorical)(kd, jnp.log(qd))[:, None].astype(jnp.int32)
                qs.append(jnp.zeros((B, self.cfg.vocab_size), qd.dtype).at[:, d2t].set(qd))
            else:
                idx = jax.lax.top_k(front_l, b)[1].reshape(B, -1)  # [B, width]: parent-major = BFS order
            tok = d2t[idx]  # [B, width] target ids
            toks.append(tok)
            if d + 1 == D:
                break
            width = e - s
            hidden = jnp.repeat(front_g, b, axis=1)  # [B, width, D] each child reads its parent's output
            pos = jnp.broadcast_to((root_pos + d)[:, None], (B, width))  # depth d+1 sits at n + d
            base = root_pos - 1  # draft node j at slot n - 1 + j
            mask = self.tree_mask(tree, range(s, e), write_slots(dcache.pos, pos, base + s), root_pos, base)
            front_g, front_l, dcache = draft(tok, hidden, embed, pos, dcache, base + s, attn_mask=mask)
        q = jnp.stack(qs, axis=1) if sampling else None
        return jnp.concatenate(toks, axis=1), q, dcache

    def verify_phase(self, target, tree: DraftTree, tcache, root_tok, nodes, pos):
        """Root + nodes through the target in one forward: (logits [B, N+1, V], features [B, N+1, F], cache)."""
        vt = jnp.concatenate([root_tok[:, None], nodes], axis=1)  # [B, N+1]
        vpos = pos[:, None] + jnp.asarray(tree.node_depth)[None, :]  # [B, N+1]
        mask = None if tree.is_chain else \
            self.tree_mask(tree, range(tree.size + 1), write_slots(tcache.pos, vpos, pos), pos, pos)
        h, tcache, taps = target.hidden_states(vt, vpos, tcache, write_index=pos,
                                               collect_layers=self.dcfg.aux_layers, attn_mask=mask)
        return target.logits(h), self._features(taps), tcache

    def catch_up_phase(self, target, draft, tree: DraftTree, dcache, feats, path, emitted, a, pos):
        """The draft reads the accepted tokens `emitted` [B, D+1] (a+1 valid) with the target's features of
        the root and path nodes `path` [B, D+1]: (next root's draft hidden [B, D], logits [B, Vd], cache)."""
        B, D = emitted.shape[0], tree.depth
        j = jnp.arange(D + 1)[None, :]
        fpath = jnp.take_along_axis(feats, path[:, :, None], axis=1)  # [B, D+1, F]
        cpos = jnp.where(j <= a[:, None], pos[:, None] + j, -1)  # [B, D+1]; -1: never read
        width = max(tree.size, D + 1)  # clear the draft's tree region first: its slots may hold stale positions
        dcache = dataclasses.replace(dcache, pos=write_slots(dcache.pos, jnp.full((B, width), -1, jnp.int32), pos))
        g, dl, dcache = draft(emitted, draft.project(fpath), target.embed_tokens, cpos, dcache, pos)
        g_new = jnp.take_along_axis(g, a[:, None, None], axis=1)[:, 0]
        d_new = jnp.take_along_axis(dl, a[:, None, None], axis=1)[:, 0]
        return g_new, d_new, dcache

    def _decode_impl(self, tstate, dstate, tcache, dcache, g_root, d_root, first, lengths, max_new, active,
                     stop_ids, temperature, top_k, top_p, seeds, *, out_len, all_greedy, tree):
        target, draft = self._models(tstate, dstate)
        tcache = shard_cache(tcache, self.cfg, self.mesh)
        B = first.shape[0]
        N, D = tree.size, tree.depth
        forced = self.forced_acceptance
        if forced is not None and not (tree.is_chain and all_greedy):
            raise ValueError("forced acceptance applies to greedy decoding with a chain draft only")
        parent, depth = jnp.asarray(tree.parent), jnp.asarray(tree.node_depth)
        is_stop = lambda t: jnp.any(t[..., None] == stop_ids, axis=-1)  # noqa: E731
        out = jnp.full((B, out_len + D + 1), self.pad_id, jnp.int32).at[:, 0].set(first)
        n = active.astype(jnp.int32)
        done = ~active | is_stop(first) | (n >= max_new)
        step_limit = jnp.max(jnp.where(active, max_new, 0))
        sampling = not all_greedy

        def body(c):
            tcache, dcache, g_root, d_root, root_tok, pos, out, n, done, step, rounds, acc = c
            keys = make_keys(seeds, step)
            k_draft, k_acc = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, 1000 + i))(keys) for i in range(2))
            nodes, q, dcache = self.draft_phase(target, draft, tree, dcache, g_root, d_root, pos, k_draft,
                                                temperature, sampling)
            logits, feats, tcache = self.verify_phase(target, tree, tcache, root_tok, nodes, pos)  # one forward
            vt = jnp.concatenate([root_tok[:, None], nodes], axis=1)  # [B, N+1]
            # ---- accept
            if sampling:  # a chain: node j+1 follows node j
                p = target_probs(logits, temperature, top_k, top_p)
                a, fix = speculative_accept(p, q, nodes, k_acc)
                path = jnp.broadcast_to(jnp.arange(D + 1, dtype=jnp.int32), (B, D + 1))
            else:
                tgt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N+1]
                match = jnp.concatenate([jnp.ones((B, 1), bool), nodes == tgt[:, parent[1:]]], axis=1)
                ok = match
                for s, e in tree.levels:  # a node is on the path iff it and all its ancestors match
                    ok = ok.at[:, s:e].set(match[:, s:e] & ok[:, parent[s:e]])
                a = jnp.max(jnp.where(ok, depth[None, :], 0), axis=1).astype(jnp.int32)  # [B]
                # path[j] = the accepted node at depth j (0 = root); siblings' tokens are distinct, so one per depth
                at = (depth[None, :, None] == jnp.arange(D + 1)[None, None, :]) & ok[:, :, None]  # [B, N+1, D+1]
                path = jnp.argmax(at, axis=1).astype(jnp.int32)  # [B, D+1]
                if forced is not None:  # benchmark: the schedule's count, whatever the tokens (a chain's path)
                    a = forced_accepts(rounds, forced, D)
                    path = jnp.broadcast_to(jnp.arange(D + 1, dtype=jnp.int32), (B, D + 1))
                last = jnp.take_along_axis(path, a[:, None], axis=1)[:, 0]
                fix = jnp.take_along_axis(tgt, last[:, None], axis=1)[:, 0]
            j = jnp.arange(D + 1)[None, :]
            path_tok = jnp.take_along_axis(vt, path, axis=1)  # [B, D+1] tokens of root, path nodes
            emitted = jnp.where(j < a[:, None], jnp.roll(path_tok, -1, axis=1), 0)
            emitted = jnp.where(j == a[:, None], fix[:, None], emitted)  # [B, D+1]: path tokens, then the fix
            # ---- the accepted path's target KV into slots n+1..n+a (a chain's already are)
            if not tree.is_chain:
                perm = jnp.where(j <= a[:, None], path, j)  # [B, D+1] source node for each destination slot
                take = jax.vmap(lambda buf, s, i: jax.lax.dynamic_slice_in_dim(buf, s, N + 1, axis=0)[i])
                tcache = KVCache(k=[write_slots(k, take(k, pos, perm), pos) for k in tcache.k],
                                 v=[write_slots(v, take(v, pos, perm), pos) for v in tcache.v],
                                 pos=write_slots(tcache.pos, jnp.where(j <= a[:, None], pos[:, None] + j, -1), pos))
            # ---- draft catch-up on the accepted tokens with the target's features
            g_new, d_new, dcache = self.catch_up_phase(target, draft, tree, dcache, feats, path, emitted, a, pos)
            # ---- emit: up to a+1 tokens, cut after a stop token or at the row's budget
            live = ~done
            stop_at = jnp.where(is_stop(emitted) & (j <= a[:, None]), j, D + 1).min(axis=1)  # first stop index
            count = jnp.minimum(jnp.minimum(a + 1, stop_at + 1), max_new - n)
            count = jnp.where(live, count, 0)
            win = jax.vmap(lambda o, s: jax.lax.dynamic_slice_in_dim(o, s, D + 1))(out, n)
            win = jnp.where(j < count[:, None], emitted, win)
            out = jax.vmap(lambda o, w, s: jax.lax.dynamic_update_slice_in_dim(o, w, s, axis=0))(out, win, n)
            hit = stop_at < count
            n = n + count
            done = done | hit | (n >= max_new)
            keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            return (tcache, dcache, keep(g_new, g_root), keep(d_new, d_root), keep(fix, root_tok),
                    pos + jnp.where(live, a + 1, 0), out, n, done, step + 1, rounds + live, acc + jnp.where(live, a + 1, 0))

        def cond(c):
            return (c[9] < step_limit) & ~jnp.all(c[8])

        zeros = jnp.zeros((B,), jnp.int32)
        carry = (tcache, dcache, g_root, d_root, first, lengths, out, n, done, jnp.int32(1), zeros, zeros)
        c = jax.lax.while_loop(cond, body, carry)
        # The caches are returned so that the donated input buffers alias the loop's (updated in place).
        return c[6][:, :out_len], c[7], {"rounds": c[10], "accepted": c[11]}, (c[0], c[1])

    # ---- host API ----------------------------------------------------------------------------------------
    def prefill(self, b: Batch, cache_len: int):
        all_greedy = bool(np.all(b.temperature == 0))
        return self._prefill(self.tstate, self.dstate, b.tokens, b.lengths, b.temperature, b.top_k, b.top_p,
                             b.seeds, cache_len=cache_len, all_greedy=all_greedy)

    def decode(self, b: Batch, first, state, out_len: int):
        """-> (tokens [B, out_len], counts [B], {"rounds": [B], "accepted": [B]}): rounds = target forwards of
        the decode, accepted = tokens they produced (a+1 each), so accepted/rounds is the acceptance length."""
        all_greedy = bool(np.all(b.temperature == 0))
        tree = self.tree if all_greedy or self.tree.is_chain else DraftTree.chain(self.tree.depth)
        tcache, dcache, g_root, d_root = state
        active = np.arange(b.tokens.shape[0]) < b.n_real
        out, n, stats, _ = self._decode(self.tstate, self.dstate, tcache, dcache, g_root, d_root, first, b.lengths,
                                        b.max_new, active, b.stop_ids, b.temperature, b.top_k, b.top_p, b.seeds,
                                        out_len=out_len, all_greedy=all_greedy, tree=tree)
        return out, n, stats
