"""``python -m fulu_nas``: the ``fulu-nas`` command where it is not installed as a script (a checkout put
on PYTHONPATH, e.g. on a GPU machine; docs/gpu.md)."""

import sys

from .cli import main

sys.exit(main())
