"""Checks that need 8 devices, run by test_sharding.py in a fresh interpreter with 8 fake CPU devices
(`python tests/sharded_checks.py CHECK [TMPDIR]`; the device count is fixed before JAX starts).

merges: every merge method, sharded by the partition rules == unsharded, output sharded; the
  elementwise ones compile without an all-gather.
scoring: a batch of paths scored on (data, fsdp) meshes == make_path_scorer; no all-gather of a
  whole pool leaf.
io: load_sharded == load_pretrained, each device's callback reading only its slice; save_sharded
  writes what save_pretrained writes.
search: one PPO chunk of the lower level, preferences over data and the pool over fsdp == one device.
multihost PID TMP PORT: one of two processes (jax.distributed on localhost, 4 fake devices each):
  loading, saving, a TIES merge and a batch of path scores across both.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.models.config import ModelConfig
from hm3jax.sharding import MeshConfig, make_mesh, param_shardings

CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.02}, "ties": {"density": 0.5},
          "breadcrumbs": {"density": 0.8, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
          "sce": {"select_topk": 0.5}}
# Per-element methods (and TIES with the threshold-search trim): nothing to gather.
NO_GATHER = ("linear", "task_arithmetic", "dare_linear", "dare_ties", "nearswap", "passthrough")
_SHAPE = re.compile(r"= \w+\[([\d,]*)\]")


def gathered_sizes(hlo: str) -> list[int]:
    """Element counts of every all-gather result in compiled HLO text."""
    sizes = []
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            m = _SHAPE.search(line)
            dims = [int(d) for d in m.group(1).split(",") if d] if m else []
            sizes.append(int(np.prod(dims)) if dims else 0)
    return sizes


def check_merges() -> None:
    from hm3jax.merging import METHODS
    from hm3jax.merging.sharded import merge_sharded

    def tree(seed, scale=1.0):
        # One stacked leaf keeps the compile count (4 per method) within the test's time; the
        # partition rules place shell leaves the same way (test_sharding's fast tests).
        k = jax.random.PRNGKey(seed)
        return {"layers": {"mlp": {"up_proj": {"weight": scale * jax.random.normal(k, (2, 32, 64))}}}}

    base = tree(0)
    models = [jax.tree.map(lambda a, d: a + 0.1 * d * (jnp.abs(d) > 0.3), base, tree(i + 1)) for i in range(3)]
    mesh = make_mesh(MeshConfig(fsdp=8))
    sh = param_shardings(base, mesh)
    sb, sms = jax.device_put(base, sh), [jax.device_put(m, sh) for m in models]
    key = jax.random.PRNGKey(7)
    for name, method in sorted(METHODS.items()):
        m = 1 if method.max_models == 1 else 2 if method.max_models == 2 or name == "model_stock" else 3
        w = jnp.array([0.5, 0.3, 0.2][:m]) if method.uses_weights else None
        ignored = method.base == "ignored"
        k = key if method.random else None
        kw = PARAMS.get(name, {})
        ref = method.merge(None if ignored else base, models[:m], w, key=k, **kw)
        got = merge_sharded(method, None if ignored else sb, sms[:m], w, k, shardings=sh, **kw)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                                             err_msg=name), ref, got)
        spec = got["layers"]["mlp"]["up_proj"]["weight"].sharding.spec
        assert spec == jax.sharding.PartitionSpec(None, None, "fsdp"), (name, spec)
        if name in NO_GATHER:
            hlo = jax.jit(lambda b, ms, w=w, k=k, kw=kw, method=method: method.merge(
                None if ignored else b, ms, w, key=k, **kw)).lower(sb, sms[:m]).compile().as_text()
            assert not gathered_sizes(hlo), (name, "all-gather in an elementwise merge")
        print(name, "ok", flush=True)
    print("merges ok")


def _pool_and_batch():
    from hm3jax.models.decoder import init_params
    from hm3jax.models.pool import build_pool, shell_of
    from hm3jax.objectives.batch import Batch

    ms = [init_params(CFG, jax.random.PRNGKey(i)) for i in range(3)]
    rng = np.random.default_rng(0)
    n, s = 8, 12
    am = np.ones((n, s), np.int32)
    am[0, :3] = 0  # one left-padded row
    tm = np.zeros((n, s), bool)
    tm[:, 6:] = True
    batch = Batch(rng.integers(0, CFG.vocab_size, (n, s)).astype(np.int32), am, tm,
                  (np.arange(n) % 3).astype(np.int32))
    return build_pool(ms), shell_of(ms[0]), batch


def check_scoring() -> None:
    from hm3jax.objectives.scoring import make_path_scorer
    from hm3jax.objectives.sharded_scoring import make_sharded_paths_scorer

    pool, shell, batch = _pool_and_batch()
    paths = np.random.default_rng(1).integers(-1, pool.size, (8, 4)).astype(np.int32)
    want = jax.vmap(make_path_scorer(CFG, shell, pool, batch, num_tasks=3))(jnp.asarray(paths))
    smallest_leaf = min(x.size for x in jax.tree.leaves(pool.layers) if x.ndim == 3)
    for data, fsdp, split in ((2, 4, "paths"), (4, 2, "examples")):
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp))
        score = make_sharded_paths_scorer(CFG, shell, pool, batch, mesh, num_tasks=3, split=split)
        got = score(paths)
        for a, b in zip(want, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"{data}x{fsdp} {split}")
        if split == "paths" and data > 1:
            assert got[0].sharding.spec[0] == "data", got[0].sharding
        sizes = gathered_sizes(score.lower(paths).compile().as_text())
        assert all(s < smallest_leaf for s in sizes), (data, fsdp, "a whole pool leaf was gathered", sizes)
        print(data, fsdp, split, "ok, all-gathers:", sizes, flush=True)
    print("scoring ok")


def check_search() -> None:
    """One PPO chunk of the lower level (per-preference agents, model scorer) with the state and
    problems split over data=4 and the pool over fsdp=2 equals the single-device chunk."""
    from hm3jax.search.lower import build_search, make_lower_train, make_model_scorer
    from hm3jax.search.sharded import place_search
    from hm3jax.settings import old_agent, old_env, old_lower, old_ppo

    pool, _, batch = _pool_and_batch()
    k = 2
    models = [{"layers": jax.tree.map(lambda x, i=i: x[i * 3:(i + 1) * 3], pool.layers), **_shell(i)}
              for i in range(3)]
    models.append(jax.tree.map(lambda x: x * 1.01, models[0]))  # 2 experts + 2 merged (one per preference)
    batch = batch._replace(task_id=batch.task_id % k)
    lc = old_lower(env=old_env(search_minibatch=4), agent=old_agent(embed_dim=8, hidden_dim=16, mlp_dim=16),
                   ppo=old_ppo(num_envs=4, minibatches=1, iterations=1, chunk_iterations=1),
                   objective="loglik", score_chunk=4)
    prefs = np.asarray([[0.8, 0.2], [0.3, 0.7]], np.float32)
    data, problems, layout = build_search(CFG, models[:k], models[k:], batch, prefs, np.zeros(k), lc)
    trainer = make_lower_train(lc, layout, make_model_scorer(CFG, k, lc))
    key = jax.random.key(0)
    want_state, want = trainer.chunk(trainer.init(key, problems), problems, data)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    state, problems, data = place_search(mesh, trainer.init(key, problems), problems, data)
    got_state, got = trainer.chunk(state, problems, data)
    assert jax.tree.leaves(got_state)[0].sharding.spec[0] == "data", jax.tree.leaves(got_state)[0].sharding
    np.testing.assert_allclose(np.asarray(want.reward), np.asarray(got.reward), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(want_state), jax.tree.leaves(got_state)):
        np.testing.assert_allclose(np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64),
                                   rtol=1e-4, atol=1e-5)
    print("search ok")


def _shell(seed: int) -> dict:
    from hm3jax.models.decoder import init_params
    from hm3jax.models.pool import shell_of

    return shell_of(init_params(CFG, jax.random.PRNGKey(seed)))


def check_io(tmp: str) -> None:
    from hm3jax.io import load_pretrained, save_pretrained
    from hm3jax.io.sharded import load_sharded, save_sharded
    from hm3jax.models.decoder import init_params

    params = init_params(CFG, jax.random.PRNGKey(0))
    src = os.path.join(tmp, "src")
    save_pretrained(src, CFG, params, max_shard_size=20_000)  # several shards + an index
    _, want = load_pretrained(src)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    stats = {}
    cfg, got = load_sharded(src, mesh, stats=stats)
    assert cfg.num_hidden_layers == CFG.num_hidden_layers
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)
    up = got["layers"]["mlp"]["up_proj"]["weight"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp"), up.sharding
    assert stats["largest_host_buffer"] <= up.nbytes // 4, stats  # one device's slice, never a leaf
    _, bf = load_sharded(src, mesh, dtype="bfloat16")
    assert bf["norm"]["weight"].dtype == jnp.bfloat16
    out = save_sharded(os.path.join(tmp, "out"), cfg, got)
    _, back = load_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, back)
    print("io ok")


def check_multihost(pid: int, tmp: str, port: str) -> None:
    """One of two processes (4 fake devices each): the mesh spans both, each loads only its own
    devices' slices, and save_sharded gathers across processes while process 0 alone writes."""
    from hm3jax.io.sharded import load_sharded, save_sharded

    mesh = make_mesh(MeshConfig(fsdp=-1, distributed=True, coordinator_address=f"localhost:{port}",
                                num_processes=2, process_id=pid))
    assert jax.process_count() == 2 and mesh.devices.size == 8 and jax.local_device_count() == 4
    stats: dict = {}
    cfg, params = load_sharded(os.path.join(tmp, "src"), mesh, stats=stats)
    up = params["layers"]["mlp"]["up_proj"]["weight"]
    assert not up.is_fully_addressable and len(up.addressable_shards) == 4
    assert stats["largest_host_buffer"] <= up.nbytes // 8
    out = save_sharded(os.path.join(tmp, "out"), cfg, params)
    assert (out is not None) == (pid == 0), out
    merged, em, ll = multihost_merge_and_score(cfg, params, mesh)
    local = lambda x: np.asarray(x.addressable_shards[0].data)  # replicated: every process has it all
    print("merge digest", json.dumps(local(merged).tolist()), flush=True)
    print("path scores", json.dumps([local(em).tolist(), local(ll).tolist()]), flush=True)
    print(f"multihost {pid} ok", flush=True)


