"""Export a solution (a layer path under one model's shell) as a plain Hugging Face checkpoint: the
public name of hm3jax.run.export (see it for the files an export holds and how mergekit rebuilds
them). `python -m hm3jax.recommend RUN_DIR --preference ... --export DIR` exports a run's solution.

    hm3jax.export.export_path("out", cfg, {"math": p_math, "merge": p_merge}, [("math", 0), ("merge", 1)],
                              "merge", solution=record)
"""

from hm3jax.run.export import (
    PATH_RECIPE,
    README_FILE,
    SOLUTION_FILE,
    UPPER_OUTPUT,
    UPPER_RECIPE,
    ExportError,
    check_finite,
    check_path,
    export_path,
    passthrough_recipe,
    path_params,
    upper_recipe,
)

__all__ = ["PATH_RECIPE", "README_FILE", "SOLUTION_FILE", "UPPER_OUTPUT", "UPPER_RECIPE", "ExportError", "check_finite",
           "check_path", "export_path", "passthrough_recipe", "path_params", "upper_recipe"]
