"""`python -m export`: see export/build_mar.py."""

import sys

from export.build_mar import main

sys.exit(main())
