"""Campaign images: a campaign whose images all fail selection says so, instead of a traceback."""

import pytest
import torch
from torch import nn

from bitstorm.errors import DataError
from campaign.images import select_images
from campaign.spec import CampaignSpec


class NeverRight(nn.Module):
    """Always predicts an eleventh class, which no digit has."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 11)
        logits[:, 10] = 1.0
        return logits


def test_no_qualifying_image_is_a_data_error_that_says_what_to_do():
    spec = CampaignSpec.parse(
        {"models": [{"name": "m", "checkpoint": "/nonexistent"}], "dataset": "digits", "images": 8}
    )
    with pytest.raises(DataError, match="golden_correct_only: false"):
        select_images(spec, {"m": NeverRight()})
    relaxed = CampaignSpec.parse(
        {
            "models": [{"name": "m", "checkpoint": "/nonexistent"}],
            "dataset": "digits",
            "images": 8,
            "golden_correct_only": False,
        }
    )
    assert len(select_images(relaxed, {"m": NeverRight()}).indices) == 8
