"""`python -m gateway`: the same as the `registry-gateway` command."""

import sys

from .cli import main

sys.exit(main())
