"""``python -m bitstorm``: the ``bitstorm`` command (bitstorm.cli)."""

import sys

from bitstorm.cli import main

sys.exit(main())
