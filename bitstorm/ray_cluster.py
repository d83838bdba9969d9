"""Joining Ray: a cluster only when the user names one (``RAY_ADDRESS`` or ``--address``), else a
private local instance, never whatever cluster this machine last started; and refusing an actor
shape that no node can grant, instead of waiting for it forever.

Why: ``ray.init()`` alone joins the cluster recorded in Ray's ``ray_current_cluster`` file,
which may be another user's; a private instance must end with its driver, even a killed one
(``bitstorm.ray_reaper``); and an actor asking for a GPU that no node has sits pending
without a word.
"""

from __future__ import annotations

import os
import time

from bitstorm.errors import ConfigError
from bitstorm.logs import get_logger
from bitstorm.ray_reaper import watch_driver

log = get_logger(__name__)
# How long a cluster's autoscaler gets to add a node that fits before a shape is refused.
AUTOSCALER_WAIT_S = 600.0


# The address of the private local Ray this process started, if it started one.
_private_address: str | None = None


def connect(address: str | None = None) -> bool:
    """Start or join Ray, unless the caller already has (a test, a notebook); returns whether
    this is a private local instance (whose resources are all it will ever have)."""
    global _private_address
    import ray

    if ray.is_initialized():
        return _private_address == ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    config = ray.LoggingConfig(log_level="ERROR")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_config=config)
        return False
    log.info(
        "starting a private local Ray instance (set RAY_ADDRESS or pass --address auto to "
        "join a running cluster instead)"
    )
    # One machine is never preempted: Ray Train's preemption watcher would only print a
    # C++ error line about its own constructor arguments at every training start.
    quiet = {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    ray.init(address="local", logging_config=config, runtime_env=quiet)
    watch_driver()
    _private_address = ray.get_runtime_context().gcs_address
    return True


def largest_node() -> tuple[float, float]:
    """(CPUs, GPUs) of the live node with the most of the two, as Ray counts them."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return max(((n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in nodes), default=(0.0, 0.0))


def check_grantable(cpus: float, gpus: float, private: bool) -> None:
    """Refuse an actor of ``cpus`` and ``gpus`` that no node can hold: at once on a private
    instance; on a cluster after ``AUTOSCALER_WAIT_S``, while an autoscaler may add nodes."""
    deadline = time.monotonic() + (0.0 if private else AUTOSCALER_WAIT_S)
    warned = False
    while True:
        have_cpus, have_gpus = largest_node()
        if cpus <= have_cpus and gpus <= have_gpus:
            return
        message = (
            f"resources: an actor asks for {cpus:g} CPUs and {gpus:g} GPUs, but the largest "
            f"node {'of this machine' if private else 'of the cluster'} has {have_cpus:g} CPUs "
            f"and {have_gpus:g} GPUs; lower resources.cpus_per_actor / gpus_per_actor"
        )
        if time.monotonic() >= deadline:
            raise ConfigError(message)
        if not warned:
            log.warning("%s (waiting up to %.0f s for the autoscaler)", message, AUTOSCALER_WAIT_S)
            warned = True
        time.sleep(5.0)
