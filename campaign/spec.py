"""The campaign spec: what to inject where, how many trials, and on what resources.

Written as YAML (see ``campaign/specs/*.yaml``, documented field by field in the README) and
validated before any work starts, with errors that name the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bitstorm.config import from_dict, load_config, to_dict
from bitstorm.errors import ConfigError
from campaign.bits import FORMATS, format_width

KINDS = ("weight", "neuron")
SAMPLINGS = ("per_stratum", "exhaustive", "leveugle", "sequential")
SEQUENTIAL_KEYS = ("margin", "confidence")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the campaign: a name for the results and a training checkpoint folder.
    ``embeddings``, when set, must be the class-embedding file the checkpoint was trained with."""

    name: str
    checkpoint: str
    embeddings: str | None = None


@dataclass(frozen=True)
class CampaignSpec:
    models: list[dict]
    name: str = "campaign"
    # images: `images` of the data set's validation split, drawn with `image_seed`; with
    # golden_correct_only, only images every model classifies correctly take part.
    dataset: str | None = None  # default: the first checkpoint's data set
    data_root: str = "data"
    images: int = 256
    image_seed: int = 0
    golden_correct_only: bool = True
    # sites
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude_layers: list[str] = field(default_factory=list)
    layer_types: str = "conv_linear"
    formats: list[str] = field(default_factory=lambda: ["fp32"])
    bits: list[int] | None = None  # default: every bit of each format
    clamp: bool = False
    # sampling, per stratum (model x kind x layer x format x bit). ``sequential`` starts with
    # trials_per_stratum per stratum, then adds rounds of trials where the variance is until
    # every model x kind SDC rate has a half-width <= margin at confidence (or max_trials per
    # model x kind is spent). ``sampling: {margin: m, confidence: c}`` is short for
    # sequential with that margin and confidence.
    sampling: str | dict[str, float] = "per_stratum"
    trials_per_stratum: int = 64
    margin: float = 0.01
    confidence: float = 0.95
    max_trials: int | None = None
    max_rounds: int = 40
    seed: int = 0
    # output and resources
    output: str = "results"
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 256
    shard_size: int = 4096

    def __post_init__(self) -> None:
        entries = self.model_entries()
        names = [m.name for m in entries]
        if not entries or len(set(names)) != len(names):
            raise ConfigError("models: give at least one model, each with a unique name")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ConfigError(f"kinds: {kind!r} is not one of {', '.join(KINDS)}")
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise ConfigError(f"formats: {fmt!r} is not one of {', '.join(FORMATS)}")
        for bit in self.bits or []:
            for fmt in self.formats:
                if not 0 <= bit < format_width(fmt):
                    raise ConfigError(
                        f"bits: {bit} is outside {fmt}'s bits 0..{format_width(fmt) - 1}"
                    )
        if isinstance(self.sampling, dict):
            self._expand_sampling(self.sampling)
        if self.sampling == "margin":
            raise ConfigError(
                "sampling: 'margin' is now 'leveugle' (Leveugle's fixed size per stratum); "
                "for sequential sampling to a margin write sampling: {margin: ..., confidence: ...}"
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not 0 < self.margin < 1 or not 0 < self.confidence < 1:
            raise ConfigError("margin and confidence must lie strictly between 0 and 1")
        positive = ("images", "trials_per_stratum", "actors", "batch_size", "shard_size")
        for name in (*positive, "max_rounds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_trials is not None and self.max_trials <= 0:
            raise ConfigError(f"max_trials must be positive, got {self.max_trials}")
        if self.max_trials is not None and self.sampling != "sequential":
            raise ConfigError("max_trials applies to sequential sampling only")

    def _expand_sampling(self, sampling: dict[str, float]) -> None:
        """``sampling: {margin, confidence}`` -> sequential sampling with those targets."""
        unknown = sorted(set(sampling) - set(SEQUENTIAL_KEYS))
        if unknown or not sampling:
            raise ConfigError(
                f"sampling: a mapping takes {' and '.join(SEQUENTIAL_KEYS)} "
                f"(sequential sampling to a margin), got {sorted(sampling)}"
            )
        for key, value in sampling.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"sampling.{key} must be a number, got {value!r}")
            object.__setattr__(self, key, float(value))
        object.__setattr__(self, "sampling", "sequential")

    def model_entries(self) -> list[ModelEntry]:
        try:
            return [from_dict(ModelEntry, m, "models[]") for m in self.models]
        except TypeError:
            raise ConfigError("models: each entry is {name: ..., checkpoint: ...}") from None

    def bits_of(self, fmt: str) -> list[int]:
        return list(self.bits) if self.bits is not None else list(range(format_width(fmt)))

    def fingerprint(self) -> str:
        """Identity of what the results depend on (resources excluded): a rerun with another
        fingerprint into the same folder would mix campaigns, so it is refused."""
        relevant = {
            k: v
            for k, v in to_dict(self).items()
            # max_rounds only decides when to stop: a rerun with more rounds goes on from here.
            if k not in ("actors", "cpus_per_actor", "gpus_per_actor", "batch_size", "max_rounds")
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CampaignSpec:
    """A campaign spec by file path or by the name of a shipped preset (``paper/digits_resnet18``),
    plus overrides."""
    return load_config(CampaignSpec, path, overrides, package="campaign", folder="specs")
