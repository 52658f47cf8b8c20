"""The solution record: one solution of a run (a layer path under a shell, its upper-level merge,
its scores and cost) as a typed, frozen value, and its JSON form (front.json's records, recommend's
output, an export's `hm3jax_solution.json`).

    Solution(preference, upper, path, shell, search, heldout, cost, aligned=..., generated=...)
    .to_json() -> {"preference": [K floats], "upper": {"method", "density", "scale", "seed"[,
                   "key_data"]} | null, "path": [[model name, layer] | null, ...], "shell": model name,
                   "scores": {"search": [K], "heldout": [K][, "generated": [K] | null]},
                   "cost": {"layers", "parameters", "flops_per_token"} | null, "dominated": bool
                   [, "aligned": true]}
    Solution.from_json(record) -> Solution

`from_json(s.to_json()) == s`, and `from_json(r).to_json()` is `r` (same keys in the same order)
for every record hm3jax writes. No rounding happens here: report.write_front rounds the floats of
the whole front.json (rundoc.round_floats), recommend those it prints.

No JAX: recommend reads records without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hm3jax.cost import SolutionCost

# `Solution.generated` of a solution whose answers were not generated (a path that switches models
# under alignment maps, which generation does not apply): written as null.
UNSCORED: tuple[float, ...] = ()


def _floats(xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


@dataclasses.dataclass(frozen=True)
class UpperSettings:
    """The upper-level merge of a solution, enough to rebuild it.

    method: task_arithmetic | ties | dare_ties. density, scale: the merge's settings. seed: the int s
    of the key `jax.random.key(s)` of the run. key_data: the raw data of the merge's own key
    (`jax.random.key_data(key)`, for a key split off another, as run_upper does), which recommend
    uses instead of `seed`; None when the merge used `jax.random.key(seed)` itself (not written).
    A field that a record read back lacks is None.
    """

    method: str | None = None
    density: float | None = None
    scale: float | None = None
    seed: int | None = None
    key_data: tuple[int, ...] | None = None

    def __post_init__(self):
        # plain Python numbers (the stages hand over numpy and JAX scalars and arrays)
        set_ = object.__setattr__
        if self.density is not None:
            set_(self, "density", float(self.density))
        if self.scale is not None:
            set_(self, "scale", float(self.scale))
        if self.seed is not None:
            set_(self, "seed", int(self.seed))
        if self.key_data is not None:
            set_(self, "key_data", tuple(int(x) for x in np.asarray(self.key_data).reshape(-1)))

    def to_json(self) -> dict:
        return {"method": self.method, "density": self.density, "scale": self.scale, "seed": self.seed,
                **({"key_data": list(self.key_data)} if self.key_data is not None else {})}

    @classmethod
    def from_json(cls, up: Mapping[str, Any] | None) -> UpperSettings | None:
        """The settings of a record's "upper" (None for null). Keys other than the fields are not kept."""
        if up is None:
            return None
        if not isinstance(up, Mapping):
            raise ValueError(f"upper: expected a mapping or null, got {type(up).__name__}")
        return cls(**{f.name: up.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Solution:
    """One solution of a run (the module docstring gives its JSON form).

    preference: [K] λ. upper: the upper-level merge the path's "merge" layers come from, or None for
    a solution without one (a reference model, a path over the base). path: (model name, layer)
    pairs, None for a skipped step. shell: the model whose embeddings, final norm and head the path
    runs under (the merged block's name for HM3's paths). search, heldout: [K] scores on the search
    and held-out splits. cost: hm3jax.cost.path_cost of the path. aligned: the scores were measured
    with alignment maps at the path's model switches (lower.align), which an exported checkpoint
    cannot hold; the key is written only when True. generated: [K] the task scorers on generated
    answers (tasks.kind files), UNSCORED (null) for a path whose answers were not generated, None
    when the run generated none (no key). dominated: another solution of its method (for a
    reference: an HM3 solution) dominates it; report.build_front sets it.
    """

    preference: tuple[float, ...]
    upper: UpperSettings | None
    path: tuple[tuple[str, int] | None, ...]
    shell: str
    search: tuple[float, ...]
    heldout: tuple[float, ...]
    cost: SolutionCost | None = None
    aligned: bool = False
    generated: tuple[float, ...] | None = None
    dominated: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "preference", _floats(self.preference))
        set_(self, "path", tuple(None if s is None else (str(s[0]), int(s[1])) for s in self.path))
        set_(self, "shell", str(self.shell))
        set_(self, "search", _floats(self.search))
        set_(self, "heldout", _floats(self.heldout))
        if self.generated is not None:
            set_(self, "generated", _floats(self.generated))

    def to_json(self) -> dict:
        """The record as plain JSON types (floats not rounded), keys in front.json's order."""
        scores: dict[str, Any] = {"search": list(self.search), "heldout": list(self.heldout)}
        if self.generated is not None:
            scores["generated"] = list(self.generated) if self.generated != UNSCORED else None
        return {"preference": list(self.preference),
                "upper": self.upper.to_json() if self.upper is not None else None,
                "path": [None if s is None else list(s) for s in self.path], "shell": self.shell,
                "scores": scores, "cost": self.cost.to_dict() if self.cost is not None else None,
                "dominated": self.dominated, **({"aligned": True} if self.aligned else {})}

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> Solution:
        """A record in to_json's format (e.g. one of front.json's, checked by rundoc.check_solution
        when it is untrusted); ValueError naming what is missing or malformed. Keys hm3jax does not
        write are not kept."""
        try:
            scores = rec["scores"]
            generated = scores.get("generated", None)
            if "generated" in scores and generated is None:
                generated = UNSCORED
            cost = rec.get("cost")
            return cls(preference=rec["preference"], upper=UpperSettings.from_json(rec.get("upper")),
                       path=_path(rec["path"]), shell=rec["shell"], search=scores["search"],
                       heldout=scores["heldout"],
                       cost=None if cost is None else SolutionCost(**{f: cost[f] for f in SolutionCost._fields}),
                       aligned=bool(rec.get("aligned", False)), generated=generated,
                       dominated=bool(rec.get("dominated", False)))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a solution record ({type(e).__name__}: {e})") from None


def _path(path: Sequence) -> tuple:
    if isinstance(path, (str, bytes)) or not isinstance(path, Sequence):
        raise TypeError(f"path: expected a list of [model name, layer] pairs, got {type(path).__name__}")
    return tuple(None if s is None else (s[0], s[1]) for s in path)


__all__ = ["UNSCORED", "Solution", "UpperSettings"]
