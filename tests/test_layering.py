"""Imports flow one way (DESIGN.md, Layout), checked on the source with ``ast``.

* ``analysis`` imports nothing of ``data``, ``editors`` or ``app``; ``data`` may use
  ``analysis``; ``editors`` use ``analysis`` and ``data``; ``app`` uses all.
* No editor module imports another editor module. Editor modules are the files
  of ``editors/`` that are not shared infrastructure (:data:`INFRASTRUCTURE`);
  what two editors share gets a module of its own and a place in that list.
* No ``streamlit`` import outside ``app/`` (the tests drive the app through
  ``streamlit.testing`` and are not checked); no ``torch`` import in ``app/``.

Every import counts: ``import x``, ``from x import y`` (also relative, also
``from editors import memit``), imports inside functions, and
``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]

#: The layers, lowest first, and what each may import of the project.
ALLOWED: dict[str, set[str]] = {
    "analysis": {"analysis"},
    "data": {"analysis", "data"},
    "editors": {"analysis", "data", "editors"},
    "app": {"analysis", "data", "editors", "app"},
}
#: Checked for the Streamlit rule too (benchmark scripts may use every layer).
OTHER_SOURCE = ("bench",)
#: Modules of ``editors/`` that editors share; every other module of ``editors/`` is an editor.
INFRASTRUCTURE = frozenset({
    "__init__", "requests", "hparams", "edit", "apply", "subjects", "base",   # the engine
    "evaluate", "answers", "metrics", "eval_folders", "tables",               # evaluation
    "rows", "contexts",                                                       # shared by LU-LAFNs and ROME/MEMIT
    "keyvalue",                                                               # shared by the key-value editors
    "prompting",                                                              # the engine's in-context edits
    "sequential", "sequential_run",                                           # streams of batches (LangEdit)
    "compare", "overlap",                                                     # every editor on one fact, and why
})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts)


def imported_names(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file; ``from m import a`` gives ``m`` and ``m.a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = module_name(path, root).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    package = package[:-1] if package and package[-1] == "__init__" else package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module:
                yield node.lineno, module
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{module}.{alias.name}" if module else alias.name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def layering_violations(root: Path) -> list[str]:
    """Every import in ``root``'s packages that breaks a rule of the module docstring, as ``file:line: why``
    (one line per rule and import statement)."""
    found: dict[tuple[str, int, str], str] = {}
    for top in (*ALLOWED, *OTHER_SOURCE):
        for path in sorted((root / top).rglob("*.py")):
            where = path.relative_to(root).as_posix()
            stem = path.stem
            is_editor = top == "editors" and stem not in INFRASTRUCTURE
            for line, name in imported_names(path, root):
                parts = name.split(".")
                first = parts[0]
                if top in ALLOWED and first in ALLOWED and first not in ALLOWED[top]:
                    found.setdefault((where, line, "layer"), f"{where}:{line}: imports {name} ({top} may import "
                                     f"only {', '.join(sorted(ALLOWED[top]))} of the project)")
                if is_editor and first == "editors" and len(parts) > 1 and parts[1] not in INFRASTRUCTURE \
                        and parts[1] != stem:
                    found.setdefault((where, line, "editor"), f"{where}:{line}: editor module {stem} imports "
                                     f"editor module {parts[1]} (move what they share into a module of its own)")
                if top != "app" and first == "streamlit":
                    found.setdefault((where, line, "streamlit"), f"{where}:{line}: imports {name} "
                                     "(Streamlit only in app/)")
                if top == "app" and first == "torch":
                    found.setdefault((where, line, "torch"), f"{where}:{line}: imports {name} "
                                     "(no torch in app/: tensor work is the backend's)")
    return [found[key] for key in sorted(found)]


def test_the_source_follows_the_import_rules():
    violations = layering_violations(REPO)
    assert not violations, "Imports against DESIGN.md's layering:\n" + "\n".join(violations)


def test_every_layer_has_source_to_check():
    for top in (*ALLOWED, *OTHER_SOURCE):
        assert list((REPO / top).rglob("*.py")), f"no Python files under {top}/: nothing would be checked there"


def test_the_registry_names_exactly_the_editor_modules():
    """Every editor module registers itself; the registry names no module that is not written yet."""
    from editors.base import BUILTIN_EDITOR_MODULES, available_editors, get_editor

    on_disk = {p.stem for p in (REPO / "editors").glob("*.py") if p.stem not in INFRASTRUCTURE}
    assert set(BUILTIN_EDITOR_MODULES) == on_disk, (
        "a module of editors/ is an editor (in editors.base.BUILTIN_EDITOR_MODULES) or shared infrastructure "
        "(INFRASTRUCTURE in this file)")
    registered = {type(get_editor(name)).__module__ for name in available_editors()}
    assert {f"editors.{m}" for m in BUILTIN_EDITOR_MODULES} <= registered


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    _write(tmp_path, {
        "analysis/__init__.py": "",
        "analysis/stats.py": """
            import numpy as np
            from analysis.errors import InputError
            from . import tokens

            def flores_codes():
                from data.corpus import FLORES_CODES   # inside a function: counts
                return FLORES_CODES
            """,
        "analysis/figures.py": "import importlib\nedits = importlib.import_module('editors.base')\n",
        "data/__init__.py": "from analysis import runs\n",
        "data/flores.py": "import editors.edit\n",
        "editors/__init__.py": "from editors.base import get_editor\n",
        "editors/contexts.py": "from analysis.neurons import forward_inputs\nfrom data.corpus import LANGUAGES\n",
        "editors/memit.py": """
            from editors import rows, contexts
            from editors.contexts import kl_prompt
            from editors.lu_lafns import generate_prefixes
            """,
        "editors/memla.py": "from . import memit\nfrom .edit import Edit\n",
        "editors/langedit.py": "def load():\n    import streamlit as st\n    return st\n",
        "editors/evaluate.py": "from app.forms import parse_fact\n",
        "app/__init__.py": "",
        "app/main.py": "import streamlit as st\nfrom editors.base import get_editor\nfrom data import load_corpus\n",
        "app/cli.py": "import torch.nn\n",
        "app/views/edit_lab.py": "def run():\n    t = __import__('torch')\n    return t\n",
        "bench/gpu.py": "import torch\nimport streamlit\nfrom editors.memit import MEMITEditor\n",
    })
    violations = layering_violations(tmp_path)
    short = sorted({v.split(": imports")[0].split(": editor module")[0] for v in violations})
    assert short == [
        "analysis/figures.py:2", "analysis/stats.py:7", "app/cli.py:1", "app/views/edit_lab.py:2", "bench/gpu.py:2",
        "data/flores.py:1", "editors/evaluate.py:1", "editors/langedit.py:2", "editors/memit.py:4",
        "editors/memla.py:1",
    ], violations
    text = "\n".join(violations)
    assert "analysis/stats.py:7: imports data.corpus (analysis may import only analysis" in text
    assert "editor module memla imports editor module memit" in text
    assert "editor module memit imports editor module lu_lafns" in text
    assert "editors/langedit.py:2: imports streamlit (Streamlit only in app/)" in text
    assert "app/cli.py:1: imports torch.nn (no torch in app/" in text
    assert "app/views/edit_lab.py:2: imports torch" in text


def test_the_checker_passes_a_tree_that_follows_the_rules(tmp_path):
    _write(tmp_path, {
        "analysis/neurons.py": "import torch\nfrom analysis.runs import versions\n",
        "data/flores.py": "from analysis.stats import FLORES\n",
        "editors/lu_lafns.py": "import torch\nfrom data.flores import statistics_texts\n"
                               "from editors.contexts import kl_prompt\n",
        "editors/base.py": "import importlib\nimportlib.import_module('editors.lu_lafns')\n",
        "app/views/atlas.py": "import streamlit as st\nfrom analysis import figures\nfrom editors import get_editor\n",
    })
    assert layering_violations(tmp_path) == []
