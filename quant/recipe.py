"""Recipes: which GGML type each GGUF tensor gets, as ordered `regex = type` rules.

A recipe is a small TOML file (built-ins live in quant/recipes/): a `default` type for matrices,
then `[rules]` whose keys are regexes searched in the GGUF tensor name, first match wins.
`--override REGEX=TYPE` rules are tried before the recipe's. Whatever is chosen, tensors llama.cpp
keeps in F32 stay F32, and rows a block does not divide take llama-quantize's fallback type.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gguf import GGMLQuantizationType

from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError
from k2conv.quant.types import T, fit_to_row, parse_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Rule:
    pattern: str
    regex: re.Pattern[str]
    qtype: GGMLQuantizationType
    origin: str  # "override" or the recipe's name
    hits: int = 0


@dataclass
class Recipe:
    name: str
    description: str
    default: GGMLQuantizationType
    rules: list[Rule] = field(default_factory=list)
    builtin: bool = True
    ftype: str | None = None  # follow llama-quantize's per-tensor rules for this file type (e.g. "Q4_K_M")


def builtin_names() -> list[str]:
    folder = resources.files("k2conv.quant") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise K2ConvError(f"{where}: regex {pattern!r} does not compile ({exc})") from None


def parse_recipe_text(text: str, name: str, builtin: bool) -> Recipe:
    where = f"recipe {name}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise K2ConvError(f"{where}: not valid TOML ({exc})") from None
    ftype = data.get("ftype")
    if ftype is not None:
        from k2conv.quant.llama_ftypes import FTYPES

        if ftype not in FTYPES:
            raise K2ConvError(f"{where}: unknown llama-quantize ftype {ftype!r} (known: {', '.join(FTYPES)})")
        default_name = data.get("default", FTYPES[ftype].name)
    else:
        default_name = data.get("default", "")
    default = parse_type(str(default_name), f"{where}: default: ")
    rules_table = data.get("rules", {})
    if not isinstance(rules_table, dict):
        raise K2ConvError(f"{where}: [rules] must be a table of 'regex' = \"TYPE\"")
    rules = [
        Rule(pattern, _compile(pattern, where), parse_type(str(t), f"{where}: rule {pattern!r}: "), name)
        for pattern, t in rules_table.items()
    ]
    return Recipe(name, str(data.get("description", "")), default, rules, builtin, ftype)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a TOML file by path."""
    if name_or_path in builtin_names():
        text = (resources.files("k2conv.quant") / "recipes" / f"{name_or_path}.toml").read_text(encoding="utf-8")
        return parse_recipe_text(text, name_or_path, builtin=True)
    path = Path(name_or_path)
    if not path.is_file():
        raise K2ConvError(f"recipe {name_or_path!r}: not a built-in ({', '.join(builtin_names())}) nor a file")
    return parse_recipe_text(path.read_text(encoding="utf-8"), str(path), builtin=False)


def parse_overrides(specs: list[str]) -> list[Rule]:
    """`REGEX=TYPE` strings from the command line, in order (the last `=` separates the type)."""
    rules = []
    for spec in specs:
        if "=" not in spec:
            raise K2ConvError(f"--override {spec!r}: expected REGEX=TYPE")
        pattern, tname = spec.rsplit("=", 1)
        rules.append(Rule(pattern, _compile(pattern, "--override"), parse_type(tname, f"--override {spec!r}: "), "override"))
    return rules


def keeps_f32(name: str, ndim: int) -> bool:
    """llama.cpp's converter forces F32 for 1-D tensors, norms, the router and non-`.weight` tensors."""
    return ndim == 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name or not name.endswith(".weight")


def _first_match(name: str, rules: list[Rule]) -> Rule | None:
    for rule in rules:
        if rule.regex.search(name):
            rule.hits += 1
            return rule
    return None


def assign_types(
    tensors: list[tuple[str, tuple[int, ...]]],
    recipe: Recipe,
    overrides: list[Rule],
    cfg: ModelConfig,
    has_imatrix: bool = False,
) -> list[GGMLQuantizationType]:
    """The type of every GGUF tensor (name, numpy shape; last axis = ne0), in file order.

    Order of authority: F32-only tensors, then `--override`, then llama-quantize's rules when the
    recipe names an ftype, then the recipe's own rules, then its default; the row-fit fallback last.
    """
    overridden = {name: r for name, _ in tensors if (r := _first_match(name, overrides)) is not None}
    ftype_types: dict[str, GGMLQuantizationType] = {}
    if recipe.ftype is not None:
        from k2conv.quant.llama_ftypes import ftype_types as llama_types

        candidates = [(n, s) for n, s in tensors if not keeps_f32(n, len(s))]
        ftype_types = llama_types(recipe.ftype, cfg, candidates, has_imatrix, skip=set(overridden))
    out = []
    for name, shape in tensors:
        if keeps_f32(name, len(shape)):
            out.append(T.F32)
        elif name in overridden:
            out.append(fit_to_row(overridden[name].qtype, shape[-1]))
        elif name in ftype_types:
            out.append(ftype_types[name])
        else:
            rule = _first_match(name, recipe.rules)
            out.append(fit_to_row(rule.qtype if rule else recipe.default, shape[-1]))
    return out


def check_all_rules_used(recipe: Recipe, overrides: list[Rule]) -> None:
    """A user rule that matches no tensor is almost always a typo: refuse it."""
    rules = overrides if recipe.builtin else [*overrides, *recipe.rules]
    for rule in rules:
        if rule.hits == 0:
            raise K2ConvError(f"{rule.origin} rule {rule.pattern!r}={rule.qtype.name} matches no tensor")
