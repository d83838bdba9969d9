"""Test-wide settings: nothing may reach the network while tests run."""

import logging
import os
import uuid

import pytest

# Set before anything imports huggingface_hub, which reads it once: a hub lookup fails at once
# instead of retrying for a minute against a closed network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Object-store tests talk to a local moto server only, never with a developer's own AWS
# credentials; set before any Ray starts, so its workers inherit them. No instance-metadata
# lookups (they would wait for an EC2 endpoint that is not there).
os.environ.update(
    AWS_ACCESS_KEY_ID="bitstorm-test",
    AWS_SECRET_ACCESS_KEY="bitstorm-test-secret",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(autouse=True)
def bitstorm_logger():
    """A command run in-process takes bitstorm's logger for its terminal (bitstorm.logs):
    give it back, so that later tests' log capture sees bitstorm's records."""
    logger = logging.getLogger("bitstorm")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that needs one (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",  # a new instance, whatever cluster another test or run left behind
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free loopback port for the session, named by AWS_ENDPOINT_URL as a
    user names theirs (workers get it through the file systems the driver opens)."""
    server_module = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed (pip install 'moto[server]')"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new, empty bucket on the session's moto server, as ``s3://<bucket>``."""
    import pyarrow.fs as pafs

    name = f"bitstorm-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
