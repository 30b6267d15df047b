"""Hypothesis strategies shared by the fuzz tests and benchmarks/fuzz_parsers.py."""

from __future__ import annotations

import gzip
import struct

from hypothesis import strategies as st

# Keys the recipe schema knows, so random documents reach deep validation paths.
RECIPE_KEYS = [
    "name", "seed", "device", "precision", "threads", "data", "teacher", "student", "distill", "prune",
    "finetune", "evaluate", "export", "dataset", "root", "val_size", "train_limit", "test_limit", "download",
    "model", "preset", "factory", "args", "weights", "train", "baseline", "kd", "temperature", "alpha",
    "epochs", "batch_size", "optimizer", "lr", "momentum", "schedule", "sparsity", "threshold", "scope",
    "layer_types", "include", "exclude", "criterion", "structured", "schedule", "gradual_end", "distill_from", "latency", "onnx",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["cpu", "cuda", "fashion-mnist", "digits", "lenet5", "sgd", "global",
                                           "gradual", "re:(", "re:.*", "x:y", "os:system"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(RECIPE_KEYS), st.text(max_size=8)), children, max_size=6),
    ),
    max_leaves=25,
)
recipe_like = st.dictionaries(st.sampled_from(RECIPE_KEYS), documents, max_size=8)


@st.composite
def idx_bytes(draw) -> bytes:
    """Random IDX files: plausible headers with wrong sizes, random bytes, broken gzip."""
    kind = draw(st.sampled_from(["random", "header", "gzip"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    dtype = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    dims = draw(st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=5))
    body = struct.pack(">BBBB", 0, 0, dtype, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    body += draw(st.binary(max_size=64))
    if kind == "gzip":
        packed = gzip.compress(body)
        cut = draw(st.integers(0, len(packed)))
        return packed[:cut]
    return body
