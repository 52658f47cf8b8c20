"""Sweep mergekit's own merge configs through mergekit 0.1.5 and `hm3jax.merge`; compare the tensors.

The configs are those of mergekit's test suite (tests/test_basic_merges.py, test_tokenizer.py,
test_chat_template.py, which build tiny Llama / Granite / GPT-2 / LLaVA checkpoints themselves) and
its examples/*.yml (their Hugging Face model ids replaced by tiny local Llama checkpoints, their
layer ranges scaled from 40 layers to 2). mergekit's tests run unchanged under pytest, with one
change: their `run_and_check_merge` also hands each config to hm3jax, as the YAML mergekit would
write for it, and compares every output tensor (and the tokenizer's vocabulary) with mergekit's (see
`compare_one` for the outcomes: LLaVA outputs are compared by mapped names, and the trimming methods'
16-bit differences are classified as cut-off ties when the float32 run of the recipe agrees).

    git clone https://github.com/arcee-ai/mergekit && (cd mergekit && git checkout v0.1.5)
    python benchmarks/mergekit_sweep.py --mergekit-repo mergekit [--out sweep.jsonl]

(`--mergekit-repo` may also be a bare git directory; its HEAD is read.) One JSON line per config:
its test, merge method, mergekit's and hm3jax's outcome, the largest difference and the share of
entries that differ, and the wall time of a second, warm run of each tool in this process. A summary
table goes to stdout. Random methods (dare_*, della*) draw different streams in torch and JAX: for
them only the keep-rate (share of entries equal to the base) is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

import numpy as np

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
TEST_FILES = ("tests/test_basic_merges.py", "tests/test_tokenizer.py", "tests/test_chat_template.py")

PLUGIN = textwrap.dedent('''
    """pytest plugin: mergekit's run_and_check_merge also runs hm3jax on the same config."""
    import json, os, sys

    sys.path.insert(0, os.environ["SWEEP_BENCH_DIR"])
    import mergekit_sweep as sweep
    import tests.common as common

    _orig = common.run_and_check_merge

    def run_and_check_merge(config, *args, validate=None, **kwargs):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        text = config.to_yaml()  # before mergekit runs: run_merge fills in fields of the config

        called = []

        def compare_then_validate(mk_out):
            called.append(mk_out)
            sweep.compare_one(test, config, text, mk_out, os.environ["SWEEP_OUT"])
            if validate is not None:
                validate(mk_out)

        try:
            return _orig(config, *args, validate=compare_then_validate, **kwargs)
        except Exception as e:
            if not called:  # mergekit itself failed before its output existed: record that
                with open(os.environ["SWEEP_OUT"], "a") as f:
                    f.write(json.dumps({"test": test, "method": config.merge_method,
                                        "mergekit": f"error: {type(e).__name__}: {e}"[:300]}) + chr(10))
            raise

    common.run_and_check_merge = run_and_check_merge
