"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone: a fresh namespace, a temporary working directory (files it writes go
there), nothing carried over from the block before it. A block that needs what CI runners lack
(a GPU, an MPI launcher) says so in an HTML comment on the line right before its fence,
``<!-- skip: needs a CUDA GPU -->``, and is reported as skipped with that reason. Shell blocks
are not run.

Blocks run in this process, not one process each: a fresh interpreter would import NumPy,
scikit-learn and torch again for every block, several seconds each on a CI runner.
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpkernels.threads import get_num_threads, limit_threads

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(`{3,})\s*(\w*)")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    code: str
    skip: str | None   # the reason, where the markdown marks the block

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        end = i + 1
        # A fence closes on a line of at least as many backticks and nothing else.
        while end < len(lines) and not re.fullmatch(rf"{fence}`*\s*", lines[end]):
            end += 1
        if language == "python":
            marker = _SKIP.match(lines[i - 1]) if i > 0 else None
            blocks.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]
PEERS = {"torch": "torch", "jax": "jax"}  # import name -> what to pip install


def test_the_documents_have_python_blocks():
    # A fence syntax this collector misreads would otherwise pass by running nothing.
    assert len(BLOCKS) >= 5, [b.name for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    # Blank lines in front, so a traceback's line numbers are the markdown file's own.
    source = "\n" * block.line + block.code
    code = compile(source, str(block.path), "exec")
    # A block may set the process's thread count (bpk.set_num_threads): the limit_threads
    # block around it restores the count that the rest of the test session runs on.
    with limit_threads(get_num_threads()):
        try:
            exec(code, {"__name__": "__docs__"})
            failure = None
        except ModuleNotFoundError as err:
            # A peer library the block shows bpkernels working with, which no extra of
            # bpkernels installs (PyTorch, JAX): the block is the user's, skipped here.
            if (err.name or "").split(".")[0] in PEERS:
                pytest.skip(f"needs {err.name} (not a dependency of bpkernels): "
                            f"pip install {PEERS[err.name.split('.')[0]]}")
            failure = traceback.format_exc()
        except Exception:
            failure = traceback.format_exc()
    if failure is not None:
        pytest.fail(f"the python block at {block.name} failed:\n{failure}", pytrace=False)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    # GitHub's anchors: the heading in lower case, punctuation dropped, spaces as dashes.
    headings = re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_links_between_the_documents_resolve(path: Path):
    broken = []
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name}: links to nothing: {broken}"
