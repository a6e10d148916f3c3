"""Recipe: everything a pruning run needs, model-independent, validated in one place; YAML in and out."""
from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern, check_sparsity, parse_pattern
from llmprune.quant import OBSERVERS, SCHEMES, parse_scheme
from llmprune.solvers import SOLVERS, needs_data

RECIPE_VERSION = 1
AUTO_PASSES = 6  # descent passes after pruning where quant_passes is auto (the comment on quant_passes)
ALLOCATIONS = ("uniform", "owl")
REFINERS = ("none", "dsnot")
ALPS_BUDGETS = ("layer", "row")
ADMM_METHODS = ("alps", "admm")  # the solvers that take alps_budget
ACTORDERS = ("auto", "on", "off")
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class Recipe:
    """A pruning recipe. Defaults are the papers' conventions (SparseGPT / Wanda: 128 × 2048 tokens of C4,
    seed 0; OWL: M = 5, λ = 0.08; DSnoT: 50 cycles, threshold 0.1)."""

    method: str = "sparsegpt"
    sparsity: float = 0.5  # fraction of each target linear's weights set to zero, in [0, 1)
    pattern: str = "unstructured"  # or N:M, e.g. 2:4 (then sparsity = 1 - N/M)
    allocation: str = "uniform"  # or owl: per-block sparsity from outlier ratios (Yin et al. 2024)
    owl_m: float = 5.0  # a score is an outlier above owl_m × the block's mean score
    owl_lambda: float = 0.08  # block sparsities stay within ±owl_lambda of the target
    refine: str = "none"  # or dsnot: prune-and-grow on each solver's mask (Zhang et al. 2024)
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_same_sign: bool = True  # a row stops once a swap would flip the sign of its output shift
    alps_budget: str = "layer"  # ALPS / ADMM unstructured: the kept weights are the largest of the layer, or (row) of each row
    quantize: str = "none"  # or w4a16, w8a16: the pruned weights rounded to int4/int8 by GPTQ keeping the mask
    group_size: int = 128  # quantization: inputs sharing one scale (0: one scale per output row)
    symmetric: bool = True  # quantization: zero point 0 (else a zero point per group)
    # quantization: GPTQ's columns by descending diag(H), every group's scales chosen beforehand: on, off, or auto (on
    # for GPTQ alone, where it measured better, off after pruning, where it measured worse; README "Sparse and
    # quantized against llm-compressor"); true/false read as on/off
    actorder: str = "auto"
    # quantization: a group's range shrunk where that lowers its weighted rounding error (mse: quant.clipped_qparams;
    # measured better than min/max on SmolLM2, README), or from its min and max (minmax, compressed-tensors' default)
    observer: str = "mse"
    # quantization: coordinate-descent passes over GPTQ's codes towards the weights before pruning (quant.descend_codes;
    # fewer once a pass changes nothing; 0: GPTQ's codes as they are), or auto: 6 after pruning (SmolLM2 2:4 W4 g64,
    # mean of seeds 0-4 over 2:4 alone: +5.6% at 3 passes, less at 6: README), 0 for GPTQ alone (32.37 -> 32.19 for a
    # fifth more time); a number as a string or int
    quant_passes: str = "auto"
    targets: tuple[str, ...] = ()  # regexes on full linear names to prune (empty: every linear of every block)
    ignore: tuple[str, ...] = ()  # regexes on full linear names left dense
    overrides: tuple[tuple[str, float], ...] = ()  # (regex, sparsity): the first match sets a linear's sparsity
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sequential: bool = True  # one pass per block, each linear calibrated on pruned upstream outputs
    version: int = field(default=RECIPE_VERSION)

    def __post_init__(self):
        if isinstance(self.actorder, bool):
            object.__setattr__(self, "actorder", "on" if self.actorder else "off")
        if isinstance(self.quant_passes, int) and not isinstance(self.quant_passes, bool):
            object.__setattr__(self, "quant_passes", str(self.quant_passes))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _HINTS[f.name])
            if _HINTS[f.name] is float:
                object.__setattr__(self, f.name, float(getattr(self, f.name)))  # 1 and 1.0 are one recipe
                if not math.isfinite(getattr(self, f.name)):
                    raise LlmpruneError(f"{f.name} must be a finite number; got {getattr(self, f.name)!r}.")
        if self.version != RECIPE_VERSION:
            raise LlmpruneError(f"recipe version {self.version} is not supported; this llmprune reads version {RECIPE_VERSION}.")
        if self.method not in SOLVERS:
            raise LlmpruneError(f"method: unknown method '{self.method}'; choose one of {', '.join(SOLVERS)}.")
        pattern = parse_pattern(self.pattern)
        if str(pattern) != self.pattern:
            raise LlmpruneError(f"pattern '{self.pattern}' must be written as '{pattern}'.")
        check_sparsity(float(self.sparsity), pattern)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("refine", self.refine, REFINERS)
        _choice("alps_budget", self.alps_budget, ALPS_BUDGETS)
        _choice("actorder", self.actorder, ACTORDERS)
        _choice("observer", self.observer, OBSERVERS)
        if self.alps_budget != "layer" and self.method not in ADMM_METHODS:
            raise LlmpruneError(f"alps_budget: {self.alps_budget} applies to --method alps or admm only (method is "
                                f"{self.method}); drop it or use --method alps.")
        if self.allocation == "owl" and pattern.structured:
            raise LlmpruneError(f"allocation: owl gives each block its own sparsity, which pattern {pattern} fixes at "
                                f"{1 - pattern.n / pattern.m:g}; use --pattern unstructured or --allocation uniform.")
        if self.owl_m <= 0:
            raise LlmpruneError(f"owl_m must be positive; got {self.owl_m!r} (the paper uses 5).")
        if not 0 <= self.owl_lambda < 1:
            raise LlmpruneError(f"owl_lambda must be in [0, 1); got {self.owl_lambda!r} (the paper uses 0.08).")
        if self.dsnot_cycles < 1:
            raise LlmpruneError(f"dsnot_cycles must be at least 1; got {self.dsnot_cycles!r} (the paper uses 50).")
        if self.dsnot_threshold < 0:
            raise LlmpruneError(f"dsnot_threshold must be non-negative; got {self.dsnot_threshold!r} (the paper uses 0.1).")
        _choice("quantize", self.quantize, ("none", *SCHEMES))
        if self.quant_passes != "auto" and not re.fullmatch(r"[0-9]+", self.quant_passes):
            raise LlmpruneError(f"quant_passes must be auto or a whole number of passes (0 keeps GPTQ's codes); "
                                f"got {self.quant_passes!r}.")
        if self.group_size < 0:
            raise LlmpruneError(f"group_size must be positive, or 0 for one scale per output row; got {self.group_size!r}.")
        for name in ("nsamples", "seqlen"):
            if getattr(self, name) < 1:
                raise LlmpruneError(f"{name} must be a positive integer; got {getattr(self, name)!r}.")
        for name in ("targets", "ignore"):
            for regex in getattr(self, name):
                _regex(name, regex)
        for regex, value in self.overrides:
            _regex("overrides", regex)
            if pattern.structured:
                raise LlmpruneError(f"overrides: '{regex}: {value}' sets a sparsity, which pattern {pattern} fixes; "
                                    "drop the override or use --pattern unstructured.")
            if not 0 <= value < 1:
                raise LlmpruneError(f"overrides: sparsity {value!r} for '{regex}' is outside [0, 1); pass a fraction such as 0.6.")

    @classmethod
    def create(cls, *, sparsity: float | None = None, pattern: str = "unstructured", **kwargs) -> "Recipe":
        """Build a recipe, filling the sparsity an N:M pattern implies and normalising the pattern's spelling."""
        parsed = parse_pattern(pattern)
        return cls(sparsity=check_sparsity(sparsity, parsed), pattern=str(parsed), **_coerced(kwargs))

    def override(self, **changes) -> "Recipe":
        """A copy with some fields changed (e.g. from CLI flags). Changing the pattern alone re-derives the
        sparsity an N:M pattern implies."""
        data = self.to_dict()
        if "pattern" in changes and "sparsity" not in changes:
            data["sparsity"] = None
        data.update(changes)
        return Recipe.from_dict(data, implied=True)

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def dsnot(self):
        """The DSnoT settings, or None without refinement."""
        if self.refine != "dsnot":
            return None
        from llmprune.solvers.dsnot import DSnoTConfig

        return DSnoTConfig(cycles=self.dsnot_cycles, threshold=self.dsnot_threshold, same_sign=self.dsnot_same_sign)

    @property
    def quant_scheme(self):
        """The quantization scheme (quant.QuantScheme), or None without quantization."""
        return parse_scheme(self.quantize, self.group_size, self.symmetric, self.gptq_actorder, self.observer,
                            self.descent_passes)

    @property
    def prunes(self) -> bool:
        """Whether anything is pruned (a sparsity, a pattern or a nonzero override), not GPTQ alone."""
        return self.sparsity != 0 or parse_pattern(self.pattern).structured or any(v for _, v in self.overrides)

    @property
    def gptq_actorder(self) -> bool:
        """Whether GPTQ rounds in activation order: as asked, or (auto) only where nothing is pruned."""
        if self.actorder != "auto":
            return self.actorder == "on"
        return not self.prunes

    @property
    def descent_passes(self) -> int:
        """Coordinate-descent passes after GPTQ: as asked, or (auto) AUTO_PASSES after pruning and 0 for GPTQ alone."""
        if self.quant_passes != "auto":
            return int(self.quant_passes)
        return AUTO_PASSES if self.prunes else 0

    @property
    def needs_data(self) -> bool:
        """Whether the run needs calibration inputs (GPTQ does, after any method)."""
        return needs_data(self.method, self.dsnot) or self.quantize != "none"

    @property
    def solver_options(self) -> dict:
        """Keyword arguments of the method's solver beyond its input width and device."""
        return {"budget": self.alps_budget} if self.method in ADMM_METHODS else {}

    def sparsity_override(self, name: str) -> float | None:
        for regex, value in self.overrides:
            if re.search(regex, name):
                return value
        return None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["ignore"] = list(self.ignore)
        data["overrides"] = {regex: value for regex, value in self.overrides}
        return data

    @classmethod
    def from_dict(cls, data: dict, *, implied: bool = False) -> "Recipe":
        if not isinstance(data, dict):
            raise LlmpruneError(f"a recipe is a mapping of fields to values; got {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            close = {u: _closest(u, known) for u in unknown}
            hint = "; ".join(f"'{u}' (did you mean '{c}'?)" if c else f"'{u}'" for u, c in close.items())
            raise LlmpruneError(f"unknown recipe field(s) {hint}; allowed: {', '.join(known)}.")
        if isinstance(data.get("pattern"), int) and not isinstance(data["pattern"], bool):
            raise LlmpruneError(f"pattern: {data['pattern']} is a number; YAML reads an unquoted N:M such as 2:4 in base 60 "
                                "(as 124), so quote it: pattern: \"2:4\".")
        if implied or data.get("sparsity") is None:
            return cls.create(**data)
        return cls(**_coerced(data))

    def to_yaml(self, comment: str | None = None) -> str:
        import yaml

        head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | os.PathLike, comment: str | None = None) -> None:
        Path(path).write_text(self.to_yaml(comment))


