"""Checks a recipe against its model before any work starts (reads config.json, never weights)."""

from __future__ import annotations

from .models import layer_widths, read_config, valid_group_sizes
from .recipe import Recipe


def group_size_problems(recipe: Recipe, config: dict) -> list[str]:
    """One message per candidate whose group size does not divide every quantized layer's width."""
    widths = layer_widths(config)
    good = valid_group_sizes(widths)
    problems = []
    for c in recipe.candidates:
        g = getattr(c, "group_size", None)
        if g is None or g == -1:
            continue
        bad = {k: w for k, w in widths.items() if w % g}
        if bad:
            shown = ", ".join(f"{k} has {w} inputs" for k, w in bad.items())
            problems.append(
                f"candidates.{c.name}.group_size: {g} does not divide the model's layer widths ({shown}); "
                f"sizes that work: {', '.join(map(str, good)) or 'none'}, or -1 (per-channel)"
            )
    return problems


def check_recipe(recipe: Recipe) -> list[str]:
    """Everything that can be checked without loading weights; empty means the recipe is runnable."""
    config = read_config(recipe.model.ref, revision=recipe.model.revision)
    return group_size_problems(recipe, config)
