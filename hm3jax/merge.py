"""`python -m hm3jax.merge CONFIG.yml OUT_DIR`: the merge CLI (implemented in hm3jax.merging)."""

import sys

if __name__ == "__main__":  # before the heavy imports: this may restart the process once
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()
    try:
        from hm3jax.merging.__main__ import main  # imports JAX (seconds): Ctrl-C here is one line too
    except KeyboardInterrupt:
        print("interrupted by SIGINT; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
