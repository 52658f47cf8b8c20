"""hm3jax.sharding: the mesh config, the partition rules, and (in subprocesses with 8 fake CPU
devices, see sharded_checks.py) sharded == unsharded merges, scoring and checkpoint loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from hm3jax import sharding
from hm3jax.config import RunConfigError, parse_run_config, validate
from hm3jax.models.config import ModelConfig
from hm3jax.models.params import param_shapes
from hm3jax.sharding import MeshConfig, ShardingError

CFG = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                  tie_word_embeddings=False)
CHECKS = os.path.join(os.path.dirname(__file__), "sharded_checks.py")


class FakeMesh:
    """Only what spec_for reads: axis sizes."""

    shape: ClassVar[dict] = {"data": 2, "fsdp": 4}


def test_default_mesh_is_one_device():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == 1


@pytest.mark.parametrize("kw, key", [({"data": 0}, "mesh.data"), ({"fsdp": -2}, "mesh.fsdp"),
                                     ({"data": -1, "fsdp": -1}, "both -1"), ({"slices": 0}, "mesh.slices"),
                                     ({"data": 3, "slices": 2}, "multiple of mesh.slices"),
                                     ({"rules": {"embed": "tensor"}}, "mesh.rules.embed"),
                                     ({"rules": {"hidden": "fsdp"}}, "mesh.rules.hidden")])
def test_bad_mesh_configs_name_their_key(kw, key):
    with pytest.raises(ShardingError, match=key.replace(".", r"\.")):
        MeshConfig(**kw).check()


def test_mesh_sizes_are_inferred_and_checked():
    assert sharding.mesh_shape(MeshConfig(fsdp=-1), 8) == (1, 8)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1), 8) == (2, 4)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2), 8) == (4, 2)
    with pytest.raises(ShardingError, match="needs 16 devices; 8 are visible"):
        sharding.mesh_shape(MeshConfig(data=4, fsdp=4), 8)


def test_run_config_has_a_mesh_section_checked_before_any_work():
    cfg = parse_run_config(["--config_path", "configs/smoke.yaml", "--mesh.fsdp", "-1"])
    assert cfg.mesh == MeshConfig(fsdp=-1)
    with pytest.raises(RunConfigError, match=r"mesh\.data must be"):
        validate(parse_run_config(["--config_path", "configs/smoke.yaml", "--mesh.data", "0"]))


def test_rules_place_every_params_leaf_fsdp_over_the_hidden_dimension():
    specs = {}
    rules = sharding.rules_of()
    for p, shape in param_shapes(CFG).items():
        axes = sharding.leaf_axes("/".join(p), len(shape))
        specs["/".join(p)] = sharding.spec_for(axes, shape, FakeMesh, rules)
    assert specs["embed_tokens/weight"] == P(None, "fsdp")
    assert specs["lm_head/weight"] == P(None, "fsdp")
    assert specs["layers/self_attn/q_proj/weight"] == P(None, None, "fsdp")
    assert specs["layers/self_attn/o_proj/weight"] == P(None, "fsdp", None)
    assert specs["layers/mlp/down_proj/weight"] == P(None, "fsdp", None)
    assert specs["layers/self_attn/k_proj/bias"] == P(None, None)
    assert specs["norm/weight"] == P(None)
    assert sharding.leaf_axes("layers/mlp/up_proj/weight", 3, "pool") == ("pool", "mlp", "embed")
    # Every leaf of the layout is placed on a real (one-device) mesh, none refused.
    tree = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(CFG).items()}
    nested: dict = {}
    for p, leaf in tree.items():
        d = nested
        for k in p[:-1]:
            d = d.setdefault(k, {})
        d[p[-1]] = leaf
    assert len(jax.tree.leaves(sharding.param_shardings(nested, sharding.make_mesh()))) == len(tree)
    # Overrides: replicate the hidden dimension, split the MLP width instead.
    over = sharding.rules_of(MeshConfig(rules={"embed": "none", "mlp": "fsdp"}))
    axes = sharding.leaf_axes("layers/mlp/up_proj/weight", 3)
    assert sharding.spec_for(axes, (2, 128, 64), FakeMesh, over) == P(None, "fsdp", None)
    # A dimension the axis does not divide stays whole.
    assert sharding.spec_for(("vocab", "embed"), (97, 66), FakeMesh, rules) == P(None, None)


def test_optimiser_states_follow_their_params_and_unknown_leaves_are_refused():
    import optax

    mesh = sharding.make_mesh()
    params = {"layers": {"mlp": {"up_proj": {"weight": jnp.zeros((2, 8, 4))}}}}
    state = optax.adam(1e-3).init(params)
    sh = sharding.opt_state_shardings(state, mesh)
    assert len(jax.tree.leaves(sh)) == len(jax.tree.leaves(state))
    assert sharding.leaf_axes("0/mu/layers/mlp/up_proj/weight", 3) == ("layers", "mlp", "embed")
    with pytest.raises(ShardingError, match="no partition rule places leaf 'agent/gru/kernel'"):
        sharding.param_shardings({"agent": {"gru": {"kernel": jnp.zeros((4, 4))}}}, mesh)
    assert sharding.batch_sharding(mesh, 2, "paths").spec == P(None, None)  # one device: nothing split


def test_merge_sharded_lives_in_merging_and_sharding_reexports_it():
    """merge_sharded's home is hm3jax.merging.sharded (hm3jax.sharding and hm3jax.merging re-export the
    same function), and sharding names leaves with merging.leaves.path_names (defined once)."""
    import inspect

    from hm3jax import merging
    from hm3jax.merging import leaves
    from hm3jax.merging.sharded import merge_sharded

    assert sharding.merge_sharded is merge_sharded is merging.merge_sharded
    assert sharding.path_names is leaves.path_names
    assert "def merge_sharded" not in inspect.getsource(sharding)
    # on the one default device: the merge itself, its outputs placed by the shardings given
    mesh = sharding.make_mesh()
    base = {"layers": {"mlp": {"up_proj": {"weight": jnp.ones((2, 8, 4))}}}}
    expert = {"layers": {"mlp": {"up_proj": {"weight": jnp.full((2, 8, 4), 3.0)}}}}
    shardings = sharding.param_shardings(base, mesh)
    got = sharding.merge_sharded("task_arithmetic", base, [expert], jnp.array([0.5]), shardings=shardings)
    want = merging.task_arithmetic(base, [expert], jnp.array([0.5]))
    leaf = got["layers"]["mlp"]["up_proj"]["weight"]
    assert jnp.array_equal(leaf, want["layers"]["mlp"]["up_proj"]["weight"])
    assert leaf.sharding == shardings["layers"]["mlp"]["up_proj"]["weight"]


def _run(check: str, *args: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, CHECKS, check, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
def test_every_merge_method_sharded_equals_unsharded():
    assert "merges ok" in _run("merges")


@pytest.mark.slow
def test_paths_scored_on_a_mesh_equal_the_single_device_scores():
    assert "scoring ok" in _run("scoring")


@pytest.mark.slow
def test_a_search_chunk_on_a_mesh_equals_the_single_device_chunk():
    assert "search ok" in _run("search")


@pytest.mark.slow
def test_checkpoints_load_straight_into_shards_and_save_from_them(tmp_path):
    assert "io ok" in _run("io", str(tmp_path))


def test_train_refuses_a_mesh_larger_than_the_devices_before_any_work(tmp_path, capsys):
    from hm3jax import train

    out = tmp_path / "run"
    rc = train.main(["--config_path", "configs/smoke.yaml", "--output_dir", str(out), "--mesh.data", "4"])
    assert rc == 2 and not out.exists()
    assert "mesh.data 4 x mesh.fsdp 1 needs 4 devices; 1 are visible" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_load_their_own_slices_and_process_0_writes(tmp_path):
    import socket

    import numpy as np

    from hm3jax.io import load_pretrained, save_pretrained
    from hm3jax.models.decoder import init_params

    save_pretrained(tmp_path / "src", CFG, init_params(CFG, jax.random.PRNGKey(0)), max_shard_size=20_000)
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, CHECKS, "multihost", str(i), str(tmp_path), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # one that hangs waiting for its peer
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"multihost {i} ok" in out, out
    _, want = load_pretrained(tmp_path / "src")
    _, got = load_pretrained(tmp_path / "out")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)
    # The merge and the path scores across the two processes are the single process's numbers.
    sys.path.insert(0, os.path.dirname(CHECKS))
    from sharded_checks import multihost_merge_and_score

    digest, em, ll = (np.asarray(x) for x in multihost_merge_and_score(CFG, want))
    for out in outs:
        lines = dict(line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith(("merge ", "path ")))
        np.testing.assert_allclose(json.loads(lines["digest"]), digest, rtol=1e-5, atol=1e-5)
        got_em, got_ll = json.loads(lines["scores"])
        np.testing.assert_allclose(got_em, em, atol=1e-6)
        np.testing.assert_allclose(got_ll, ll, rtol=1e-4, atol=1e-5)
