"""The bad-input corpus: one entry per way a careless or hostile user breaks torchslim.

Each :class:`Case` holds the input (files written into an empty folder, then a
``torchslim`` command line or a library call run in that folder), the torchslim
error it must raise and a fragment of the message. ``run_corpus.py`` runs every
case in one subprocess; ``tests/test_bad_input_corpus.py`` checks the outcomes:
the right error, no traceback, a bounded message, within 5 s and 500 MB.

Add a case here, not a test function: the input, the error type, the fragment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: the pytest id.
        error: name of the :mod:`torchslim.errors` class expected (a subclass counts; ``A|B``
            for either), or ``argparse`` for a command line refused by its parser (exit
            status 2, the message on stderr).
        fragment: a regex the message must contain (``re.search``).
        argv: a ``torchslim`` command line, run in the case's folder.
        call: instead of ``argv``, Python source run in the case's folder with ``ts``
            (torchslim) and ``torch`` imported: a library call that must raise.
        files: written into the case's folder first (``str`` as UTF-8, ``bytes`` as is).
        setup: Python source run (untimed) before the case, e.g. to save a valid model.
        xfail: the reason, when the case shows a bug not fixed yet.
    """

    id: str
    error: str
    fragment: str
    argv: tuple[str, ...] | None = None
    call: str | None = None
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: str | None = None
    xfail: str | None = None


STUDENT = {"preset": "lenet300_100", "args": {"hidden1": 8, "hidden2": 4}}
TRAIN = {"epochs": 1, "batch_size": 64}


def recipe(stages: list[dict] | None = None, models: dict | None = None, **top) -> str:
    """A small valid v2 recipe on digits, with ``stages``/``models``/top-level keys replaced."""
    doc = {"version": 2, "name": "bad", "seed": 0, "threads": 1, "data": {"dataset": "digits", "val_fraction": 0.15},
           "models": models or {"student": STUDENT},
           "stages": stages or [{"kind": "train", "input": "student", "train": TRAIN}]}
    doc.update(top)
    return yaml.safe_dump(doc, sort_keys=False)


def with_train(**train) -> str:
    return recipe([{"kind": "train", "input": "student", "train": {**TRAIN, **train}}])


def with_prune(**method) -> str:
    return recipe([{"kind": "prune", "input": "student", "method": method}, {"kind": "evaluate", "latency": False}])


SAVE_SLIM = ("model = ts.models.create('lenet300_100', input_size=8, hidden1=8, hidden2=4)\n"
             "ts.save(model, 'model.slim', input_shape=[1, 8, 8])\n")
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
VALIDATE = ("validate", "r.yaml")
RUN = ("run", "r.yaml", "--out", "run")

