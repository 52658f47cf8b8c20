"""The memory plan of a run: bytes of the layer pool, the merged models, a scoring batch's activations
and the agents, per device on a mesh, and the largest batch of paths scored at once.

Counts follow the code: the pool stacks K experts' layers plus one merged model's, (K+1)·L layers
(`models.pool`); preferences share the experts, so N preferences add N merged models (layers and
shell); the path scorer (`make_path_scorer`, vmapped over paths) holds, per path in flight, one
gathered layer slice and one layer's activations or the float32 logits. `scoring_bytes` is the
formula that tests/test_memplan.py checks against `jax.jit(...).lower(...).compile()
.memory_analysis()` on a small model.

    plan(QWEN25_15B, DEVICES["8x80GB"], num_experts=3)  ->  Plan(..., max_paths=...)
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from hm3jax.cost import layer_parameters, shell_parameters
from hm3jax.log import add_verbosity_flags, setup_logging
from hm3jax.models.config import ModelConfig

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """An accelerator pool: `chips` devices of `hbm` bytes each."""

    name: str
    chips: int
    hbm: int


DEVICES = {
    "1x80GB": DeviceSpec("1 GPU, 80 GB (A100/H100)", 1, 80 * GiB),
    "8x80GB": DeviceSpec("8 GPUs, 80 GB each", 8, 80 * GiB),
    "v5e-16": DeviceSpec("TPU v5e-16 (16 chips x 16 GiB)", 16, 16 * GiB),
    "v4-32": DeviceSpec("TPU v4-32 (16 chips x 32 GiB)", 16, 32 * GiB),
}

QWEN25_15B = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         tie_word_embeddings=True)
LLAMA2_7B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                        tie_word_embeddings=False)
LLAMA2_13B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                         num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, head_dim=128,
                         tie_word_embeddings=False)
MODELS = {"Qwen2.5-1.5B": QWEN25_15B, "Llama-2-7B": LLAMA2_7B, "Llama-2-13B": LLAMA2_13B}


def activation_bytes_per_path(cfg: ModelConfig, rows: int, seq: int, dtype_bytes: int) -> int:
    """Peak working memory of one path scored on `rows` x `seq` tokens: the gathered layer slice
    plus the larger of one layer's live activations and the head's float32 logits (with their
    softmax temporary). One layer: the residual stream and its norm (2 D), q/k/v and the attention
    output ((2 Hq + 2 Hkv) hd), the gate, up and product (3 F) in the params' dtype, plus float32
    scores and probabilities (2 Hq S)."""
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_token = (2 * D + (2 * hq + 2 * hkv) * hd + 3 * F) * dtype_bytes + 2 * hq * seq * 4
    layer = rows * seq * per_token
    logits = 2 * rows * seq * cfg.vocab_size * 4
    return layer_parameters(cfg) * dtype_bytes + max(layer, logits)


def scoring_bytes(cfg: ModelConfig, pool_layers: int, paths: int, rows: int, seq: int, dtype_bytes: int,
                  path_len: int | None = None) -> dict[str, int]:
    """Bytes of one compiled scoring call of `paths` paths on a rows x seq batch, one device:
    "arguments" (pool, shell, batch tokens/masks/task ids, paths: exact), "temp" (the
    activations: `paths` x activation_bytes_per_path) and "outputs" (two float32 per path)."""
    T = cfg.num_hidden_layers if path_len is None else path_len
    batch = rows * seq * (4 + 4 + 1) + rows * 4
    args = (pool_layers * layer_parameters(cfg) + shell_parameters(cfg)) * dtype_bytes + batch + paths * T * 4
    return {"arguments": args, "temp": paths * activation_bytes_per_path(cfg, rows, seq, dtype_bytes),
            "outputs": 2 * paths * 4}


def agent_bytes(cfg: ModelConfig, num_experts: int, preferences: int) -> int:
    """Agents of the lower level (one per preference): float32 params, gradients and Adam's two
    moments, from the agent's own init (jax.eval_shape: nothing is allocated)."""
    # JAX loads only to measure a scorer's memory: the plan itself is arithmetic (JAX-free CLI)
    import jax

    from hm3jax.search.agent import AgentConfig, init_agent
    from hm3jax.search.env import PathLayout

    L = cfg.num_hidden_layers
    shapes = jax.eval_shape(lambda k: init_agent(AgentConfig(), PathLayout(num_experts, L, L, True),
                                                 num_experts, num_experts, k), jax.random.PRNGKey(0))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    return 4 * n * 4 * preferences


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes in all (not per device) and the mesh chosen; `max_paths`: paths scored at once (over
    all `in_flight` preferences together); `fits`: whether one preference's state fits at all."""

    model: str
    device: str
    pool: int
    merged_per_preference: int
    shell: int
    activations_per_path: int
    agents: int
    fsdp: int
    data: int
    in_flight: int
    per_device_static: int
    max_paths: int
    fits: bool


