"""`python -m knowstack.cli ...`, as the `knowstack` command (a subprocess, `accelerate launch -m knowstack.cli`)."""

import sys

from knowstack.cli import main

sys.exit(main())
