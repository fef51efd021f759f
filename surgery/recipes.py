"""Shipped recipes: YAML files packaged inside the wheel as `ling_surgery/recipes/*.yaml` (data, not code).

A recipe argument is a path to a YAML file or the name of a shipped recipe (with or without `.yaml`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError


def recipes_dir() -> Path:
    # The package root is the repository root in editable installs and ling_surgery/ in the wheel; recipes/ is in both.
    return Path(str(resources.files("ling_surgery") / "recipes"))


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path

    @property
    def summary(self) -> str:
        """The first header comment line: what the recipe does."""
        for line in self.path.read_text().splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
        return ""

    @property
    def launch(self) -> str:
        for line in self.path.read_text().splitlines():
            if line.lstrip("# ").lower().startswith("launch:"):
                return line.lstrip("# ").split(":", 1)[1].strip()
        return f"ling-surgery run {self.name}"


def list_recipes() -> list[ShippedRecipe]:
    return [ShippedRecipe(p.stem, p) for p in sorted(recipes_dir().glob("*.yaml"))]


def resolve_recipe(recipe: str | Path) -> Path:
    """A local YAML path, else a shipped recipe by name; a one-line error lists the shipped names."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and (recipes_dir() / f"{name}.yaml").is_file():
        return recipes_dir() / f"{name}.yaml"
    shipped = ", ".join(r.name for r in list_recipes())
    raise SurgeryError(f"recipe {str(recipe)!r} not found: not a YAML file and not a shipped recipe ({shipped})")


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy a shipped recipe to `dest` (a file, or a folder to put `<name>.yaml` in); never overwrites. `accelerate/NAME`
    copies a shipped accelerate config (`recipes/accelerate/`, e.g. `accelerate/fsdp2`)."""
    config = recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if name.startswith("accelerate/") and not config.is_file():
        shipped = ", ".join(f"accelerate/{p.stem}" for p in sorted((recipes_dir() / "accelerate").glob("*.yaml")))
        raise SurgeryError(f"{name!r} is not a shipped accelerate config ({shipped})")
    source = config if name.startswith("accelerate/") else resolve_recipe(name)
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise SurgeryError(f"{str(dest)!r} already exists; pick another destination")
    if not dest.parent.is_dir():
        raise SurgeryError(f"folder {str(dest.parent)!r} does not exist; create it or pick another destination")
    shutil.copyfile(source, dest)
    return dest
