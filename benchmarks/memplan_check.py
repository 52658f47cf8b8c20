"""The memory plan against XLA's own memory analysis at paper scale, with no weights allocated.

For each paper model (hm3jax.memplan.MODELS) on an 8-device (data x fsdp) mesh of fake CPU devices,
the sharded path scorer of hm3jax.objectives.sharded_scoring (the same function: `forward_layers`
vmapped over paths, the pool over `fsdp`, paths over `data`) is lowered with abstract inputs
(jax.ShapeDtypeStruct with the rules' shardings) and compiled; `memory_analysis()` then gives the
per-device argument and temporary bytes, set next to the plan's formula (memplan.scoring_bytes:
arguments split over fsdp, activations per path). XLA:CPU's buffer assignment is not a GPU's or a
TPU's; on a device, run this with the real backend for the figures to trust.

    python benchmarks/memplan_check.py [--mesh 4x2] [--paths 8] [--rows 8] [--seq 512] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def check(name: str, cfg, mesh, paths: int, rows: int, seq: int, dtype) -> dict:
    import jax
    import jax.numpy as jnp

    from hm3jax import cost, memplan
    from hm3jax.models.decoder import forward_layers
    from hm3jax.models.params import layer_shapes, shell_shapes
    from hm3jax.objectives.batch import Batch
    from hm3jax.objectives.scoring import answer_loglik, exact_match, task_means
    from hm3jax.sharding import batch_sharding, param_shardings, pool_shardings, replicated

    K, L = 3, cfg.num_hidden_layers
    pool_size = (K + 1) * L
    shell = {}
    for p, s in shell_shapes(cfg).items():
        shell.setdefault(p[0], {})[p[1]] = jax.ShapeDtypeStruct(s, dtype)
    layers: dict = {}
    for p, s in layer_shapes(cfg).items():
        node = layers
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = jax.ShapeDtypeStruct((pool_size, *s), dtype)
    shell_sh, layers_sh = param_shardings(shell, mesh), pool_shardings(layers, mesh)
    rows_ab = Batch(jax.ShapeDtypeStruct((rows, seq), jnp.int32), jax.ShapeDtypeStruct((rows, seq), jnp.int32),
                    jax.ShapeDtypeStruct((rows, seq), jnp.bool_), jax.ShapeDtypeStruct((rows,), jnp.int32))
    rows_sh = Batch(*(replicated(mesh) for _ in rows_ab))
    paths_sh, out_sh = batch_sharding(mesh, 2, "paths"), batch_sharding(mesh, 1, "paths")

    def score_paths(shell, layers, rows, paths):
        def one(path):
            logits = forward_layers(cfg, shell, layers, path, rows.tokens, rows.attention_mask)
            return task_means(exact_match(logits, rows), rows, None), task_means(answer_loglik(logits, rows), rows, None)

        return jax.vmap(one)(paths)

    jitted = jax.jit(score_paths, in_shardings=(shell_sh, layers_sh, rows_sh, paths_sh),
                     out_shardings=(out_sh, out_sh))
    ma = jitted.lower(shell, layers, rows_ab, jax.ShapeDtypeStruct((paths, L), jnp.int32)).compile().memory_analysis()
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    b = jnp.dtype(dtype).itemsize
    whole = memplan.scoring_bytes(cfg, pool_size, paths // data, rows, seq, b)
    model = (pool_size * cost.layer_parameters(cfg) + cost.shell_parameters(cfg)) * b
    plan_args = model / fsdp + (whole["arguments"] - model)
    return {"model": name, "mesh": f"{data} x {fsdp}", "paths": paths,
            "args_xla": ma.argument_size_in_bytes, "args_plan": plan_args,
            "temp_xla": ma.temp_size_in_bytes, "temp_plan": whole["temp"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default="4x2", help="data x fsdp over the 8 fake devices")
    p.add_argument("--paths", type=int, default=8, help="paths scored in one call (a multiple of data)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from hm3jax import memplan
    from hm3jax.sharding import MeshConfig, make_mesh

    data, fsdp = (int(x) for x in args.mesh.split("x"))
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp))
    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, mesh {args.mesh}, "
          f"{args.rows} rows x {args.seq} tokens, {args.dtype}; bytes per device")
    print("| model | mesh data x fsdp | paths | arguments: XLA / plan | temp: XLA / plan | temp ratio |")
    print("|---|---|---|---|---|---|")
    G = 2**30
    for name, cfg in memplan.MODELS.items():
        r = check(name, cfg, mesh, args.paths, args.rows, args.seq, jnp.dtype(args.dtype))
        print(f"| {name} | {r['mesh']} | {r['paths']} | {r['args_xla'] / G:.2f} / {r['args_plan'] / G:.2f} GiB "
              f"| {r['temp_xla'] / G:.2f} / {r['temp_plan'] / G:.2f} GiB | {r['temp_xla'] / r['temp_plan']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
