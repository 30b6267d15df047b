"""Every case of the bad-input corpus (tests/bad_inputs/corpus.py) is refused in one bounded line.

The corpus runs in one subprocess (``tests/bad_inputs/run_corpus.py``: one
interpreter start and one torch import for all cases, about 5 s); each case is
then checked here: the expected torchslim error and message fragment, no
traceback (a command line goes through the ``torchslim`` entry point, and
nothing may escape it), a message of at most 20 lines and 2,000 characters,
within 5 s and 500 MB of resident memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs.corpus import CASES

HERE = Path(__file__).resolve().parent
MAX_SECONDS = 5.0
MAX_MEMORY_MB = 500.0
MAX_MESSAGE_CHARS, MAX_MESSAGE_LINES = 2000, 21  # the recipe's 20 error lines plus the "and N more" line


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    run = subprocess.run([sys.executable, str(HERE / "bad_inputs" / "run_corpus.py"), str(tmp / "out.json"),
                          str(tmp / "cases")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["id"]: r for r in json.loads((tmp / "out.json").read_text())}


def test_corpus_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id, marks=[pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else [])
    for case in CASES])
def test_bad_input_is_refused_in_one_bounded_line(case, outcomes):
    got = outcomes[case.id]
    assert got["traceback"] is None, got["traceback"][-1500:]
    if case.argv is not None:
        assert "Traceback" not in got["stderr"]
        assert got["rc"] == 2, (got["rc"], got["stderr"][-500:])
    if case.error == "argparse":
        assert got["error"] is None and "usage:" in got["stderr"]
        message = got["stderr"].strip().splitlines()[-1]
    else:
        assert set(case.error.split("|")) & set(got["mro"]), (got["error"], got["message"])
        message = got["message"]
        if case.argv is not None:
            assert f"torchslim: error: {message.splitlines()[0]}" in got["stderr"]  # as main() prints it
    assert re.search(case.fragment, message), message
    assert len(message) <= MAX_MESSAGE_CHARS and message.count("\n") < MAX_MESSAGE_LINES, message[:300]
    assert got["seconds"] <= MAX_SECONDS, got["seconds"]
    assert got["memory_mb"] <= MAX_MEMORY_MB, got["memory_mb"]
