"""The campaign spec: what to inject where, how many trials, and on what resources.

Written as YAML (see ``campaign/specs/*.yaml``, documented field by field in the README), parsed
once by the one config loader into typed, frozen dataclasses and validated before any work
starts, with errors that name the field. Nothing downstream re-parses a field.

Two kinds of field: *where* a campaign runs (its name and folders, the data root, resources;
marked ``PLACE``) and *what* it measures (everything else). The fingerprint that guards a
results folder covers every field that is not a place, so a new field is guarded by default,
and moving folders never blocks a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitstorm.config import from_dict, load_config_data
from bitstorm.errors import ConfigError
from campaign.faults.bits import FORMATS, format_width
from campaign.faults.trials import KINDS

SAMPLINGS = ("per_stratum", "exhaustive", "leveugle", "sequential")
SEQUENTIAL_KEYS = ("margin", "confidence")
# Metadata of the fields that say where a campaign runs, not what it measures.
PLACE = {"place": True}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the campaign: a name for the results and a training checkpoint folder.
    ``embeddings``, when set, must be the class-embedding file the checkpoint was trained with."""

    name: str
    checkpoint: str
    embeddings: str | None = None


@dataclass(frozen=True)
class Resources:
    """How a campaign runs: the Ray actor pool and trials per forward (one actor per GPU on a
    cluster). Results never depend on these."""

    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("actors", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"resources.{name} must be positive, got {getattr(self, name)}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError("resources.cpus_per_actor and gpus_per_actor must be >= 0")


@dataclass(frozen=True)
class CampaignSpec:
    models: list[ModelEntry]
    name: str = field(default="campaign", metadata=PLACE)
    output: str = field(default="results", metadata=PLACE)
    data_root: str = field(default="data", metadata=PLACE)
    resources: Resources = field(default_factory=Resources, metadata=PLACE)
    # images: `images` of the data set's validation split, drawn with `image_seed`; with
    # golden_correct_only, only images every model classifies correctly take part.
    dataset: str | None = None  # default: the first checkpoint's data set
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
    # model x kind is spent). In YAML, ``sampling: {margin: m, confidence: c}`` is short for
    # sequential with that margin and confidence.
    sampling: str = "per_stratum"
    trials_per_stratum: int = 64
    margin: float = 0.01
    confidence: float = 0.95
    max_trials: int | None = None
    # max_rounds only decides when to stop: a rerun with more rounds goes on from there.
    max_rounds: int = field(default=40, metadata=PLACE)
    seed: int = 0
    shard_size: int = 4096  # trials per shard: shard ids and files depend on it

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if not self.models or len(set(names)) != len(names):
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
        if self.sampling == "margin":
            raise ConfigError(
                "sampling: 'margin' is now 'leveugle' (Leveugle's fixed size per stratum); "
                "for sequential sampling to a margin write sampling: {margin: ..., confidence: ...}"
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not 0 < self.margin < 1 or not 0 < self.confidence < 1:
            raise ConfigError("margin and confidence must lie strictly between 0 and 1")
        for name in ("images", "trials_per_stratum", "shard_size", "max_rounds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_trials is not None and self.max_trials <= 0:
            raise ConfigError(f"max_trials must be positive, got {self.max_trials}")
        if self.max_trials is not None and self.sampling != "sequential":
            raise ConfigError("max_trials applies to sequential sampling only")

    @classmethod
    def parse(cls, data: Mapping[str, Any], origin: str = "spec") -> CampaignSpec:
        """A spec from a YAML mapping: the ``sampling`` shorthand expanded, old field places
        explained, every field typed and checked."""
        return from_dict(cls, _expand_sampling(_refuse_moved_fields(data)), origin)

    def bits_of(self, fmt: str) -> list[int]:
        return list(self.bits) if self.bits is not None else list(range(format_width(fmt)))

    def fingerprint(self, model_ids: Mapping[str, str]) -> str:
        """Identity of what the results depend on: every field that is not a ``PLACE``, with
        each model by name and ``model_ids[name]`` (its weights' sha256, so a moved checkpoint
        is the same model) instead of its paths. A rerun with another fingerprint into the
        same folder would mix campaigns, so it is refused."""
        measured = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("place") and f.name != "models"
        }
        measured["models"] = [(m.name, model_ids[m.name]) for m in self.models]
        text = json.dumps(measured, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CampaignSpec:
    """A campaign spec by file path or by the name of a shipped preset (``paper/digits_resnet18``),
    plus ``key=value`` overrides (``resources.actors=4`` for a nested field)."""
    data = load_config_data(path, overrides, package="campaign", folder="specs")
    return CampaignSpec.parse(data, str(path))


def _expand_sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """``sampling: {margin, confidence}`` -> sequential sampling with those targets."""
    data = dict(data)
    sampling = data.get("sampling")
    if not isinstance(sampling, Mapping):
        return data
    unknown = sorted(set(sampling) - set(SEQUENTIAL_KEYS))
    if unknown or not sampling:
        raise ConfigError(
            f"sampling: a mapping takes {' and '.join(SEQUENTIAL_KEYS)} "
            f"(sequential sampling to a margin), got {sorted(sampling)}"
        )
    for key, value in sampling.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"sampling.{key} must be a number, got {value!r}")
        data[key] = float(value)
    data["sampling"] = "sequential"
    return data


def _refuse_moved_fields(data: Mapping[str, Any]) -> Mapping[str, Any]:
    moved = [f.name for f in dataclasses.fields(Resources) if f.name in data]
    if moved:
        raise ConfigError(
            f"{moved[0]}: resource fields now live under resources: (resources: "
            f"{{{moved[0]}: {data[moved[0]]}}} in YAML, resources.{moved[0]}=... as an override)"
        )
    return data
