"""Project hygiene: dependency lists agree, notebooks are committed clean, the package imports."""

import json
import re
import subprocess
import sys
import tomllib

import yaml

from conftest import REPO

# conda-forge names that differ from the PyPI ones
CONDA_TO_PYPI = {"pytorch": "torch"}


def _split(spec: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)$", spec)  # extras ([distributed]) dropped
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def pyproject_deps() -> dict[str, str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = meta["dependencies"] + meta["optional-dependencies"]["test"] + meta["optional-dependencies"]["cluster"]
    return dict(_split(s) for s in specs)


def conda_deps() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = {}
    for item in env["dependencies"]:
        if isinstance(item, str):
            name, spec = _split(item)
            if name in ("python", "pip"):
                continue
            deps[CONDA_TO_PYPI.get(name, name)] = spec
        elif isinstance(item, dict):  # the pip: section, for packages conda does not have
            deps.update(_split(s) for s in item.get("pip", []) if not s.startswith("-e"))
    return deps


def test_environment_yml_matches_pyproject():
    py, conda = pyproject_deps(), conda_deps()
    assert set(py) == set(conda), f"only in pyproject: {set(py) - set(conda)}; only in environment.yml: {set(conda) - set(py)}"
    assert py == conda, {k: (py[k], conda[k]) for k in py if py[k] != conda[k]}


def test_required_stack_is_declared():
    required = {"torch", "jupyterlab", "ipykernel", "papermill", "nbconvert", "matplotlib", "seaborn",
                "pandas", "scikit-learn", "pyyaml", "tqdm", "pytest"}
    assert required <= set(pyproject_deps())


def test_environment_installs_this_package():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_items = [i for i in env["dependencies"] if isinstance(i, dict)]
    assert pip_items and "-e ." in pip_items[0]["pip"]


def tracked(pattern: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_notebooks_committed_without_outputs():
    notebooks = sorted(REPO.glob("notebooks/*.ipynb"))
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
        assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts"
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters' (need exactly one)"


def test_reports_holds_only_its_readme_in_git():
    assert tracked("reports") == ["reports/README.md"]


def test_no_babi_data_in_repo():
    assert not [f for f in tracked(".") if re.search(r"qa\d+_.*_(train|test)\.txt$", f)]


def test_package_imports_without_path_hacks():
    # A fresh interpreter started outside the repo finds the package through the editable install.
    out = subprocess.run([sys.executable, "-c", "import disentangle, sys; print(disentangle.__file__)"],
                         cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("lib/disentangle/__init__.py")