def load_recipe(spec: str | os.PathLike) -> Recipe:
    """A recipe from a YAML file, or by the name of one shipped with llmprune (e.g. 'sparsegpt-2of4')."""
    import yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        name = str(spec).removesuffix(".yaml")
        if name not in shipped:
            raise LlmpruneError(f"recipe '{spec}' is neither a file nor a shipped recipe; shipped: {', '.join(sorted(shipped))}.")
        path = shipped[name]
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmpruneError(f"recipe {path} is not valid YAML ({first}); fix the file.") from None
    try:
        return Recipe.from_dict(data if data is not None else {})
    except LlmpruneError as exc:
        raise LlmpruneError(f"recipe {path}: {exc}") from None


def shipped_recipes() -> dict[str, Path]:
    """Name → file of the recipes shipped in llmprune.recipes (the repository's recipes/ folder)."""
    from importlib import resources

    try:
        root = resources.files("llmprune.recipes")
    except ModuleNotFoundError:
        return {}
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".yaml")}


# ---- validation -----------------------------------------------------------------------------------------

_HINTS = typing.get_type_hints(Recipe)


def _check_type(name: str, value, hint) -> None:
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise LlmpruneError(f"{name} must be a list; got {value!r}.")
        args = typing.get_args(hint)
        if args[:1] == (str,):
            for item in value:
                if not isinstance(item, str):
                    raise LlmpruneError(f"{name} must be a list of strings; got {item!r} in it.")
        return
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise LlmpruneError(f"{name} must be {expected.get(hint, hint.__name__)}; got {value!r}.")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LlmpruneError(f"{name}: unknown value '{value}'; choose one of {', '.join(allowed)}.")


