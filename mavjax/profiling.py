"""Where a jitted step's device time goes: the kernels it launched, from JAX's own profiler trace.

`profile_kernels(run, steps)` calls `run()` (which must run `steps` model steps and block) under
`jax.profiler`, reads the trace back through `jax.profiler.ProfileData`, and returns per-step totals: the
device's busy time (the union of kernel intervals), the wall span from the first kernel's start to the last's
end, the kernels launched, and a row per kernel name (count and time per step). The difference between span
and busy time is what launch gaps cost; a kernel's time against its bytes says whether it streams memory.
On a CPU backend there are no device kernels: the result says so and holds no rows.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections import defaultdict


def _device_events(xplane_path, device=None):
    """(name, start_ns, duration_ns) of every kernel/memcpy event on the GPU planes of one trace (only GPU
    `device`'s plane if given: over a mesh, one device's step, not the union of all of theirs)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        if device is not None and plane.name != f"/device:GPU:{device}":
            continue
        for line in plane.lines:
            # Stream lines hold the kernels; derived lines ("XLA Ops", "XLA Modules", "Steps") repeat them.
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                out.append((ev.name, ev.start_ns, ev.duration_ns))
    return out


def family(name: str) -> str:
    """A kernel's kind: its name without XLA's numeric suffixes ("loop_add_fusion_12" and "loop_add_fusion.3"
    are both "loop_add_fusion"), so hundreds of small fusions of one kind add up to one row."""
    return re.sub(r"([._]\d+)+$", "", name)


def _rows(groups, steps, top):
    rows = sorted(((n, c / steps, t / steps / 1e3) for n, (c, t) in groups.items()), key=lambda r: -r[2])
    return [dict(name=n, per_step=c, us_per_step=t) for n, c, t in rows[:top]]


def summarize(events, steps: int, top: int = 25) -> dict:
    """Per-step busy time, span, kernel count, and the `top` kernel names and kernel families (`family`) by
    time, from device events."""
    if not events:
        return dict(steps=steps, kernels_per_step=0, rows=[], families=[], busy_us=0.0, span_us=0.0)
    events = sorted(events, key=lambda e: e[1])
    busy, cur_s, cur_e = 0.0, None, None
    for _, s, d in events:  # union of intervals (streams may overlap)
        e = s + d
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(s + d for _, s, d in events) - events[0][1]
    by, fam = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for name, _, d in events:
        for g, key in ((by, name), (fam, family(name))):
            g[key][0] += 1
            g[key][1] += d
    return dict(steps=steps, kernels_per_step=len(events) / steps, busy_us=busy / steps / 1e3,
                span_us=span / steps / 1e3, rows=_rows(by, steps, top), families=_rows(fam, steps, top))


def profile_kernels(run, steps: int, top: int = 40, device=None) -> dict:
    """Trace one call of `run` (already compiled and warm) and summarize its device kernels per step (those
    of GPU `device` only, if given)."""
    import jax

    d = tempfile.mkdtemp(prefix="mavjax_prof_")
    jax.profiler.start_trace(d)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    events = [e for p in paths for e in _device_events(p, device)]
    return summarize(events, steps, top)


def format_profile(p: dict, title: str = "") -> str:
    lines = [f"{title}: {p['kernels_per_step']:.1f} kernels per step, device busy {p['busy_us']:.1f} us of a "
             f"{p['span_us']:.1f} us span per step (gaps {p['span_us'] - p['busy_us']:.1f} us)"]
    for key, label in (("rows", "kernel"), ("families", "kernel family (numeric suffixes folded)")):
        if p.get(key):
            lines.append(f"  {'us/step':>9} {'n/step':>7} {'us each':>8}  {label}")
            for r in p[key]:
                lines.append(f"  {r['us_per_step']:>9.1f} {r['per_step']:>7.1f} "
                             f"{r['us_per_step'] / max(r['per_step'], 1e-9):>8.2f}  {r['name'][:90]}")
    return "\n".join(lines)
