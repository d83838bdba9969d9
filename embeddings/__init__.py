"""Class embeddings for text-guided heads: class names -> descriptions -> a CLIP-style text
encoder -> one averaged, L2-normalised embedding per class, stored as safetensors with metadata.

Public surface: :func:`build_embeddings`, :func:`load_embeddings`, :func:`import_release`,
:class:`ClassEmbeddings`; the CLI is ``python -m embeddings``.
"""

from embeddings.build import build_embeddings
from embeddings.store import ClassEmbeddings, import_release, load_embeddings, save_embeddings

__all__ = [
    "ClassEmbeddings",
    "build_embeddings",
    "import_release",
    "load_embeddings",
    "save_embeddings",
]
