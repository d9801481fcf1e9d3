"""``python -m disentangle.report``: see :mod:`disentangle.report.run`."""

import sys

from .run import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # outside a section (main marks a section it interrupts): one line, no traceback
    print("interrupted: finished runs are cached; run the same command again to resume", file=sys.stderr)
    sys.exit(130)
