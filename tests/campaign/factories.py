"""A model factory for the ``factory: module:function`` source, as a user's project has one."""

import os

from torch import nn


def small_net(width: int = 8, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 4, num_classes),
    )


class _Recorded(nn.Sequential):
    """small_net that appends ``pid images`` to a file on every forward: which process ran it."""

    def __init__(self, record: str, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.record = record

    def forward(self, x):
        with open(self.record, "a") as log:
            log.write(f"{os.getpid()} {len(x)}\n")
        return super().forward(x)


def recorded_net(record: str, width: int = 8) -> nn.Module:
    return _Recorded(record, *small_net(width))
