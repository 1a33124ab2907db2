"""mavjax's default XLA flags (mavjax/xla_flags.py): added when not named, never over the user's own, and
accepted by the installed jaxlib (XLA aborts on a flag it does not know)."""

import os
import subprocess
import sys

import pytest

from mavjax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["--xla_gpu_enable_pdl=true", "--xla_gpu_autotune_level=3"]


def test_added_after_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.apply_defaults(env, release=(0, 11)) == ALL
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + " ".join(ALL)
    assert xla_flags.apply_defaults(env, release=(0, 11)) == []  # named now: not added twice
    env = {}
    xla_flags.apply_defaults(env, release=(0, 10))
    assert env["XLA_FLAGS"] == " ".join(ALL)


@pytest.mark.parametrize("given", ["--xla_gpu_enable_pdl=false", "--xla_dump_to=/tmp/x --xla_gpu_enable_pdl",
                                   "--xla_gpu_enable_pdl=true"])
def test_the_users_value_wins(given):
    env = {"XLA_FLAGS": given}
    assert xla_flags.apply_defaults(env, release=(0, 11)) == ["--xla_gpu_autotune_level=3"]  # the other default
    assert env["XLA_FLAGS"] == given + " --xla_gpu_autotune_level=3"
    env = {"XLA_FLAGS": "--xla_gpu_autotune_level=4"}
    assert xla_flags.apply_defaults(env, release=(0, 11)) == ["--xla_gpu_enable_pdl=true"]


def test_a_similar_name_is_not_the_flag():
    env = {"XLA_FLAGS": "--xla_gpu_enable_pdl_extra=1"}
    assert xla_flags.apply_defaults(env, release=(0, 11)) == ALL


def test_opt_out_and_unknown_releases_add_nothing():
    env = {"MAVJAX_DEFAULT_XLA_FLAGS": "0"}
    assert xla_flags.apply_defaults(env, release=(0, 11)) == [] and "XLA_FLAGS" not in env
    env = {}
    assert xla_flags.apply_defaults(env, release=(0, 99)) == [] and "XLA_FLAGS" not in env


def test_import_sets_them_and_the_installed_jaxlib_accepts_them():
    """In a fresh process: importing mavjax adds the defaults (where this jaxlib is a known release) and a jitted
    computation still runs, so every default is a flag this XLA parses."""
    code = ("import os, jax, jaxlib, mavjax, jax.numpy as jnp\n"
            "known = tuple(int(p) for p in jaxlib.__version__.split('.')[:2]) in mavjax.xla_flags.KNOWN_JAXLIB\n"
            "flags = os.environ.get('XLA_FLAGS', '')\n"
            "assert ('--xla_gpu_enable_pdl=true' in flags) == known, (known, flags)\n"
            "assert ('--xla_gpu_autotune_level=3' in flags) == known, (known, flags)\n"
            "print(float(jax.jit(lambda x: (x * 2).sum())(jnp.ones(4))), known)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAVJAX_DEFAULT_XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "8.0"


def test_the_suites_compile_flags_reach_its_subprocesses():
    """conftest.py's compile flags are in this process's XLA_FLAGS (on a jaxlib they were checked on) and
    `helpers.cpu_env` keeps them when it adds a device count: every process of the suite compiles with them."""
    from conftest import FAST_CPU_COMPILE
    from helpers import cpu_env

    flags = cpu_env(4)["XLA_FLAGS"].split()
    assert flags[-1] == "--xla_force_host_platform_device_count=4"
    for name, (_, releases) in FAST_CPU_COMPILE.items():
        named = any(f.startswith(f"--{name}=") for f in flags)
        assert named == (xla_flags._jaxlib_release() in releases), (name, flags)
