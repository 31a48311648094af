"""`python -m simnet run simnet/scenarios/X.toml --seed N [--set key=value] [--plot out.png]`."""

import sys

from .cli import main

sys.exit(main())
