"""bitstorm's entry point: ``python campaign/run.py`` on one machine, and
``ray submit cluster.yaml campaign/run.py -- --address auto --spec FILE`` on a cluster (Ray
copies only this file to the head node, so it imports the installed package, never its
neighbours).

With no arguments it runs the embedded default (campaign.default); see campaign.cli for the rest.
"""

import os
import sys

# Run as a script, Python puts this file's folder first on sys.path, where campaign/*.py would
# shadow top-level modules of the same names. Drop it: everything comes from the installed package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from campaign.cli import main

if __name__ == "__main__":
    sys.exit(main())
