"""Recipe: everything a pruning run needs, model-independent, validated in one place."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern, check_sparsity, parse_pattern
from llmprune.solvers import SOLVERS

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """A pruning recipe. Defaults are the papers' conventions (SparseGPT / Wanda: 128 × 2048 tokens of C4, seed 0)."""

    method: str = "sparsegpt"
    sparsity: float = 0.5  # fraction of each target linear's weights set to zero, in [0, 1)
    pattern: str = "unstructured"  # or N:M, e.g. 2:4 (then sparsity = 1 - N/M)
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    ignore: tuple[str, ...] = ()  # regexes on full linear names left dense
    sequential: bool = True  # one pass per block, each linear calibrated on pruned upstream outputs
    version: int = field(default=RECIPE_VERSION)

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise LlmpruneError(f"unknown method '{self.method}'; choose one of {', '.join(SOLVERS)}.")
        pattern = parse_pattern(self.pattern)
        if str(pattern) != self.pattern:
            raise LlmpruneError(f"pattern '{self.pattern}' must be written as '{pattern}'.")
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool):
            raise LlmpruneError(f"sparsity must be a number in [0, 1); got {self.sparsity!r}.")
        check_sparsity(float(self.sparsity), pattern)
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LlmpruneError(f"{name} must be a positive integer; got {value!r}.")
        if not isinstance(self.seed, int):
            raise LlmpruneError(f"seed must be an integer; got {self.seed!r}.")
        for regex in self.ignore:
            try:
                re.compile(regex)
            except re.error as exc:
                raise LlmpruneError(f"ignore pattern '{regex}' is not a valid regular expression ({exc}); fix or quote it.") from None
        if self.version != RECIPE_VERSION:
            raise LlmpruneError(f"recipe version {self.version} is not supported; this llmprune reads version {RECIPE_VERSION}.")

    @classmethod
    def create(cls, *, sparsity: float | None = None, pattern: str = "unstructured", ignore=(), **kwargs) -> "Recipe":
        """Build a recipe, filling the sparsity an N:M pattern implies and normalising the pattern's spelling."""
        parsed = parse_pattern(pattern)
        return cls(sparsity=check_sparsity(sparsity, parsed), pattern=str(parsed), ignore=tuple(ignore), **kwargs)

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ignore"] = list(self.ignore)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlmpruneError(f"unknown recipe field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}.")
        data = dict(data)
        if "ignore" in data:
            data["ignore"] = tuple(data["ignore"] or ())
        return cls(**data)
