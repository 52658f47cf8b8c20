"""Deprecated home of the embedded zoo: use `hm3jax.zoo` (and `python -m hm3jax.zoo OUT_DIR`).

Kept for one release: importing it re-exports `hm3jax.zoo`'s public names with a DeprecationWarning,
and `python -m hm3jax.objectives.zoo` runs the new CLI after a one-line notice.
"""

import sys
import warnings

from hm3jax.zoo import *  # noqa: F403
from hm3jax.zoo import __all__  # noqa: F401

warnings.warn("hm3jax.objectives.zoo moved to hm3jax.zoo; this alias goes away in the next release",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()
    print("note: `python -m hm3jax.objectives.zoo` is deprecated; use `python -m hm3jax.zoo`",
          file=sys.stderr)
    from hm3jax.zoo.cli import main

    sys.exit(main())