PATHS = np.array([[0, 1], [2, 3], [1, -1], [3, 0]], np.int32)  # pool: the base's 2 layers, then the merge's


def multihost_merge_and_score(cfg, params, mesh=None):
    """A TIES merge of `params` with a moved copy of itself and the scores of PATHS through the pool
    (base + merge) on a fixed batch: (per-leaf sums of the merge [n_leaves], exact match [4], loglik
    [4]), the same numbers on one process (mesh None) as on a mesh that spans processes."""
    from hm3jax.merging import METHODS
    from hm3jax.merging.sharded import merge_sharded
    from hm3jax.models.pool import build_pool, shell_of
    from hm3jax.objectives.batch import Batch

    expert = jax.jit(lambda t: jax.tree.map(lambda x: x * 1.5 + 0.01, t))(params)  # keeps the shardings
    w = np.array([0.7])
    if mesh is None:
        merged = METHODS["ties"].merge(params, [expert], w, density=0.5)
    else:
        merged = merge_sharded("ties", params, [expert], w, shardings=param_shardings(params, mesh, None),
                               density=0.5)
    digest = jax.jit(lambda t: jnp.stack([jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(t)]))(merged)
    rng = np.random.default_rng(0)
    n, s = 4, 10
    batch = Batch(rng.integers(0, cfg.vocab_size, (n, s)).astype(np.int32), np.ones((n, s), np.int32),
                  np.arange(s)[None].repeat(n, 0) >= 5, np.zeros(n, np.int32))
    pool = build_pool([params, merged])
    if mesh is None:
        from hm3jax.objectives.scoring import make_path_scorer

        em, ll = jax.vmap(make_path_scorer(cfg, shell_of(params), pool, batch))(jnp.asarray(PATHS))
    else:
        from hm3jax.objectives.sharded_scoring import make_sharded_paths_scorer

        em, ll = make_sharded_paths_scorer(cfg, shell_of(params), pool, batch, mesh)(PATHS)
    return digest, em, ll


if __name__ == "__main__":
    check = sys.argv[1]
    if check == "multihost":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        check_multihost(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        sys.exit(0)
    assert len(jax.devices()) == 8, jax.devices()
    {"merges": check_merges, "scoring": check_scoring, "search": check_search}.get(check, lambda: check_io(sys.argv[2]))()
