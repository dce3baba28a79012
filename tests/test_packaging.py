"""What a wheel of dit-cache holds, and what the repository's top-level folders can shadow.

A wheel holds only the packages ``pyproject.toml`` lists, so a subpackage left off works in the editable checkout
and fails after ``pip install dit-cache``. A top-level folder that is a package is importable by its bare name
whenever Python runs from the repository root (``python -m pytest`` puts it on ``sys.path``): one named like an
installed distribution's module hides that distribution from everything importing it. The kernels once lived in
``kernels/``, and transformers 5 depends on Hugging Face's ``kernels``, which diffusers imports.
"""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Every package under the folders pyproject maps, by its import name."""
    found = {}
    for package, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found[".".join([package, *relative])] = init.parent
    return found


def test_every_package_is_listed_for_the_wheel():
    folders = _package_folders()
    listed = set(SETUPTOOLS["packages"])
    assert "dit_cache.bench" in folders and "dit_cache.kernels" in folders  # the walk sees subpackages
    assert sorted(set(folders) - listed) == [], "add these to [tool.setuptools] packages in pyproject.toml"
    assert sorted(listed - set(folders)) == [], "pyproject.toml lists packages that have no folder"


def test_no_top_level_folder_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    assert "torch" in installed  # the lookup sees this environment's distributions
    top_level = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    assert "training" in top_level  # the scan sees the mapped folders
    clashes = {name: installed[name] for name in top_level - {"dit_cache"} if name in installed}
    assert clashes == {}, ("these repository folders hide the installed distributions of the same import name "
                           "when Python runs from the repository root; move or rename them")
