"""The shipped toy assets: within the repository's size budget, and each model folder says how it was made."""
from pathlib import Path

from toy.recipe import RECIPE_KEYS, read_recipe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUDGET_MB = 40  # every asset together: a clone stays small enough for CI and laptops


def _model_folders() -> list[Path]:
    """assets/toy/<name>/ (and assets/toy/vlm/<name>/): the stage-0..2 models."""
    toy = ASSETS / "toy"
    folders = [p for p in toy.iterdir() if p.is_dir() and p.name != "vlm"]
    return folders + [p for p in (toy / "vlm").iterdir() if p.is_dir()]


def test_assets_fit_the_size_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total / 2**20 <= BUDGET_MB, f"assets/ holds {total / 2**20:.1f} MiB, the budget is {BUDGET_MB}"


def test_every_model_folder_carries_its_recipe():
    for folder in _model_folders():
        recipe = read_recipe(folder)
        assert set(RECIPE_KEYS) <= set(recipe), f"{folder}: recipe.json lacks {set(RECIPE_KEYS) - set(recipe)}"
        assert recipe["wall_time_s"] >= 0 and isinstance(recipe["config"], dict)
