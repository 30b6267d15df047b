"""Budgeted, hardware-aware search: per-group channel widths under an accuracy or latency budget.

``torchslim.search`` is both this package and the verb (as :mod:`torchslim.distill` is):
after ``import torchslim.search``, ``ts.search(model, train, val, Budget(...))`` calls
:func:`torchslim.search.api.search`.

Every point of the returned front is an end-to-end measurement of the exported model
(ONNX Runtime by default); per-group tables only guide the allocation::

    import torchslim as ts
    from torchslim.search import Budget, SearchSpace, search
    r = search(model, splits.train, splits.val, Budget(max_drop=0.5), SearchSpace(round_to=8),
               finetune=ts.TrainConfig(epochs=1), test=splits.test, out="runs/auto")
    print(r.summary()); small = r.best

With ``trials=N`` (``pip install 'torchslim[search]'``) an Optuna study refines the front
(:mod:`torchslim.search.study`); it lives in the run folder (or ``StudyConfig(storage=URL)``),
so the same call resumes it and :func:`search_worker` processes can share its trials.

Example:
    >>> from torchslim.search import Budget
    >>> Budget(latency=0.25).describe()
    'latency <= 0.25x of the dense model (ONNX Runtime, batch 256), accuracy maximised'
"""

import inspect as _inspect
import sys as _sys
import types as _types

from torchslim.search.allocate import lagrangian_plans, pick_spread
from torchslim.search.api import InfeasibleBudget, SearchResult, choose, recipe_document, search, search_worker
from torchslim.search.budget import Budget, SearchSpace
from torchslim.search.front import Point, pareto_front, plot_front
from torchslim.search.sensitivity import Measurer, Tables, build_tables, recalibrate_bn_
from torchslim.search.space import GroupChoice, channel_groups, plan_config, uniform_plan
from torchslim.search.study import StudyConfig

__all__ = [
    "Budget", "GroupChoice", "InfeasibleBudget", "Measurer", "Point", "SearchResult", "SearchSpace", "Tables",
    "build_tables", "channel_groups", "choose", "lagrangian_plans", "pareto_front", "pick_spread", "plan_config",
    "plot_front", "recalibrate_bn_", "recipe_document", "search", "search_worker", "StudyConfig", "uniform_plan",
]


class _CallableModule(_types.ModuleType):
    """This package's class: calling it calls :func:`search` (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(search)
