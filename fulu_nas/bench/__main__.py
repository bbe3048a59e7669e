"""``python -m fulu_nas.bench``."""

import sys

from .cli import main

sys.exit(main())
