"""Test-session set-up: two host CPU devices so pmap paths run on a machine without accelerators.

XLA reads XLA_FLAGS once, when JAX initialises its backend, so this must run before anything imports jax.
"""

import os

_flag = "--xla_force_host_platform_device_count=2"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from _s3 import s3_server  # noqa: E402,F401  (moto S3 server fixture for the cluster-path tests)
