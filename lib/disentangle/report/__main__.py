"""``python -m disentangle.report``: see :mod:`disentangle.report.run`."""

import sys

from .run import main

sys.exit(main())