''')


def _tensors(path: str) -> dict[str, np.ndarray]:
    from hm3jax.io.safetensors_io import CheckpointReader

    r = CheckpointReader(path)
    try:
        return {n: np.array(r.get(n), dtype=np.float32) for n in r.names}
    finally:
        r.close()


def _vocab(path: str) -> dict | None:
    f = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(f):
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(f).get_vocab(with_added_tokens=True)


def _timed(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# mergekit 0.1.5 under transformers 5 names LLaVA's tensors as transformers 5 does in memory; hm3jax
# keeps the input's names (as transformers 5's save_pretrained writes them). Compared by these maps.
RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
           ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
# Methods that keep the k largest entries by some score: where scores tie at the cut-off, torch's sort
# order (unspecified) and hm3jax's (lowest index) keep different entries. 16-bit inputs tie often.
CUTOFF = ("ties", "sce", "breadcrumbs", "breadcrumbs_ties")


def _renamed(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _donor_tokenizer(recipe: dict) -> bool:
    """Whether the model mergekit copies the tokenizer from (base, else first) has tokenizer files."""
    donor = recipe.get("base_model") or (recipe.get("models") or [{}])[0].get("model")
    if donor is None and recipe.get("slices"):
        donor = recipe["slices"][0]["sources"][0]["model"]
    donor = donor.get("model", donor) if isinstance(donor, dict) else donor
    return isinstance(donor, str) and any(
        os.path.isfile(os.path.join(donor, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _diff(recipe: dict, a: dict, b: dict) -> tuple[float, float, bool]:
    """(largest difference, share of entries that differ, within the dtype's tolerance) over a's names;
    a (mergekit's) rounded to the output dtype first (it writes some 16-bit merges as float32)."""
    out = recipe.get("out_dtype") or recipe.get("dtype") or ""
    if out in ("float16", "bfloat16"):
        import ml_dtypes

        npdt = np.float16 if out == "float16" else ml_dtypes.bfloat16
        a = {n: v.astype(npdt).astype(np.float32) for n, v in a.items()}
    diffs = [np.abs(a[n] - b[n]) for n in a]
    worst = max((float(d.max()) for d in diffs if d.size), default=0.0)
    scale = max((float(np.abs(a[n]).max()) for n in a if a[n].size), default=1.0)
    frac = sum(int((d > 0).sum()) for d in diffs) / max(1, sum(d.size for d in diffs))
    tol = {"float16": 2.0**-10, "bfloat16": 2.0**-7}.get(recipe.get("dtype") or "", 1e-6)
    return worst, frac, worst <= max(1e-5, tol * scale)


def _float32_same(recipe: dict, tmp: str) -> bool:
    """Both tools on the recipe at dtype float32 (where magnitudes rarely tie): the same tensors?"""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from hm3jax.merging.stream import merge_recipe

    r32 = {k: v for k, v in recipe.items() if k != "out_dtype"} | {"dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(r32), out_path=os.path.join(tmp, "mk32"),
              options=MergeOptions(copy_tokenizer=False))
    merge_recipe(r32, os.path.join(tmp, "h32"), progress=False, copy_tokenizer=False)
    a, b = _tensors(os.path.join(tmp, "mk32")), _tensors(os.path.join(tmp, "h32"))
    if set(a) != set(b):  # LLaVA: mergekit's tensors, by mapped names (see compare_one)
        b = {_renamed(n): v for n, v in b.items()}
    return set(a) <= set(b) and _diff(r32, a, {n: b[n] for n in a})[2]


def compare_one(test: str, config, text: str, mk_out: str, out_file: str) -> dict:
    """Run hm3jax on `text` (the YAML of `config`, a mergekit MergeConfiguration, written before
    mergekit ran it), compare with mergekit's output at `mk_out`, time a warm second run of each
    tool, append the record to `out_file`.

    Outcomes: "same"; "same (renamed ...)": equal on every tensor mergekit writes, hm3jax's LLaVA
    names mapped (RENAMES), mergekit's output lacking the rest; "differs only at cut-off ties": a
    CUTOFF method whose float32 run of the same recipe is the same in both tools (frac_differ says how
    many entries differ); "ran (random method)"; "differs ..."; "error: ..."."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from hm3jax.merging.stream import merge_recipe

    recipe = yaml.safe_load(text)
    method = recipe.get("merge_method")
    rec: dict = {"test": test, "method": method, "dtype": recipe.get("dtype"), "mergekit": "ok"}
    tmp = tempfile.mkdtemp(prefix="sweep-")
    try:
        ours = os.path.join(tmp, "hm3jax")
        try:
            merge_recipe(recipe, ours, progress=False)
        except Exception as e:
            rec["hm3jax"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return rec
        a, b = _tensors(mk_out), _tensors(ours)
        note = ""
        if set(a) != set(b) and set(a) <= {_renamed(n) for n in b}:
            b = {_renamed(n): v for n, v in b.items()}
            lacking = sorted(set(b) - set(a))
            note = (f" (renamed: hm3jax keeps the input's names; mergekit's output lacks {len(lacking)} "
                    f"of the {len(b)} tensors: {lacking[:2]}...)" if lacking else " (renamed)")
            b = {n: b[n] for n in a}
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        shapes = [n for n in set(a) & set(b) if a[n].shape != b[n].shape]
        if missing or extra or shapes:
            rec["hm3jax"] = (f"differs: missing {missing[:3]}, extra {extra[:3]}, shapes {shapes[:3]}")
            return rec
        if method in RANDOM:
            rec["hm3jax"] = "ran (random method)" + note
        else:
            worst, frac, same = _diff(recipe, a, b)
            rec.update(max_abs=worst, frac_differ=frac)
            rec["hm3jax"] = "same" + note if same else "differs"
            if not same and method in CUTOFF and _float32_same(recipe, tmp):
                rec["hm3jax"] = "differs only at cut-off ties (same in float32)"
        va, vb = _vocab(mk_out), _vocab(ours)
        if va is not None and va != vb:
            if vb is None and not _donor_tokenizer(recipe):
                rec["tokenizer"] = (f"mergekit wrote a {len(va)}-token placeholder tokenizer for an input "
                                    "without one; hm3jax writes none")
            else:
                rec["hm3jax"] = "differs (tokenizer vocabulary)"
        again = MergeConfiguration.model_validate(recipe)
        rec["t_mergekit"] = _timed(lambda: run_merge(again, out_path=os.path.join(tmp, "mk2"),
                                                     options=MergeOptions()))
        rec["t_hm3jax"] = _timed(lambda: merge_recipe(recipe, os.path.join(tmp, "h2"), progress=False))
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with open(out_file, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _extract(repo: str, dest: str) -> None:
    """tests/ and examples/ of a mergekit checkout (or bare git directory, at HEAD) into dest."""
    if os.path.isdir(os.path.join(repo, "tests")):
        for d in ("tests", "examples"):
            shutil.copytree(os.path.join(repo, d), os.path.join(dest, d))
        return
    tar = os.path.join(dest, "src.tar")
    subprocess.run(["git", "--git-dir", repo, "archive", "-o", tar, "HEAD", "tests", "examples"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    os.remove(tar)


def _examples(work: str, out_file: str) -> None:
    """examples/*.yml on tiny local Llama checkpoints (HF ids mapped in order of appearance)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    sys.path.insert(0, work)
    from tests.common import make_picollama

    models: dict[str, str] = {}

    def local(name):
        if name not in models:
            models[name] = make_picollama(os.path.join(work, "models", f"m{len(models)}"))
        return models[name]

    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k in ("model", "base_model") and isinstance(v, str):
                    out[k] = local(v)
                elif k == "layer_range":
                    lo, hi = (round(x * 2 / 40) for x in v)
                    out[k] = [min(lo, 1), max(hi, min(lo, 1) + 1)]
                else:
                    out[k] = rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        return node

    for name in sorted(os.listdir(os.path.join(work, "examples"))):
        if not name.endswith((".yml", ".yaml")):
            continue
        with open(os.path.join(work, "examples", name)) as f:
            cfg = MergeConfiguration.model_validate(rewrite(yaml.safe_load(f)))
        text = cfg.to_yaml()
        mk = os.path.join(work, "mk-" + name)
        try:
            run_merge(cfg, out_path=mk, options=MergeOptions())
        except Exception as e:
            with open(out_file, "a") as f:
                f.write(json.dumps({"test": f"examples/{name}", "method": cfg.merge_method,
                                    "mergekit": f"error: {e}"}) + "\n")
            continue
        compare_one(f"examples/{name}", cfg, text, mk, out_file)


def _summary(out_file: str) -> None:
    with open(out_file) as f:
        recs = [json.loads(line) for line in f]
    ran = [r for r in recs if r["mergekit"] == "ok"]
    ok = [r for r in ran if r.get("hm3jax", "").startswith(("same", "ran"))]
    ties = [r for r in ran if r.get("hm3jax", "").startswith("differs only at cut-off ties")]
    renamed = [r for r in ok if "(renamed" in r["hm3jax"]]
    print(f"\n{len(recs)} configs; mergekit ran {len(ran)}; hm3jax ran {len(ok)} of those with the same "
          f"tensors ({sum(r['hm3jax'].startswith('same') for r in ok)} compared, "
          f"{sum(r['hm3jax'].startswith('ran') for r in ok)} random methods; {len(renamed)} of them by mapped "
          f"LLaVA names), and "
          f"{len(ties)} more that differ only at cut-off ties (documented)")
    for r in ties:
        print(f"  {r['test']}: cut-off ties only: {r['frac_differ']:.4%} of entries differ, max {r['max_abs']:.3g}")
    for r in renamed[:1]:
        print(f"  e.g. {r['test']}: {r['hm3jax']}")
    for r in recs:
        if "tokenizer" in r:
            print(f"  {r['test']}: {r['tokenizer']}")
    for r in recs:
        if r not in ok and r not in ties:
            print(f"  {r['test']}: mergekit {r['mergekit']}; hm3jax {r.get('hm3jax')}")
    t = [(r["t_mergekit"], r["t_hm3jax"]) for r in ok if "t_hm3jax" in r]
    if t:
        mk, ours = np.array(t).T
        print(f"warm wall time per config: mergekit median {np.median(mk):.3f} s, hm3jax median "
              f"{np.median(ours):.3f} s; median ratio mergekit/hm3jax {np.median(mk / ours):.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit-repo", required=True, help="a mergekit checkout or bare git directory (v0.1.5)")
    p.add_argument("--out", default="mergekit_sweep.jsonl", help="JSON lines written here (replaced)")
    p.add_argument("--skip-examples", action="store_true")
    p.add_argument("-k", dest="select", help="only mergekit tests matching this pytest -k expression")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        os.remove(out)
    with tempfile.TemporaryDirectory(prefix="mergekit-sweep-") as work:
        _extract(os.path.abspath(args.mergekit_repo), work)
        with open(os.path.join(work, "conftest.py"), "w") as f:
            f.write(PLUGIN)
        env = dict(os.environ, SWEEP_OUT=out, SWEEP_BENCH_DIR=os.path.dirname(os.path.abspath(__file__)))
        select = ["-k", args.select] if args.select else []
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, *TEST_FILES],
                       cwd=work, env=env, check=False)
        if not args.skip_examples:
            _examples(work, out)
    _summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