def plan(cfg: ModelConfig, device: DeviceSpec, num_experts: int = 3, preferences: int = 20, rows: int = 8,
         seq: int = 512, dtype_bytes: int = 2, headroom: float = 0.9, name: str = "") -> Plan:
    """The memory plan of `cfg` with K=`num_experts` and N=`preferences` on `device`.

    Static bytes: the experts' layers K·L and shells, plus per preference in flight one merged
    model (its L layers complete the (K+1)·L pool; its shell), plus the agents (replicated). The
    model bytes are split over `fsdp`: the smallest power of two (at most the chip count) that
    leaves at least half of each chip's `headroom`·HBM for activations with one preference in
    flight; then as many preferences as still fit that half are searched at once (`in_flight`).
    Paths are split over `data` = chips / fsdp, activations not assumed to shrink with fsdp:
    max_paths = data x floor((headroom·HBM - static per chip) / activation bytes per path).
    """
    lp, sp = layer_parameters(cfg), shell_parameters(cfg)
    L, b = cfg.num_hidden_layers, dtype_bytes
    experts = num_experts * (L * lp + sp) * b + sp * b  # the experts and the base's shell
    merged = (L * lp + sp) * b
    agents = agent_bytes(cfg, num_experts, 1)
    act = activation_bytes_per_path(cfg, rows, seq, b)
    budget = headroom * device.hbm

    def static(g: int, fsdp: int) -> int:
        return math.ceil((experts + g * merged) / fsdp) + g * agents

    fsdp = 1
    while fsdp < device.chips and static(1, fsdp) > budget / 2:
        fsdp *= 2
    fsdp = min(fsdp, device.chips)
    g = 1
    while g < preferences and static(g + 1, fsdp) <= budget / 2:
        g += 1
    per_dev = static(g, fsdp)
    data = device.chips // fsdp
    free = budget - per_dev
    paths = int(free // act) * data if free > 0 else 0
    return Plan(name or cfg.model_type, device.name, (num_experts + 1) * L * lp * b, merged, sp * b, act,
                agents * g, fsdp, data, g, per_dev, paths, per_dev <= budget)


def plan_table(num_experts: int = 3, preferences: int = 20, rows: int = 8, seq: int = 512) -> str:
    """The markdown table of benchmarks/README.md: every model of MODELS on every device of DEVICES."""
    head = ("| model | devices | pool (K+1)L | merged / pref. | act. / path | mesh data x fsdp "
            "| prefs in flight | static / chip | max paths at once |\n|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for mname, cfg in MODELS.items():
        for dev in DEVICES.values():
            p = plan(cfg, dev, num_experts, preferences, rows, seq, name=mname)
            paths = p.max_paths if p.fits else "does not fit"
            out.append(f"| {mname} | {dev.name} | {p.pool / GiB:.1f} GiB | {p.merged_per_preference / GiB:.2f} GiB "
                       f"| {p.activations_per_path / GiB:.2f} GiB | {p.data} x {p.fsdp} | {p.in_flight} "
                       f"| {p.per_device_static / GiB:.1f} GiB | {paths} |")
    return "\n".join(out)


def main(argv=None) -> int:
    """python -m hm3jax.memplan [-v | -q]: print the planning table (markdown) on stdout; any other
    argument is refused (exit 2) rather than ignored."""
    ap = argparse.ArgumentParser(prog="python -m hm3jax.memplan", description=__doc__.splitlines()[0])
    add_verbosity_flags(ap)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    print(plan_table())
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
