"""Class descriptions, from every source in one shape: ``{class_name: [description, ...]}``.

Sources: ``shipped`` (written for this project, digits and CIFAR-10), ``templates`` (prompt
templates, offline), ``llm`` (see :mod:`embeddings.llm`) and any JSON file of that shape (for
example CuPL's published GPT-3 descriptions). Real LLM output is messy, so everything passes
through :func:`clean_descriptions` before it is encoded.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from bitstorm.errors import ConfigError, DataError
from embeddings.classes import display_name
from embeddings.description_types import Descriptions
from embeddings.llm import CUPL_QUESTIONS, LLMConfig, llm_descriptions

SHIPPED_DESCRIPTIONS = ("digits", "cifar10")

# A subset of CLIP's ImageNet prompt ensemble (Radford et al., 2021): the offline fallback.
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a cropped photo of a {}.",
)

_HAS_WORD = re.compile(r"\w")


def load_descriptions(
    source: str,
    class_set: str,
    class_names: Sequence[str],
    *,
    llm_config: LLMConfig | None = None,
    questions: Sequence[str] | None = None,
) -> Descriptions:
    """Raw descriptions (clean them with :func:`clean_descriptions`) from ``source``:
    ``shipped`` (for ``class_set``), ``templates``, ``llm`` (``questions``, default CuPL's, asked
    with ``llm_config``, default ``LLMConfig.from_env()``: the environment's endpoint and model)
    or the path of a JSON file."""
    if source == "shipped":
        return shipped_descriptions(class_set)
    if source == "templates":
        return template_descriptions(class_names)
    if source == "llm":
        config = llm_config if llm_config is not None else LLMConfig.from_env()
        return llm_descriptions(
            class_names, config, CUPL_QUESTIONS if questions is None else questions
        )
    return read_descriptions(source)


def shipped_descriptions(class_set: str) -> Descriptions:
    """The descriptions this project wrote for a class set."""
    if class_set not in SHIPPED_DESCRIPTIONS:
        raise ConfigError(
            f"no shipped descriptions for {class_set!r} (shipped: "
            f"{', '.join(SHIPPED_DESCRIPTIONS)}); use --descriptions templates, llm, "
            "or a JSON file such as CuPL's"
        )
    path = resources.files("embeddings").joinpath(f"data/descriptions/{class_set}.json")
    return _parse_json(path.read_text(encoding="utf-8"), f"shipped {class_set}")


def template_descriptions(
    class_names: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> Descriptions:
    """One description per template and class: the offline source that needs no language model."""
    return {name: [t.format(display_name(name)) for t in templates] for name in class_names}


def read_descriptions(path: str | Path) -> Descriptions:
    """A user's JSON file ``{class_name: [description, ...]}``, uncleaned."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read descriptions file {path}: {error.strerror}") from None
    return _parse_json(text, str(path))


def clean_descriptions(
    raw: Mapping[str, Sequence[str]], class_names: Sequence[str], origin: str = "descriptions"
) -> Descriptions:
    """Match ``raw``'s classes to ``class_names`` and tidy each description.

    Class keys match regardless of case, underscores and spacing (CuPL's ``aquarium fish`` is
    CIFAR-100's ``aquarium_fish``). Descriptions are stripped and their whitespace collapsed;
    entries with no letter or digit (a lone ".") and repeats (ignoring case) are dropped. A class
    left with nothing is an error that names it; keys for classes not asked for are ignored with a
    warning.
    """
    by_key: dict[str, str] = {}
    for key in raw:
        normal = _match_key(key)
        if normal in by_key:
            raise DataError(f"{origin}: classes {by_key[normal]!r} and {key!r} are the same class")
        by_key[normal] = key
    cleaned: Descriptions = {}
    missing = []
    for name in class_names:
        key = by_key.pop(_match_key(name), None)
        texts = _tidy(raw[key]) if key is not None else []
        if texts:
            cleaned[name] = texts
        else:
            missing.append(name)
    if missing:
        raise DataError(
            f"{origin}: no usable descriptions for {len(missing)} of {len(class_names)} classes: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. "
            "Add them, or check that the file is for this class set"
        )
    if by_key:
        extra = sorted(by_key.values())
        warnings.warn(
            f"{origin}: ignoring {len(extra)} classes not in the class set: {extra[:5]}",
            stacklevel=2,
        )
    return cleaned


def description_hash(descriptions: Mapping[str, Sequence[str]]) -> str:
    """sha256 of the descriptions in canonical JSON: the identity of a description set."""
    canonical = json.dumps(
        {name: list(texts) for name, texts in descriptions.items()},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _tidy(texts: object) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        return []
    seen: set[str] = set()
    tidy = []
    for text in texts:
        if not isinstance(text, str):
            continue
        text = " ".join(text.split())
        if _HAS_WORD.search(text) and text.casefold() not in seen:
            seen.add(text.casefold())
            tidy.append(text)
    return tidy


def _match_key(name: str) -> str:
    return display_name(name).casefold()


def _parse_json(text: str, origin: str) -> Descriptions:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{origin}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in data.values()
    ):
        raise DataError(
            f"{origin}: expected a JSON object {{class_name: [description, ...]}} of strings"
        )
    return data
