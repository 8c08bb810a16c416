"""Packaging: the source tree is the package.

``backends/`` lives at the top level of the repository but is the subpackage ``bpkernels.backends``:
``bpkernels/backends`` is a relative symlink to ``../backends``. So the tree imports with only the
repository root on ``sys.path`` (editors, type checkers, import-graph tools see the real structure),
setuptools finds every subpackage under ``backends/`` on its own (pyproject.toml,
``[tool.setuptools.packages.find]``), and no top-level package named ``backends`` is ever installed
(it would collide in the projects that embed us).

``test_built_distributions`` checks an sdist and a wheel built from it; it runs where
``BPK_DIST_DIR`` names the folder that holds them (ci/test.sh builds them with ``python -m build``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = ROOT / "bpkernels" / "backends"
HAVE_NUMBA = importlib.util.find_spec("numba") is not None

# Run in a child: drop setuptools' editable-install finder (if any), so that only sys.path decides
# where bpkernels comes from; import the deepest package; report each package's file.
_IMPORT_CHILD = """
import importlib, importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
names = ["bpkernels", "bpkernels.backends", "bpkernels.backends.base"]
names += ["bpkernels.backends.numba", "bpkernels.backends.numba._native"] if {numba} else []
files = {{n: importlib.import_module(n).__file__ for n in names}}
print(json.dumps({{"files": files, "stray": sorted(m for m in sys.modules if m.split(".")[0] == "backends")}}))
"""


def _child(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _json_of(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tree_packages() -> set[str]:
    """Every folder under bpkernels/ (backends/ through the symlink) that holds Python code."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(ROOT / "bpkernels", followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        if any(f.endswith(".py") for f in filenames):
            found.add(".".join(Path(dirpath).relative_to(ROOT).parts))
    return found


def _module_name(relative: Path) -> str:
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cuda_sources() -> set[str]:
    return {p.name for p in (ROOT / "backends" / "cuda").iterdir() if p.suffix in (".cu", ".cuh")}


def test_backends_is_a_relative_symlink():
    assert LINK.is_symlink(), (
        "bpkernels/backends must be the symlink ../backends (a checkout without symlinks, e.g. "
        "git's core.symlinks=false on Windows, has a text file there)")
    assert os.readlink(LINK) == os.path.join("..", "backends")
    assert (LINK / "__init__.py").resolve() == ROOT / "backends" / "__init__.py"


def test_source_tree_imports_with_nothing_installed(tmp_path):
    out = _json_of(_child(_IMPORT_CHILD.format(numba=HAVE_NUMBA), cwd=tmp_path, pythonpath=ROOT))
    for name, file in out["files"].items():
        # the repository's copy, through the symlink, not an installed one
        assert _module_name(Path(file).relative_to(ROOT)) == name, (name, file)
    assert out["stray"] == []


def test_no_top_level_backends_outside_the_repository(tmp_path):
    """In the environment the tests run in (editable install or wheel): bpkernels.backends
    imports from anywhere, a top-level ``backends`` does not."""
    code = ("import importlib.util, json, bpkernels.backends as b;"
            "print(json.dumps([b.__file__, importlib.util.find_spec('backends') is not None]))")
    proc = _child(code, cwd=tmp_path)
    if proc.returncode != 0 and "No module named 'bpkernels'" in proc.stderr:
        pytest.skip("bpkernels is not installed in this environment")
    file, top_level_backends = _json_of(proc)
    assert Path(file).parts[-3:] == ("bpkernels", "backends", "__init__.py")
    assert not top_level_backends, "a top-level `backends` package is importable"
    from importlib import metadata
    top_level = metadata.distribution("bpkernels").read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["bpkernels"]


def test_pyproject_installs_every_package_of_the_tree():
    """A subpackage added under backends/ later cannot silently go missing from a wheel."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import read_configuration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' deprecation notices about other fields
        conf = read_configuration(ROOT / "pyproject.toml", expand=True)["tool"]["setuptools"]
    packages = set(conf["packages"])
    assert packages == _tree_packages(), (
        "pyproject.toml's packages differ from the folders of Python code under bpkernels/ "
        "(a subpackage without __init__.py?)")
    assert "bpkernels.backends.numba._native" in packages
    assert not {p for p in packages if p.split(".")[0] != "bpkernels"}
    patterns = conf["package-data"]["bpkernels.backends"]
    matched = {p.name for pattern in patterns for p in (ROOT / "backends").glob(pattern)}
    assert matched == _cuda_sources() and matched


def test_each_module_is_imported_once():
    """Every module of the package is loaded under its one name, never a second time under
    another path (``backends.base`` beside ``bpkernels.backends.base`` would break isinstance).
    A copy loaded on purpose under another name (tests/cudasim's CuPy backend) is not a second
    import of the same name."""
    import bpkernels.backends.base  # noqa: F401

    assert [m for m in sys.modules if m.split(".")[0] == "backends"] == []
    roots = {ROOT / "bpkernels": ("bpkernels",), ROOT / "backends": ("bpkernels", "backends")}
    twice = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        real = Path(os.path.realpath(file))
        for root, prefix in roots.items():
            if root in real.parents:
                expected = ".".join(prefix + (_module_name(real.relative_to(root)),)).rstrip(".")
                if name != expected and name.rsplit(".", 1)[-1] == expected.rsplit(".", 1)[-1]:
                    twice.append((name, expected))
    assert twice == []


@pytest.mark.skipif(not os.environ.get("BPK_DIST_DIR"),
                    reason="BPK_DIST_DIR names no folder of built distributions (see ci/test.sh)")
def test_built_distributions(tmp_path):
    dist = Path(os.environ["BPK_DIST_DIR"])
    (wheel,) = dist.glob("bpkernels-*.whl")
    (sdist,) = dist.glob("bpkernels-*.tar.gz")
    packages = _tree_packages()
    cuda = {f"bpkernels/backends/cuda/{n}" for n in _cuda_sources()}

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "wheel")
    code = [n for n in names if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in code} == {"bpkernels"}, "a top-level package besides bpkernels"
    assert {n[:-len("/__init__.py")].replace("/", ".") for n in code
            if n.endswith("/__init__.py")} == packages
    assert cuda <= set(names)

    # The sdist holds bpkernels/backends as a folder of regular files (the symlink resolved), so a
    # wheel built from it needs no symlink support.
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}
    for package in packages:
        member = members.get(package.replace(".", "/") + "/__init__.py")
        assert member is not None and member.isfile(), package
    assert all(members[n].isfile() for n in cuda)
    assert not [n for n, m in members.items() if m.issym() or m.islnk()]

    # The wheel's contents, installed as they are (a pure-Python wheel), from outside the repo.
    out = _json_of(_child(_IMPORT_CHILD.format(numba=HAVE_NUMBA), cwd=tmp_path,
                          pythonpath=tmp_path / "wheel"))
    for file in out["files"].values():
        assert (tmp_path / "wheel") in Path(file).parents, file
    assert out["stray"] == []
    proc = _child("import backends", cwd=tmp_path, pythonpath=tmp_path / "wheel")
    assert proc.returncode != 0 and "No module named 'backends'" in proc.stderr
