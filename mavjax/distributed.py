"""Multi-host start: `jax.distributed.initialize` when the coordinator variables are set, before any device use.

One process per host (or per GPU); every process runs the same program (same prompts, same SamplingParams with
an explicit `seed`), and meshes then span the devices of all processes (`jax.devices()` is global).

Variables (read by `maybe_initialize`, called by `mavjax generate` and `LLM(...)`):

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator service (every process gives the same)
  JAX_NUM_PROCESSES         how many processes take part
  JAX_PROCESS_ID            this process's index, 0 .. JAX_NUM_PROCESSES-1
  JAX_LOCAL_DEVICE_IDS      optional: comma-separated local device ids this process uses (e.g. "0" for one GPU
                            per process); default all local devices
  MAVJAX_DISTRIBUTED=auto   instead of the above: let jax detect the cluster (SLURM, Open MPI, Kubernetes
                            JobSet, GKE/TPU environments) and call `jax.distributed.initialize()` bare
  MAVJAX_DISTRIBUTED=0      never initialize, whatever else is set

With none of them set nothing happens (single process). On CPU backends the cross-process collectives go through
gloo (`jax_cpu_collectives_implementation`), which is how tests/test_distributed.py runs 2 processes x 4
simulated devices on localhost.
"""

from __future__ import annotations

import os

import jax

_done = False


def settings(environ=None) -> dict | None:
    """The keyword arguments for jax.distributed.initialize from the environment; None: stay single-process.
    A partial or malformed setting is an error naming the variable."""
    env = os.environ if environ is None else environ
    mode = env.get("MAVJAX_DISTRIBUTED", "").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None
    if mode == "auto":
        return {}
    if mode not in ("", "1", "on", "true", "yes"):
        raise ValueError(f"MAVJAX_DISTRIBUTED={mode!r}: expected auto, 0 or 1")
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = {n: env[n] for n in names if env.get(n)}
    if not given:
        return None
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"multi-host start needs {', '.join(names)}; missing {', '.join(missing)}")
    try:
        n, pid = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"JAX_PROCESS_ID={pid} must lie in 0..JAX_NUM_PROCESSES-1 ({n} processes)")
    out = dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid)
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        out["local_device_ids"] = [int(d) for d in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return out


def maybe_initialize(environ=None) -> bool:
    """Start jax.distributed if the environment asks for it (once per process). True if running multi-process."""
    global _done
    if _done:
        return jax.process_count() > 1
    kwargs = settings(environ)
    if kwargs is None:
        return False
    # CPU devices talk across processes through gloo; the setting only affects the CPU client, so it is safe
    # on GPU hosts too, and must come before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({e}); mavjax must start it before any JAX "
                           "computation: create LLM(...) before touching devices") from e
    _done = True
    return jax.process_count() > 1
