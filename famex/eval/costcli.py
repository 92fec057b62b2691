"""`famex cost RECIPE_OR_RUN [--json]`: the FLOPs of every stage of a recipe (planned) or of a run (done).

A recipe file is read with `famex.run.recipe.load_recipe`; the document itself — what it counts
and how, the paper's figures beside ours, the logit store's size — is `famex.eval.costdoc`'s.

What this module does not do: count anything itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.eval.costdoc import format_document, recipe_cost, run_cost

__all__ = ["cost_document", "configure_parser", "main"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RECIPE_OR_RUN", help="a recipe TOML file or a run directory (runs/<name>)")
    parser.add_argument("--json", action="store_true", help="print the cost document as JSON instead of a table")
    parser.add_argument("--teacher-preset", default=None, metavar="PRESET",
                        help="size the teacher by this preset when its files are not here (default: [teacher] preset)")


def main(args: argparse.Namespace) -> int:
    doc = cost_document(args.path, teacher_preset=args.teacher_preset)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_document(doc), end="")
    return 0


def cost_document(path, teacher_preset: str | None = None) -> dict[str, Any]:
    """The cost document of a recipe file, a loaded `famex.run.recipe.Recipe`, or a run directory
    (what ``famex cost --json`` prints).

    A `famex.eval.cost.family_cost` document — ``convention``, ``convention_6nd``, ``stages``
    [{name, kind, tokens, params, flops, flops_6nd, paper_flops?}], ``total``, ``subtotals``,
    ``reference`` — plus ``source`` (recipe / run), ``store`` (logit store size) and ``not_costed``.
    """
    if not isinstance(path, (str, Path)):  # a Recipe already loaded
        return recipe_cost(path, teacher_preset)
    p = Path(path)
    if p.is_dir():
        return run_cost(p, teacher_preset)
    if p.is_file():
        from famex.run.recipe import load_recipe

        return recipe_cost(load_recipe(p), teacher_preset)
    raise FamexError(f"{p} not found; pass a recipe (configs/*.toml) or a run directory (runs/<name>)")
