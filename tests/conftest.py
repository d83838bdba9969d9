"""Test-wide settings: nothing may reach the network while tests run."""

import os

import pytest

# Set before anything imports huggingface_hub, which reads it once: a hub lookup fails at once
# instead of retrying for a minute against a closed network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that needs one (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
