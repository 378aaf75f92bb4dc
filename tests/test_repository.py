"""What the repository tracks holds for any machine: no symlink to a path of one machine
(a virtualenv of someone's checkout, say). No broker."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: git's mode of a symbolic link (``git ls-files -s``).
SYMLINK_MODE = "120000"


def _tracked_symlinks() -> dict[str, str]:
    """Each symlink git tracks in this checkout, and the target it records."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    listing = subprocess.run(
        ["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    links = {}
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, _, path = entry.partition(b"\t")
        mode, blob, _stage = meta.split(b" ")
        if mode.decode() == SYMLINK_MODE:
            target = subprocess.run(
                ["git", "cat-file", "blob", blob.decode()],
                cwd=ROOT,
                capture_output=True,
                check=True,
                timeout=30,
            ).stdout
            links[os.fsdecode(path)] = os.fsdecode(target)
    return links


def outside(link: str, target: str, root: Path = ROOT) -> bool:
    """Whether the symlink at ``link`` (relative to ``root``) points out of ``root``:
    an absolute target, or a relative one that climbs above it."""
    if os.path.isabs(target):
        return True
    resolved = os.path.normpath(os.path.join(os.path.dirname(link), target))
    return resolved == ".." or resolved.startswith(".." + os.sep)


def test_no_tracked_symlink_points_outside_the_repository() -> None:
    escaping = {link: t for link, t in _tracked_symlinks().items() if outside(link, t)}
    assert escaping == {}, f"tracked symlinks to paths of one machine: {escaping}"


@pytest.mark.parametrize(
    ("link", "target", "escapes"),
    [
        (".venv-main", "/work/main/.venv", True),
        ("docs/up", "../../elsewhere", True),
        ("docs/readme", "../README.md", False),
        ("a/b/c", "../../x", False),
        ("a/b/c", "../../../x", True),
        ("here", "..", True),
    ],
)
def test_a_link_outside_is_told_from_one_inside(link: str, target: str, escapes: bool) -> None:
    assert outside(link, target) is escapes
