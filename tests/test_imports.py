"""Importing torchslim has no side effects on the caller's process."""

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_torchslim_leaves_matplotlib_alone():
    # pyplot picks a backend and may open a GUI connection: a library must not import it
    # (plots use matplotlib.figure.Figure, imported when a plot is made).
    # The raw rcParams entry: matplotlib.get_backend() would itself resolve (and import) a backend.
    code = ("import sys, matplotlib; backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); "
            "before = backend(); import torchslim, torchslim.train, torchslim.distill, torchslim.config; "
            "print('matplotlib.pyplot' in sys.modules, backend() == before)")
    assert _run(code) == "False True"


def test_import_torchslim_keeps_the_thread_count():
    code = "import torch; n = torch.get_num_threads(); import torchslim; print(torch.get_num_threads() == n)"
    assert _run(code) == "True"
