"""pytest plugin for transformers' own model test suites: force grape's experts, prove it ran.

Loaded by ``run_suites.py`` (``-p grape_suite_plugin``) into a pytest run of transformers'
test files, in both modes the runner compares:

- ``GRAPE_SUITE_MODE=default``: nothing is changed; experts calls are only counted, so both
  runs carry the same instrumentation.
- ``GRAPE_SUITE_MODE=grape``: every model built without an explicit experts implementation
  gets ``"grape"`` (transformers' own default is ``grouped_mm``): the plugin wraps
  ``PreTrainedModel.get_correct_experts_implementation``, the one place transformers
  resolves a missing request, so models built by ``model_class(config)``, ``from_pretrained``
  and ``from_config`` alike are covered. Explicit requests (a test comparing ``eager`` with
  ``grouped_mm``, say) are honoured and recorded.

"Proved taken": every experts dispatch of transformers (``ExpertsInterface.get_interface``,
called on each experts forward) is counted per implementation, and so is every call that
reaches a grape kernel. In grape mode a test that ran experts through another implementation
without asking for one fails with the counts (the forcing missed a path). Dispatches inside
a ``torch.compile`` trace are not counted (counting there would make the compiled graph depend
on the counter); the eager parts of those tests are.

``GRAPE_SUITE_HIDDEN_ACT`` (both modes alike) sets the activation of the suites' tiny models
(``model_tester.hidden_act`` after each test's ``setUp``). As shipped, four of the seven suites
(Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2) build GELU experts, which grape's kernels do not
fuse: their grape runs take transformers' path on every call and test the forcing, not the
kernels. ``silu`` makes them exercise the kernels; it is a variant of the suites, reported as such.

``GRAPE_SUITE_BACKEND`` (default ``auto``) names the grape experts backend the ``"grape"``
implementation uses, by raising that backend's CPU priority in grape's registry (``triton``
runs on the CPU under ``TRITON_INTERPRET=1``). ``GRAPE_SUITE_COUNTS`` names a JSON file that
receives the per-test counts at the end of the session. ``GRAPE_SUITE_TESTING_UTILS`` names a
JSON object of constants to add to ``transformers.testing_utils`` where the installed version
lacks them (the runner's bridge for an older checkout; see ``run_suites.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import pytest
import torch

import grape_kernels  # noqa: F401  (registers "grape" in transformers' ExpertsInterface)
from grape_kernels import backends as grape_backends
from grape_kernels.integration import EXPERTS_IMPLEMENTATION

MODE = os.environ.get("GRAPE_SUITE_MODE", "grape")
BACKEND = os.environ.get("GRAPE_SUITE_BACKEND", "auto")
HIDDEN_ACT = os.environ.get("GRAPE_SUITE_HIDDEN_ACT")
if MODE not in ("default", "grape"):
    raise pytest.UsageError(f"GRAPE_SUITE_MODE must be 'default' or 'grape', got {MODE!r}")


@dataclasses.dataclass
class _TestRecord:
    dispatch: Counter = dataclasses.field(default_factory=Counter)  # experts forwards per implementation
    kernels: Counter = dataclasses.field(default_factory=Counter)  # calls reaching a grape kernel, per backend
    explicit: set = dataclasses.field(default_factory=set)  # implementations the test asked for

    def as_json(self) -> dict:
        return {"dispatch": dict(self.dispatch), "kernels": dict(self.kernels), "explicit": sorted(self.explicit)}


_current = _TestRecord()
_records: dict[str, dict] = {}


def _count(counter: Counter, key: str) -> None:
    if not torch.compiler.is_compiling():
        counter[key] += 1


def _install_dispatch_counter() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    get_interface = ALL_EXPERTS_FUNCTIONS.get_interface

    def counted(key, default):
        _count(_current.dispatch, key or "eager")
        return get_interface(key, default)

    ALL_EXPERTS_FUNCTIONS.get_interface = counted


def _install_forcing() -> None:
    from transformers import PreTrainedModel

    resolve = PreTrainedModel.get_correct_experts_implementation

    def forced(self, requested_experts):
        if requested_experts is None:
            return EXPERTS_IMPLEMENTATION
        if requested_experts != EXPERTS_IMPLEMENTATION:
            _current.explicit.add(requested_experts)
        return resolve(self, requested_experts)

    PreTrainedModel.get_correct_experts_implementation = forced


def _install_kernel_counter() -> None:
    """Count calls into grape's experts backends by re-registering each with a counting loader."""
    for name in grape_backends.backend_names("experts"):
        backend = grape_backends.get_backend(name)

        def load(_load=backend.load, _name=name):
            fn = _load()

            def counted(*args, **kwargs):
                _count(_current.kernels, _name)
                return fn(*args, **kwargs)

            return counted

        priority = dict(backend.priority)
        if name == BACKEND:
            priority["cpu"] = max(priority.values(), default=0) + 100
        grape_backends.register_backend(dataclasses.replace(backend, load=load, priority=priority))


def _install_testing_utils_bridge() -> None:
    path = os.environ.get("GRAPE_SUITE_TESTING_UTILS")
    if not path:
        return
    import transformers.testing_utils as testing_utils

    with open(path, encoding="utf-8") as handle:
        for name, value in json.load(handle).items():
            if not hasattr(testing_utils, name):
                setattr(testing_utils, name, value)


_install_testing_utils_bridge()
_install_dispatch_counter()
_install_kernel_counter()
if MODE == "grape":
    _install_forcing()


def pytest_collection_modifyitems(items):
    if HIDDEN_ACT is None:
        return
    for cls in {item.cls for item in items if item.cls is not None and hasattr(item.cls, "setUp")}:
        if getattr(cls.setUp, "_grape_hidden_act", False):
            continue
        set_up = cls.setUp

        def setUp(self, _set_up=set_up):
            _set_up(self)
            tester = getattr(self, "model_tester", None)
            if tester is not None and hasattr(tester, "hidden_act"):
                tester.hidden_act = HIDDEN_ACT

        setUp._grape_hidden_act = True
        cls.setUp = setUp


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    global _current
    _current = _TestRecord()
    try:
        result = yield
    finally:
        record, _current = _current, _TestRecord()
        _records[item.nodeid] = record.as_json()
    others = {impl: n for impl, n in record.dispatch.items() if impl != EXPERTS_IMPLEMENTATION}
    if MODE == "grape" and others and not record.explicit:
        # Raised from the wrapper after a passing call, this fails the test that ran the wrong path.
        raise AssertionError(
            f"grape was forced but experts ran {others} without the test asking for another "
            f"implementation (grape dispatches: {record.dispatch.get(EXPERTS_IMPLEMENTATION, 0)})"
        )
    return result


def pytest_sessionfinish(session):
    path = os.environ.get("GRAPE_SUITE_COUNTS")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"mode": MODE, "backend": BACKEND, "tests": _records}, handle, indent=1, sort_keys=True)
