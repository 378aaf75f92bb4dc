"""One pika boundary: only ``fibrpc.amqp`` and ``fibrpc.fastpath`` import pika, only
``fibrpc.fastpath`` touches pika's private names, and the check it makes at start-up
covers every private name it uses. No broker: these read the source and pika itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fibrpc import fastpath

PACKAGE = Path(fastpath.__file__).parent
#: The modules allowed to import pika.
BOUNDARY = {"amqp.py", "fastpath.py"}
#: The worker's modules: parts of one class (``fibrpc.server.Worker``), read as one
#: module, so that a part may use the names another gives the worker.
WORKER = (
    "server.py",
    "workerstate.py",
    "workerlink.py",
    "requestpath.py",
    "coalesced.py",
    "heavypath.py",
    "manners.py",
)


def _tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE / name).read_text(), filename=name)


def _worker_tree() -> ast.Module:
    """The worker's modules (``WORKER``) as one."""
    return ast.Module(body=[node for name in WORKER for node in _tree(name).body], type_ignores=[])


def _imports_pika(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            alias.name.split(".")[0] == "pika" for alias in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pika":
            return True
    return False


def _own_names(tree: ast.Module) -> set[str]:
    """Private names a module gives its own objects: its classes' methods and the
    attributes they assign to ``self``, and anything named ``_fibrpc_...`` (set by
    fibrpc on pika's objects)."""
    own: set[str] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, ast.FunctionDef):
                own.add(node.name)
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                own.add(node.attr)
    return own


def _private_attributes(tree: ast.Module) -> set[str]:
    """Every ``x._name`` a module reaches, also as ``getattr(x, "_name")`` (or
    ``hasattr``, ``setattr``), but dunders and its own names."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.add(node.args[1].value)
    own = _own_names(tree)
    return {
        name
        for name in names
        if name.startswith("_")
        and not name.startswith("__")
        and not name.startswith("_fibrpc_")
        and name not in own
    }


def test_only_the_boundary_imports_pika() -> None:
    importing = {p.name for p in PACKAGE.glob("*.py") if _imports_pika(_tree(p.name))}
    assert importing == BOUNDARY


def test_the_internals_check_names_every_private_name_the_fast_path_uses() -> None:
    used = _private_attributes(_tree("fastpath.py"))
    checked = {name for names in fastpath.INTERNALS.values() for name in names}
    assert used == checked, (
        f"used but not checked: {sorted(used - checked)}; "
        f"checked but not used: {sorted(checked - used)}"
    )


def test_this_pika_has_every_internal_the_fast_path_uses() -> None:
    assert fastpath.missing_internals() == []
    assert fastpath.usable()


def test_an_internal_pika_lacks_is_reported_by_owner_and_name() -> None:
    internals = {
        "pika.channel.Channel": ("_consumers", "_no_such_attribute"),
        "pika.no_such_module.Thing": ("_x",),
        "pika.adapters.blocking_connection.BlockingConnection": ("_impl", "_cleanup"),
    }
    assert fastpath.missing_internals(internals) == [
        "pika.channel.Channel._no_such_attribute",
        "pika.no_such_module.Thing._x",
    ]


@pytest.mark.parametrize(
    "name", ["amqp.py", "link.py", "serverlink.py", "supervisor.py", "status.py", "worker"]
)
def test_outside_the_fast_path_no_private_name_of_pika_is_reached(name: str) -> None:
    tree = _worker_tree() if name == "worker" else _tree(name)
    # namedtuple's _replace is public API, whatever its underscore says.
    assert _private_attributes(tree) - {"_replace"} == set()


@pytest.mark.parametrize("name", ["frames.py", "status.py", "urls.py", "tls.py", "logs.py"])
def test_the_pure_modules_import_no_pika(name: str) -> None:
    assert not _imports_pika(_tree(name))
