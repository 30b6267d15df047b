"""Fuzz the IDX reader and the recipe loader with many generated inputs.

Prints one JSON line per parser: examples tried, expected errors (torchslim's
own DataError / ConfigError), unexpected exceptions (target: 0) and the first
few unexpected ones. Target: >= 10,000 generated inputs per parser.

    python benchmarks/fuzz_parsers.py [--examples 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzz_strategies import documents, idx_bytes, recipe_like  # noqa: E402

from torchslim.data import read_idx  # noqa: E402
from torchslim.errors import ConfigError, DataError  # noqa: E402
from torchslim.pipeline import load_recipe, parse_recipe  # noqa: E402


def fuzz(name: str, strategy, call, expected: type[Exception], examples: int) -> dict:
    stats = {"parser": name, "examples": 0, "expected_errors": 0, "accepted": 0, "unexpected": 0, "samples": []}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        stats["examples"] += 1
        try:
            call(value)
            stats["accepted"] += 1
        except expected:
            stats["expected_errors"] += 1
        except Exception as exc:  # the point: count, never stop
            stats["unexpected"] += 1
            if len(stats["samples"]) < 3:
                stats["samples"].append({"input": repr(value)[:200], "error": repr(exc),
                                         "where": traceback.format_exc().splitlines()[-3][:200]})

    started = time.perf_counter()
    run()
    stats["seconds"] = round(time.perf_counter() - started, 1)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        idx_path = Path(tmp) / "fuzz-idx"
        yaml_path = Path(tmp) / "fuzz.yaml"

        def read_bytes(data: bytes) -> None:
            idx_path.write_bytes(data)
            read_idx(idx_path)

        def read_yaml(text: str) -> None:
            yaml_path.write_text(text, encoding="utf-8")
            load_recipe(yaml_path)

        import yaml

        results = [
            fuzz("idx_reader", idx_bytes(), read_bytes, DataError, args.examples),
            fuzz("recipe_documents", st.one_of(recipe_like, documents), parse_recipe, ConfigError, args.examples),
            fuzz("recipe_files", st.one_of(st.text(max_size=300), documents.map(
                lambda d: yaml.safe_dump(d, allow_unicode=True))), read_yaml, ConfigError, args.examples),
        ]
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"summary": True, "target_examples": args.examples,
                      "pass": all(r["unexpected"] == 0 and r["examples"] >= args.examples for r in results)}))


if __name__ == "__main__":
    main()
