import sys

from hm3jax.runtime import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    from hm3jax.zoo.cli import main

    sys.exit(main())
