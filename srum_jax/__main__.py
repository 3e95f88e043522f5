import sys

from srum_jax.cli import main

sys.exit(main())
