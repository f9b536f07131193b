"""Start or join Ray for the sharding job.

A local Ray (``address=''``) binds every server (GCS, raylet, workers, object manager) to
127.0.0.1 and runs no dashboard, so nothing listens on a reachable interface. On Linux Ray
otherwise picks the host's outbound IP; its loopback mode is switched on by
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read at import, and by the processes Ray spawns), which
is set for the duration of ``ray.init`` only.

Workers import ``data_pipeline`` through the driver's ``sys.path`` (Ray forwards it) on a local
Ray; on a cluster, install the project on every node (``pip install -e .``).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int) -> None:
    """``ray.init`` on this machine only: loopback-bound, no dashboard, ``num_cpus`` CPUs (0 = all)."""
    previous = os.environ.get(_LOOPBACK_ENV)
    os.environ[_LOOPBACK_ENV] = "0"
    import ray
    from ray._private import ray_constants

    # If ray was imported before the variable was set, its constant already holds the default.
    previous_constant = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": always a fresh instance, never an existing cluster found via RAY_ADDRESS
        # or /tmp/ray (that is what ray_address is for).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_constant
        if previous is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = previous


@contextmanager
def ray_session(address: str, num_cpus: int) -> Iterator[None]:
    """Reuse an initialised Ray; else join ``address`` or start a local one; shut down only
    what this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
