"""`python -m gsp_kernels`: the gsp-kernels command."""

import sys

from .cli import main

sys.exit(main())
