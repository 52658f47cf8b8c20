"""`python -m hm3jax.merge CONFIG.yml OUT_DIR`: the merge CLI (implemented in hm3jax.merging)."""

import sys

from hm3jax.merging.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
