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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitstorm.config import from_dict, load_config_data
from bitstorm.errors import ConfigError
from bitstorm.tracking import TRACKERS
from campaign.analysis.results import OVERALLS
from campaign.faults.bits import FORMATS, fault_model
from campaign.faults.trials import KINDS

SAMPLINGS = ("per_stratum", "exhaustive", "leveugle", "sequential")
SOURCES = ("checkpoint", "torchvision", "timm", "factory", "in_memory")  # campaign.sources
IMAGE_SELECTIONS = ("every_model_correct", "own_correct", "any")
ALLOCATIONS = ("neyman", "equal")
TOP2DIFF_IMAGES = ("campaign", "validation")
# A protocol is a named bundle of the measurement choices below (docs/protocols.md); a spec
# may set any of them itself, and the manifest records every one as it was used.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # goldeneye (the paper's tool), read from its code: ../shared/PROTOCOL.md
    "goldeneye": {
        "range_restriction": True,
        "non_finite_sdc": False,
        "image_selection": "own_correct",
        "overall": "layer_mean",
        "allocation": "equal",
        "top2diff_images": "validation",
    },
    "bitstorm": {
        "range_restriction": False,
        "non_finite_sdc": True,
        "image_selection": "every_model_correct",
        "overall": "fault_space",
        "allocation": "neyman",
        "top2diff_images": "campaign",
    },
}
SEQUENTIAL_KEYS = ("margin", "relative_margin", "confidence")
# Metadata of the fields that say where a campaign runs, not what it measures.
PLACE = {"place": True}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the campaign: a name for the results and where the model comes from, one of
    ``checkpoint`` (a bitstorm checkpoint or training run folder), ``torchvision`` or ``timm``
    (a model name, with ``weights``: a torchvision weights name, a timm ``name.tag``, or a
    local file) and ``factory`` (``module:function`` returning an ``nn.Module``, called with
    ``kwargs``); see campaign.sources. ``embeddings``, for a checkpoint, must be the
    class-embedding file it was trained with. ``input_size``/``mean``/``std`` override the
    preprocessing that comes with the weights."""

    name: str
    checkpoint: str | None = None
    embeddings: str | None = None
    torchvision: str | None = None
    timm: str | None = None
    factory: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    in_memory: bool = False  # a module handed to bitstorm.run_campaign (campaign.api)

    def __post_init__(self) -> None:
        check_name(self.name, "models[].name")
        where = f"models[{self.name}]"
        given = [s for s in SOURCES if getattr(self, s)]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: give exactly one of checkpoint, torchvision, timm or factory"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.checkpoint and (self.weights or self.num_classes):
            raise ConfigError(f"{where}: a checkpoint holds its own weights and classes")
        if self.embeddings and not self.checkpoint:
            raise ConfigError(f"{where}.embeddings: only a checkpoint's embeddings are checked")
        if self.kwargs and not self.factory:
            raise ConfigError(f"{where}.kwargs: only a factory takes keyword arguments")
        if self.factory and not re.fullmatch(r"[\w.]+:\w+", self.factory):
            raise ConfigError(f"{where}.factory: {self.factory!r} is not module:function")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(f"{where}.{key}: give 3 numbers, one per colour channel")


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
    # how the campaign measures: a protocol's bundle fills every choice left out (None)
    protocol: str = "bitstorm"
    # goldeneye's range restriction of the faulty layer output, bounds profiled on the
    # training split (profile_images of it, drawn with image_seed; None: all of it)
    range_restriction: bool | None = None
    profile_images: int | None = None
    non_finite_sdc: bool | None = None  # False: a non-finite logit is not an SDC (goldeneye)
    overall: str | None = None  # fault_space: strata by fault-space share; layer_mean: layers equal
    allocation: str | None = None  # sequential rounds: neyman, or equal trials per stratum
    top2diff_images: str | None = None  # the mean golden Top2Diff over these images
    # images: `images` of the data set's validation split per model, drawn with `image_seed`;
    # image_selection: every_model_correct (one image set every model gets right),
    # own_correct (each model its own correct images with Top2Diff > 0), or any.
    dataset: str | None = None  # default: the checkpoints' data set; needed for other sources
    images: int = 256
    image_seed: int = 0
    image_selection: str | None = None
    # sites
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude_layers: list[str] = field(default_factory=list)
    layer_types: str = "conv_linear"
    formats: list[str] = field(default_factory=lambda: ["fp32"])
    bits: list[int] | None = None  # default: every bit a fault can start at in each format
    # what a fault does (campaign.faults.bits.fault_model): bit_flip, multi_bit:K (K adjacent
    # bits from the stratum's bit up), stuck_at_0, stuck_at_1
    fault_model: str = "bit_flip"
    # sampling, per stratum (model x kind x layer x format x bit). ``sequential`` starts with
    # trials_per_stratum per stratum, then adds rounds of trials where the variance is until
    # every model x kind SDC rate has a half-width <= margin at confidence (or max_trials per
    # model x kind is spent). In YAML, ``sampling: {margin: m, confidence: c}`` is short for
    # sequential with that margin and confidence. relative_margin, when set, asks instead for
    # a half-width <= relative_margin x the estimate (a rate known to 10% of itself).
    sampling: str = "per_stratum"
    trials_per_stratum: int = 64
    margin: float = 0.01
    relative_margin: float | None = None
    confidence: float = 0.95
    max_trials: int | None = None
    # every site x bit x image of each model's final classifier (a final Linear, or a text
    # head's class Linear), counted without a forward instead of sampled
    exhaustive_last_layer: bool = False
    # max_rounds only decides when to stop: a rerun with more rounds goes on from there.
    max_rounds: int = field(default=40, metadata=PLACE)
    seed: int = 0
    shard_size: int = 4096  # trials per shard: shard ids and files depend on it
    # where the summary is logged at the end (bitstorm.tracking): mlflow, tensorboard, wandb
    tracking: str = field(default="none", metadata=PLACE)
    tracking_uri: str | None = field(default=None, metadata=PLACE)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        for name, value in PROTOCOLS[self.protocol].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, allowed in (
            ("image_selection", IMAGE_SELECTIONS),
            ("overall", OVERALLS),
            ("allocation", ALLOCATIONS),
            ("top2diff_images", TOP2DIFF_IMAGES),
            ("tracking", TRACKERS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if self.profile_images is not None and self.profile_images <= 0:
            raise ConfigError(f"profile_images must be positive, got {self.profile_images}")
        names = [m.name for m in self.models]
        if not self.models or len(set(names)) != len(names):
            raise ConfigError("models: give at least one model, each with a unique name")
        check_name(self.name, "name")
        for name in ("kinds", "formats", "layers"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: give at least one (or leave {name} out: the default)")
        if self.bits is not None and not self.bits:
            raise ConfigError("bits: give at least one bit position (or leave bits out: all)")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ConfigError(f"kinds: {kind!r} is not one of {', '.join(KINDS)}")
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise ConfigError(f"formats: {fmt!r} is not one of {', '.join(FORMATS)}")
        try:
            fault = fault_model(self.fault_model)
        except ConfigError as error:
            raise ConfigError(f"fault_model: {error}") from None
        for bit in self.bits or []:
            for fmt in self.formats:
                if bit not in fault.bits(fmt):
                    last = fault.bits(fmt).stop - 1
                    under = f" under {fault.name}" if fault.width > 1 else ""
                    raise ConfigError(f"bits: {bit} is outside {fmt}'s bits 0..{last}{under}")
        if self.sampling == "margin":
            raise ConfigError(
                "sampling: 'margin' is now 'leveugle' (Leveugle's fixed size per stratum); "
                "for sequential sampling to a margin write sampling: {margin: ..., confidence: ...}"
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not 0 < self.margin < 1 or not 0 < self.confidence < 1:
            raise ConfigError("margin and confidence must lie strictly between 0 and 1")
        if self.relative_margin is not None and not 0 < self.relative_margin < 1:
            raise ConfigError("relative_margin must lie strictly between 0 and 1, e.g. 0.1")
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
        if self.bits is not None:
            return list(self.bits)
        return list(fault_model(self.fault_model).bits(fmt))

    def measured(self, model_ids: Mapping[str, str]) -> dict[str, Any]:
        """What the results depend on, as JSON values: every field that is not a ``PLACE``,
        with each model by name and ``model_ids[name]`` (its weights' sha256, so a moved
        checkpoint is the same model) instead of its paths."""
        measured = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("place") and f.name != "models"
        }
        if measured["fault_model"] == "bit_flip":  # older campaigns had only flips, unnamed:
            del measured["fault_model"]  # their fingerprints stand
        measured["models"] = [(m.name, model_ids[m.name]) for m in self.models]
        return json.loads(json.dumps(measured, sort_keys=True))

    def fingerprint(self, model_ids: Mapping[str, str]) -> str:
        """Identity of :meth:`measured`. A rerun with another fingerprint into the same folder
        would mix campaigns, so it is refused."""
        text = json.dumps(self.measured(model_ids), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_fields(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``field: before -> now`` for each measured field that differs (campaign.runner's
    refusal to resume a different campaign names them)."""
    changed = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]
    return "; ".join(changed)


