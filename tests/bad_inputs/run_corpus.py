"""Run every case of the bad-input corpus in this one process; write the outcomes as JSON.

    python tests/bad_inputs/run_corpus.py OUT.json WORK_DIR [CASE_ID ...]

One process for all cases keeps the corpus to one interpreter start and one
torch import. A command line goes through ``torchslim.cli.main.main`` exactly
as the ``torchslim`` command does (an exception escaping it would be the
traceback a user sees); its ``_cmd_*`` handlers are wrapped only to record the
type of the error they raised. Memory is bounded by the process's peak RSS
(``ru_maxrss``, which only grows): a case's growth is at most the peak after it
minus the resident size before it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

import torchslim as ts  # noqa: E402
from corpus import CASES, RECIPE  # noqa: E402

cli = importlib.import_module("torchslim.cli.main")  # the package re-exports a function named main

HANG_S = 60  # a case still running after this is recorded as hanging (the test's bound is far lower)


class Hang(BaseException):
    pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


raised: list[BaseException] = []


def _recording(handler):
    def run(args):
        try:
            return handler(args)
        except BaseException as exc:
            raised.append(exc)
            raise
    return run


def _on_alarm(signum, frame):
    raise Hang(f"still running after {HANG_S} s")


def run_case(case, folder: Path) -> dict:
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    os.chdir(folder)
    namespace = {"ts": ts, "torch": torch, "yaml": yaml, "os": os, "RECIPE": RECIPE}
    if case.setup:
        exec(case.setup, dict(namespace))
    out, err = io.StringIO(), io.StringIO()
    result = {"id": case.id, "rc": None, "error": None, "mro": [], "message": None, "traceback": None}
    raised.clear()
    rss_before = _rss_mb()
    started = time.perf_counter()
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if case.argv is not None:
                try:
                    result["rc"] = cli.main(list(case.argv))
                except SystemExit as exc:  # argparse's usage errors
                    result["rc"] = exc.code
            else:
                exec(case.call, dict(namespace))
                result["rc"] = 0
    except BaseException as exc:  # the point: record whatever escapes, never stop
        raised.append(exc)
        if case.argv is not None or not isinstance(exc, ts.TorchSlimError):
            result["traceback"] = traceback.format_exc()  # what the user would have seen
    finally:
        signal.alarm(0)
    result["seconds"] = time.perf_counter() - started
    # Cases reuse module names (mynet.py): forget the ones this case imported from its folder.
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]
    result["memory_mb"] = max(0.0, _peak_mb() - rss_before)
    if raised:
        exc = raised[-1]
        result["error"] = type(exc).__name__
        result["mro"] = [k.__name__ for k in type(exc).__mro__]
        result["message"] = str(exc)
    result["stdout"], result["stderr"] = out.getvalue()[-4000:], err.getvalue()[-4000:]
    return result


def main() -> None:
    out_path, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    wanted = set(sys.argv[3:])
    torch.set_num_threads(1)
    for name in [n for n in vars(cli) if n.startswith("_cmd_")]:  # here, not at import (pytest imports this file)
        setattr(cli, name, _recording(getattr(cli, name)))
    signal.signal(signal.SIGALRM, _on_alarm)
    results = [run_case(case, work / case.id) for case in CASES if not wanted or case.id in wanted]
    out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
