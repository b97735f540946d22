"""`python -m rlora ...` is the `rlora` command (also under `accelerate launch -m rlora`)."""

import sys

from rlora.cli import main

sys.exit(main())
