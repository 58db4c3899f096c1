"""`python -m geobench …`: what torchrun starts in each process."""

import sys

from geobench.cli import main

sys.exit(main())
