"""Safe loading: no pickle in any load path, user code only when named."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.errors import ExportError

SRC = Path(__file__).resolve().parent.parent / "src" / "torchslim"


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            found.append(node)
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_unsafe_deserialisation_in_the_library(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n and n.split(".")[0] in {"pickle", "dill", "cloudpickle", "marshal", "shelve"}
                           for n in names), f"{path}: imports a pickle-like module"
    for call in _calls(tree, "torch.load"):
        flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert flags.get("weights_only") == "True", f"{path}:{call.lineno}: torch.load without weights_only=True"
    for name in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"):
        assert not _calls(tree, name), f"{path}: calls {name}"


def test_a_model_file_cannot_make_torchslim_import_code(tmp_path, monkeypatch):
    (tmp_path / "evil_mod.py").write_text("import torch.nn as nn\nIMPORTED = True\n"
                                          "def build():\n    return nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = torch.nn.Linear(2, 2)
    ts.save(model, tmp_path / "m.slim", spec={"factory": "evil_mod:build", "args": {}})
    sys.modules.pop("evil_mod", None)
    with pytest.raises(ExportError, match="evil_mod:build"):
        ts.load(tmp_path / "m.slim")
    assert "evil_mod" not in sys.modules
    assert isinstance(ts.load(tmp_path / "m.slim", factory="evil_mod:build"), torch.nn.Linear)
    sys.modules.pop("evil_mod", None)


def test_recipe_type_names_never_resolve_outside_torchslim():
    with pytest.raises(ts.ConfigError):
        ts.config_from_dict({"type": "subprocess.Popen", "args": ["true"]})
