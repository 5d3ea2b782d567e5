"""``python -m kdcache ...``: the ``kdcache`` command
(also under ``torchrun ... -m kdcache train``).
"""

import sys

from kdcache.cli import main

if __name__ == "__main__":
    sys.exit(main())
