"""`python -m hm3jax.merge CONFIG.yml OUT_DIR`: the merge CLI (implemented in hm3jax.merging)."""

import sys

if __name__ == "__main__":  # before the heavy imports: this may restart the process once
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()

from hm3jax.merging.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
