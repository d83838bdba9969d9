"""``python -m embeddings``: see :mod:`embeddings.cli`."""

import sys

from embeddings.cli import main

sys.exit(main())