def _regex(name: str, regex: str) -> None:
    try:
        re.compile(regex)
    except re.error as exc:
        raise LlmpruneError(f"{name}: '{regex}' is not a valid regular expression ({exc}); fix or quote it.") from None


def _coerced(data: dict) -> dict:
    """YAML/keyword spellings of the list fields as the dataclass holds them (tuples; overrides as pairs)."""
    data = dict(data)
    for name in ("targets", "ignore"):
        if name in data:
            value = data[name]
            if value is None:
                value = ()
            elif isinstance(value, str):
                value = (value,)
            elif not isinstance(value, (list, tuple)):
                raise LlmpruneError(f"{name} must be a list of regular expressions; got {value!r}.")
            data[name] = tuple(value)
    if "overrides" in data:
        data["overrides"] = _pairs(data["overrides"])
    return data


def _pairs(overrides) -> tuple[tuple[str, float], ...]:
    if overrides is None:
        return ()
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in overrides):
        items = [tuple(p) for p in overrides]
    else:
        raise LlmpruneError(f"overrides must map linear-name regexes to sparsities, e.g. 'mlp.down_proj: 0.6'; got {overrides!r}.")
    pairs = []
    for regex, value in items:
        if not isinstance(regex, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LlmpruneError(f"overrides: '{regex}: {value!r}' must map a regex to a sparsity number such as 0.6.")
        pairs.append((regex, float(value)))
    return tuple(pairs)


def _closest(word: str, choices: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, choices, n=1)
    return match[0] if match else None