# Names become folder names (the campaign's, and a model's hive partition): nothing that could
# leave the output folder or be read as a path separator.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, field_name: str) -> None:
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{field_name}: {name!r} is not a safe name; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, no '..', at most 128 characters)"
        )


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CampaignSpec:
    """A campaign spec by file path or by the name of a shipped preset (``paper/digits_resnet18``),
    plus ``key=value`` overrides (``resources.actors=4`` for a nested field)."""
    data = load_config_data(path, overrides, package="campaign", folder="specs")
    return CampaignSpec.parse(data, str(path))


def _expand_sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """``sampling: {margin | relative_margin, confidence}`` -> sequential sampling with those
    targets."""
    data = dict(data)
    sampling = data.get("sampling")
    if not isinstance(sampling, Mapping):
        return data
    unknown = sorted(set(sampling) - set(SEQUENTIAL_KEYS))
    if unknown or not sampling:
        raise ConfigError(
            f"sampling: a mapping takes {', '.join(SEQUENTIAL_KEYS)} "
            f"(sequential sampling to a margin), got {sorted(sampling)}"
        )
    for key, value in sampling.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"sampling.{key} must be a number, got {value!r}")
        data[key] = float(value)
    data["sampling"] = "sequential"
    return data


# Fields a protocol field replaced: what to write instead.
REPLACED = {
    "clamp": "range_restriction: true (goldeneye's range restriction, bounds from the "
    "training split; protocol: goldeneye turns it on)",
    "golden_correct_only": "image_selection: every_model_correct, own_correct or any",
}


def _refuse_moved_fields(data: Mapping[str, Any]) -> Mapping[str, Any]:
    for name, instead in REPLACED.items():
        if name in data:
            raise ConfigError(f"{name}: replaced by {instead}")
    moved = [f.name for f in dataclasses.fields(Resources) if f.name in data]
    if moved:
        raise ConfigError(
            f"{moved[0]}: resource fields now live under resources: (resources: "
            f"{{{moved[0]}: {data[moved[0]]}}} in YAML, resources.{moved[0]}=... as an override)"
        )
    return data
