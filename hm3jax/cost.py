"""Inference cost of a solution: layers run, parameters of the exported model, FLOPs per token.

A solution runs a path of T layers (T may differ from the source models' L, and a layer may repeat)
between one model's shell (embeddings, final norm, head). Its cost is that of the plain T-layer
decoder `hm3jax.export` writes for it:

  layers           T = the path's steps that run a layer (skipped steps, `None`, run nothing).
  parameters       every parameter of the exported model: shell + T x one layer's parameters. A
                   repeated layer is stored twice in the export, so it counts twice; the embedding
                   counts once, and the head too unless tied to the embedding.
  flops_per_token  forward FLOPs per token at sequence length S (the convention of Hoffmann et al.
                   2022, appendix F, as in Kaplan et al. 2020's C_forward):
                       2 x (T x M_layer + V x D)          matmuls: multiply-add = 2 FLOPs per weight;
                                                          M_layer = the layer's projection weights
                                                          (q, k, v, o, gate, up, down), V x D = head
                     + 4 x T x S_eff x H_q x d_head       attention logits (QK^T) + weighted sum (AV)
                   with S_eff = min(S, sliding_window) (S without a window). Causal masking is not
                   discounted (as in the convention); embedding lookups, norms, biases, RoPE,
                   softmax and activations (O(D) per token each) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from hm3jax.models.config import ModelConfig
from hm3jax.models.params import layer_shapes, shell_shapes

# The projection weights of one layer (the matmuls; norms and biases are not matmul weights).
_MATMULS = (("self_attn", "q_proj", "weight"), ("self_attn", "k_proj", "weight"),
            ("self_attn", "v_proj", "weight"), ("self_attn", "o_proj", "weight"),
            ("mlp", "gate_proj", "weight"), ("mlp", "up_proj", "weight"), ("mlp", "down_proj", "weight"))


class SolutionCost(NamedTuple):
    """Cost of one solution (see the module docstring for the definitions)."""

    layers: int
    parameters: int
    flops_per_token: float

    def to_dict(self) -> dict:
        return {"layers": self.layers, "parameters": self.parameters,
                "flops_per_token": self.flops_per_token}


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (projections, their biases, the two norms)."""
    return sum(math.prod(s) for s in layer_shapes(cfg).values())


def shell_parameters(cfg: ModelConfig) -> int:
    """Parameters of the shell: embedding, final norm, and the head unless tied."""
    return sum(math.prod(s) for s in shell_shapes(cfg).values())


def layer_matmul_weights(cfg: ModelConfig) -> int:
    """Weights of one layer's projections (what the matmul FLOPs count)."""
    shapes = layer_shapes(cfg)
    return sum(math.prod(shapes[p]) for p in _MATMULS)


def model_cost(cfg: ModelConfig, num_layers: int, seq_len: int) -> SolutionCost:
    """Cost of a decoder with `cfg`'s layout running `num_layers` layers at sequence length `seq_len`.

    Args:
      cfg: the layout (widths, heads, vocabulary, tying, sliding window) shared by every layer.
      num_layers: T >= 0, layers run (repeats included).
      seq_len: S >= 1, the context length the FLOPs are measured at.
    Returns SolutionCost(layers=T, parameters, flops_per_token) as in the module docstring.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    params = shell_parameters(cfg) + num_layers * layer_parameters(cfg)
    s_eff = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    matmul = 2 * (num_layers * layer_matmul_weights(cfg) + cfg.vocab_size * cfg.hidden_size)
    attention = 4 * num_layers * s_eff * cfg.num_attention_heads * cfg.head_dim
    return SolutionCost(int(num_layers), int(params), float(matmul + attention))


def path_cost(cfg: ModelConfig, path: Sequence[Sequence | None], seq_len: int) -> SolutionCost:
    """Cost of a solution whose path is `path`: (model name, layer) pairs, `None` for a skipped step.

    Only the number of steps that run a layer matters: every pool layer shares `cfg`'s layout.
    """
    return model_cost(cfg, sum(1 for step in path if step is not None), seq_len)
