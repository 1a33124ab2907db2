"""Run a snippet in a fresh Python process with 8 simulated CPU devices (the device count is fixed when jax
starts, so it cannot be changed inside the test process)."""

import os
import subprocess
import sys
import textwrap


def run_on_8_devices(code: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
