"""Sharded == unsharded merges on 8 fake CPU devices (run in a subprocess: the device count must be set
before JAX initialises). The threshold-search TIES trim runs on sharded tensors without gathering them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each case is a fresh interpreter with 8 fake devices

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hm3jax import merging

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))

    def params(seed, scale=1.0):
        k = jax.random.split(jax.random.PRNGKey(seed), 2)
        return {"embed_tokens": {"weight": scale * jax.random.normal(k[0], (64, 32))},
                "layers": {"mlp": {"up_proj": {"weight": scale * jax.random.normal(k[1], (2, 64, 32))}}}}

    def shard(t):  # FSDP-style: rows of every matrix split over the 8 devices
        spec = {"embed_tokens": {"weight": P("fsdp", None)},
                "layers": {"mlp": {"up_proj": {"weight": P(None, "fsdp", None)}}}}
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, spec)

    base = params(0)
    models = [jax.tree.map(lambda a, b: a + b, base, params(i, 0.05)) for i in (1, 2, 3)]
    w = jnp.array([0.5, 0.3, 0.8])
    key = jax.random.PRNGKey(3)
    runs = {
        "task_arithmetic": jax.jit(lambda b, ms, w: merging.task_arithmetic(b, ms, w)),
        "ties_search": jax.jit(lambda b, ms, w: merging.ties(b, ms, w, density=0.3, trim="search")),
        "dare_ties": jax.jit(lambda b, ms, w: merging.dare_ties(b, ms, w, key=key, density=0.4)),
    }
    sb, sms = shard(base), [shard(m) for m in models]
    for name, f in runs.items():
        ref = f(base, models, w)
        got = f(sb, sms, w)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), ref, got)
        out = got["embed_tokens"]["weight"]
        assert not out.sharding.is_fully_replicated, (name, out.sharding)
        print(name, "ok")
    # The search trim keeps the same entries as the exact sort (no ties at non-zero magnitudes here).
    exact = merging.ties(base, models, w, density=0.3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exact, runs["ties_search"](sb, sms, w))
    hlo = runs["ties_search"].lower(sb, sms, w).compile().as_text()
    assert "all-gather" not in hlo, "threshold search gathered a sharded tensor"
    print("no all-gather")
""")


def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no all-gather" in r.stdout
