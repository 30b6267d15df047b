"""Random input never crashes the parsers with anything but torchslim's own errors."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_strategies import documents, idx_bytes, recipe_like
from torchslim.data import read_idx
from torchslim.errors import ConfigError, DataError
from torchslim.pipeline import load_recipe, parse_recipe

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(doc=st.one_of(recipe_like, documents))
def test_random_recipe_documents_raise_only_config_errors(doc):
    try:
        parse_recipe(doc)
    except ConfigError:
        pass


@FUZZ
@given(text=st.one_of(st.text(max_size=200), documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_random_recipe_files_raise_only_config_errors(text, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except ConfigError:
        pass


@FUZZ
@given(data=idx_bytes())
def test_random_idx_files_raise_only_data_errors(data, tmp_path):
    path = tmp_path / "fuzz-idx"
    path.write_bytes(data)
    try:
        read_idx(path)
    except DataError:
        pass


def test_regression_non_string_keys_found_by_the_fuzzer(tmp_path):
    import pytest

    (tmp_path / "q.yaml").write_text("?\n")  # YAML for {None: None}
    with pytest.raises(ConfigError, match="keys must be names"):
        load_recipe(tmp_path / "q.yaml")
    with pytest.raises(ConfigError, match=r"student\.model\.1: keys must be names"):
        parse_recipe({"student": {"model": {1: "x"}}})