CASES: list[Case] = [
    # ---- item 11/12: the recipe file itself
    Case("non_utf8_recipe", "ConfigError", "UTF-8", VALIDATE, files={"r.yaml": b"name: caf\xe9\nversion: 2\n"}),
    Case("binary_recipe", "ConfigError", "UTF-8|not a recipe|mapping", VALIDATE,
         files={"r.yaml": bytes(range(256))}),
    Case("nested_lists_100k_deep", "ConfigError", "deep|nest", VALIDATE,
         files={"r.yaml": "a: " + "[" * 100_000 + "]" * 100_000 + "\n"}),
    Case("nested_mappings_100k_deep", "ConfigError", "deep|nest", VALIDATE,
         files={"r.yaml": "a: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n"}),
    Case("alias_bomb", "ConfigError", "too large", VALIDATE, files={"r.yaml": ALIAS_BOMB}),
    Case("recipe_over_1mb", "ConfigError", "too large|at most", VALIDATE,
         files={"r.yaml": recipe() + "#" + "x" * (1 << 21) + "\n"}),
    Case("unknown_keys_400k_file", "ConfigError", "too large|unknown|at most", VALIDATE,
         files={"r.yaml": recipe() + "".join(f"k{i}: 1\n" for i in range(400_000))}),
    Case("unknown_keys_400k_library", "ConfigError", "more errors|too large",
         call="ts.pipeline.parse_recipe({**yaml.safe_load(RECIPE), **{f'k{i}': 1 for i in range(400_000)}})"),
    Case("empty_recipe", "ConfigError", "empty|mapping|version|stages", VALIDATE, files={"r.yaml": ""}),
    Case("recipe_is_a_list", "ConfigError", "mapping", VALIDATE, files={"r.yaml": "- 1\n- 2\n"}),
    Case("recipe_missing", "ConfigError|OSError", "r.yaml", VALIDATE),
    # ---- item 13: strict values
    Case("epochs_true", "ConfigError", "epochs", VALIDATE, files={"r.yaml": with_train(epochs=True)}),
    Case("epochs_string", "ConfigError", "epochs", VALIDATE, files={"r.yaml": with_train(epochs="3")}),
    Case("lr_string", "ConfigError", "lr", VALIDATE, files={"r.yaml": with_train(lr="fast")}),
    Case("sparsity_false", "ConfigError", "sparsity", VALIDATE, files={"r.yaml": with_prune(sparsity=False)}),
    Case("sparsity_yaml_no", "ConfigError", "sparsity", VALIDATE,
         files={"r.yaml": with_prune(sparsity=0.5).replace("sparsity: 0.5", "sparsity: no")}),
    Case("sparsity_above_one", "ConfigError", "sparsity", VALIDATE, files={"r.yaml": with_prune(sparsity=1.5)}),
    Case("seed_too_large", "ConfigError", "seed", RUN, files={"r.yaml": recipe(seed=2**64)}),
    Case("seed_negative", "ConfigError", "seed", VALIDATE, files={"r.yaml": recipe(seed=-1)}),
    # ---- item 10: names that refer to nothing, caught by validate without running code
    Case("unknown_preset", "ConfigError", "no_such_net", VALIDATE,
         files={"r.yaml": recipe(models={"student": {"preset": "no_such_net"}})}),
    Case("unimportable_factory_module", "ConfigError", "not importable", VALIDATE,
         files={"r.yaml": recipe(models={"student": {"factory": "no_such_module_xyz:build"}})}),
    Case("unknown_stage_kind", "ConfigError", "kind", VALIDATE,
         files={"r.yaml": recipe([{"kind": "compress", "input": "student"}])}),
    Case("stage_input_names_nothing", "ConfigError", "techer", VALIDATE,
         files={"r.yaml": recipe([{"kind": "train", "input": "techer", "train": TRAIN}])}),
    Case("stage_teacher_names_nothing", "ConfigError", "techer", VALIDATE,
         files={"r.yaml": recipe([{"kind": "distill", "input": "student", "teacher": "techer", "train": TRAIN}])}),
    Case("duplicate_stage_id", "ConfigError", "twice|duplicate|same id", VALIDATE,
         files={"r.yaml": recipe([{"kind": "train", "id": "a", "input": "student", "train": TRAIN},
                                  {"kind": "train", "id": "a", "train": TRAIN}])}),
    # ---- item 11: user factories
    Case("factory_raises", "ModelError", "mynet:build.*boom", RUN,
         files={"r.yaml": recipe(models={"student": {"factory": "mynet:build"}}),
                "mynet.py": "def build():\n    raise RuntimeError('boom')\n"}),
    Case("factory_arguments_do_not_fit", "ModelError", "mynet:build.*depth", RUN,
         files={"r.yaml": recipe(models={"student": {"factory": "mynet:build", "args": {"depth": 3}}}),
                "mynet.py": "import torch\ndef build(width=4):\n    return torch.nn.Linear(64, width)\n"}),
    Case("factory_returns_no_module", "ModelError", "not a torch.nn.Module", RUN,
         files={"r.yaml": recipe(models={"student": {"factory": "mynet:build"}}),
                "mynet.py": "def build():\n    return 42\n"}),
    Case("factory_function_missing", "ModelError|ConfigError", "mynet:nope", RUN,
         files={"r.yaml": recipe(models={"student": {"factory": "mynet:nope"}}),
                "mynet.py": "def build():\n    return None\n"}),
    Case("preset_arguments_do_not_fit", "ModelError|ConfigError", "hidden9", RUN,
         files={"r.yaml": recipe(models={"student": {"preset": "lenet300_100", "args": {"hidden9": 3}}})}),
    # ---- item 14: names matching no layer
    Case("override_names_no_layer", "ConfigError", "no_such_layer", RUN,
         files={"r.yaml": with_prune(sparsity=0.5, scope="layer", overrides={"no_such_layer": 0.5})}),
    Case("override_pattern_matches_nothing", "ConfigError", "nothing_here", RUN,
         files={"r.yaml": with_prune(sparsity=0.5, overrides={"re:nothing_here.*": 0.5})}),
    Case("include_names_no_layer", "ConfigError", "no_such_layer", RUN,
         files={"r.yaml": with_prune(sparsity=0.5, include=["no_such_layer"])}),
    Case("override_names_no_layer_library", "ConfigError", "no_such_layer",
         call="ts.prune_(ts.models.create('lenet300_100', input_size=8), "
              "ts.UnstructuredPruning(sparsity=0.5, overrides={'no_such_layer': 0.5}))"),
    Case("hint_layer_names_nothing", "ConfigError|ModelError", "no_such_layer", RUN,
         files={"r.yaml": recipe(
             [{"kind": "distill", "input": "student", "teacher": "teacher", "train": TRAIN,
               "objective": {"hints": {"layers": {"no_such_layer": "classifier.0"}}}}],
             models={"student": STUDENT, "teacher": STUDENT})}),
    # ---- item 15 and friends: model files
    Case("batch_sizes_huge", "argparse", "batch size from 1 to 65536",
         ("profile", "model.slim", "--batch-sizes", "1", "100000000"), setup=SAVE_SLIM),
    Case("batch_sizes_zero", "argparse", "batch size from 1 to 65536", ("profile", "model.slim", "--batch-sizes", "0"),
         setup=SAVE_SLIM),
    Case("batch_sizes_not_a_number", "argparse", "batch size", ("profile", "model.slim", "--batch-sizes", "lots"),
         setup=SAVE_SLIM),
    Case("input_shape_does_not_fit", "ModelError", r"3, 5, 5", ("profile", "bad_shape.slim"),
         setup="model = ts.models.create('lenet300_100', input_size=8, hidden1=8, hidden2=4)\n"
               "ts.save(model, 'bad_shape.slim', input_shape=[3, 5, 5])\n",
         ),
    Case("pt_file_as_slim", "ExportError|ModelError", "not a safetensors", ("profile", "model.pt"),
         setup="torch.save({'w': torch.zeros(3)}, 'model.pt')\n"),
    Case("directory_as_slim", "ExportError|ModelError", "directory", ("profile", "adir"), setup="os.mkdir('adir')\n"),
    Case("missing_slim", "ExportError|ModelError", "does not exist|no such", ("profile", "nothing.slim")),
    Case("empty_slim", "ExportError|ModelError", "empty|too short|truncated", ("profile", "e.slim"),
         files={"e.slim": b""}),
    Case("truncated_slim", "ExportError|ModelError", "truncated|corrupt|too short|checksum",
         ("profile", "t.slim"), setup=SAVE_SLIM + "data = open('model.slim', 'rb').read()\n"
                                      "open('t.slim', 'wb').write(data[:len(data) // 2])\n"),
    Case("pt_file_as_recipe_weights", "ExportError|ModelError", "not a safetensors", RUN,
         files={"r.yaml": recipe(models={"student": {**STUDENT, "weights": "model.pt"}})},
         setup="torch.save({'w': torch.zeros(3)}, 'model.pt')\n"),
    Case("directory_as_recipe_weights", "ExportError|ModelError|ConfigError", "directory", RUN,
         files={"r.yaml": recipe(models={"student": {**STUDENT, "weights": "adir"}})}, setup="os.mkdir('adir')\n"),
    # ---- checkpoints
    Case("empty_checkpoint", "TrainingError", "empty", call="ts.train.load_checkpoint('ck.pt')",
         files={"ck.pt": b""}),
    Case("random_bytes_checkpoint", "TrainingError", "ck.pt", call="ts.train.load_checkpoint('ck.pt')",
         files={"ck.pt": bytes(range(256)) * 4}),
    Case("checkpoint_is_a_directory", "TrainingError", "ck.pt|directory", call="ts.train.load_checkpoint('ck.pt')",
         setup="os.mkdir('ck.pt')\n"),
    # ---- resume
    Case("resume_a_folder_that_is_no_run", "ConfigError|TorchSlimError", "run", ("run", "--resume", "adir"),
         setup="os.mkdir('adir')\n"),
    Case("set_names_unknown_key", "ConfigError", "nope", ("validate", "r.yaml", "--set", "nope.deeper=1"),
         files={"r.yaml": recipe()}),
]

#: The valid recipe the library cases may start from.
RECIPE = recipe()
