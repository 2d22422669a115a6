"""Run transformers' own model test suites twice, as shipped and with grape's experts forced; compare.

Usage (from the repository root)::

    python tests/transformers_suites/run_suites.py --transformers-tests ~/src/transformers
    python tests/transformers_suites/run_suites.py --transformers-tests DIR --models mixtral,gpt_oss \\
        --backend triton -k "test_model or greedy" --out runs/suites-triton

``--transformers-tests`` is a transformers source checkout (it needs ``tests/`` with
``tests/models/<model>/test_modeling_<model>.py``; ``utils/test_module`` and
``src/transformers/testing_utils.py`` are used when present). The shared test files of the
*installed* transformers version (``tests/test_modeling_common.py`` and its siblings) come from
that version's source package on PyPI (downloaded once into the cache with
``pip download --no-deps --no-binary :all:``, or given with ``--sdist``) and replace the
checkout's copies, so the common tests are exactly the pinned version's.

Each suite runs in a fresh temporary directory in two pytest processes with
``grape_suite_plugin`` loaded: ``default`` (transformers' own experts implementation) and
``grape`` (``experts_implementation="grape"`` forced, the grape path counted and asserted
taken; see the plugin). Every test that passes by default must pass with grape: the report
(``<out>/transformers_suites.md`` and ``.json``) lists each one that does not, and the exit code
is 1 if there is any.

A checkout older or newer than the installed transformers may not fit it exactly. Two bridges,
reported in the output, let such a checkout still run: a module that the shared files import
and neither source has becomes one whose names skip the test that calls them, and a constant
that the checkout's tests import from ``transformers.testing_utils`` but the installed version
lacks is taken from the checkout's ``src/transformers/testing_utils.py`` (literal values only).
Tests that still cannot run fail or error in both modes and are not counted against grape.

Nothing outside ``--out`` and the cache (``$GRAPE_CACHE`` or ``~/.cache/grape``) is written.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
MODES = ("default", "grape")
#: Modules transformers' model tests import that grape does not need (``pip install grape-moe[suites]``).
TEST_REQUIREMENTS = ("parameterized", "httpx")
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class SuiteError(Exception):
    """Bad input to the runner: one line for the user, exit code 2."""


# ---- the pinned version's shared test files ----------------------------------------------------
def installed_transformers() -> tuple[str, Path]:
    import transformers

    return transformers.__version__, Path(transformers.__file__).resolve().parent


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPE_CACHE") or Path.home() / ".cache" / "grape")


def locate_sdist(version: str, given: Path | None) -> Path:
    """The transformers ``version`` source package: ``given``, the cached copy, or a fresh download."""
    if given is not None:
        if not given.is_file():
            raise SuiteError(f"--sdist {given} is not a file")
        path = given
    else:
        folder = cache_dir() / "transformers-sdist"
        path = folder / f"transformers-{version}.tar.gz"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                       f"transformers=={version}", "-d", str(folder)]
            if subprocess.run(command).returncode != 0 or not path.is_file():
                raise SuiteError(f"could not download the transformers {version} source package from PyPI "
                                 "(give a local copy with --sdist)")
    with tarfile.open(path) as archive:
        top = archive.getnames()[0].split("/")[0]
    if top != f"transformers-{version}":
        raise SuiteError(f"{path} holds {top}, but the installed transformers is {version}")
    return path


def extract_shared_tests(sdist: Path, into: Path) -> list[str]:
    """Write the sdist's ``tests/*.py`` into ``into``; returns their names."""
    names = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                (into / parts[2]).write_bytes(archive.extractfile(member).read())
                names.append(parts[2])
    if "test_modeling_common.py" not in names:
        raise SuiteError(f"{sdist} has no tests/test_modeling_common.py")
    return names


# ---- the test tree ------------------------------------------------------------------------------
@dataclass
class Tree:
    root: Path
    bridged_modules: dict[str, list[str]] = field(default_factory=dict)
    bridged_constants: dict[str, object] = field(default_factory=dict)


def check_checkout(checkout: Path, models: list[str]) -> None:
    if not (checkout / "tests" / "test_modeling_common.py").is_file():
        raise SuiteError(f"--transformers-tests {checkout} is not a transformers checkout (no tests/test_modeling_common.py)")
    for model in models:
        if not suite_file(checkout, model).is_file():
            raise SuiteError(f"{checkout} has no {suite_file(Path(), model)}")


def suite_file(root: Path, model: str) -> Path:
    return root / "tests" / "models" / model / f"test_modeling_{model}.py"


def assemble(checkout: Path, sdist: Path, root: Path) -> Tree:
    """Checkout tests + the pinned shared files + bridges, laid out as a transformers checkout in ``root``."""
    shutil.copytree(checkout / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    if (checkout / "utils" / "test_module").is_dir():
        shutil.copytree(checkout / "utils" / "test_module", root / "utils" / "test_module")
    shared = extract_shared_tests(sdist, root / "tests")
    (root / "src").mkdir()
    (root / "src" / "transformers").symlink_to(installed_transformers()[1], target_is_directory=True)
    tree = Tree(root)
    tree.bridged_modules = bridge_missing_modules(root / "tests", shared)
    tree.bridged_constants = bridge_testing_utils(root / "tests", checkout)
    return tree


def _relative_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``from .module import a, b`` statements of one file (level-1 imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.module, [alias.name for alias in node.names])
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]


def bridge_missing_modules(tests: Path, shared: list[str]) -> dict[str, list[str]]:
    """Modules the shared files import from their own directory that exist nowhere: names that skip."""
    missing: dict[str, set[str]] = {}
    for name in shared:
        for module, names in _relative_imports(tests / name):
            target = tests / Path(*module.split("."))
            if not target.with_suffix(".py").is_file() and not (target / "__init__.py").is_file():
                missing.setdefault(module, set()).update(names)
    for module, names in missing.items():
        lines = [
            f'"""Bridge written by grape\'s run_suites.py: neither source has tests/{module}.py."""',
            "import unittest", "",
            "def _missing(*args, **kwargs):",
            f'    raise unittest.SkipTest("tests/{module}.py is not in this checkout (run_suites.py bridge)")', "",
        ]
        lines += [f"{name} = _missing" for name in sorted(names)]
        path = tests / Path(*module.split("."))
        path.with_suffix(".py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {module: sorted(names) for module, names in missing.items()}


def bridge_testing_utils(tests: Path, checkout: Path) -> dict[str, object]:
    """Literal constants the tests import from ``transformers.testing_utils`` that the installed one lacks."""
    import transformers.testing_utils as testing_utils

    wanted = set()
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "transformers.testing_utils":
                wanted.update(alias.name for alias in node.names if not hasattr(testing_utils, alias.name))
    source = checkout / "src" / "transformers" / "testing_utils.py"
    if not wanted or not source.is_file():
        return {}
    found = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in wanted:
                try:
                    found[name] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return found


# ---- running and comparing ----------------------------------------------------------------------
@dataclass
class ModeRun:
    outcomes: dict[str, tuple[str, str]]  # test id -> (outcome, first line of the message)
    counts: dict
    seconds: float


@dataclass(frozen=True)
class Options:
    backend: str
    keyword: str | None
    hidden_act: str | None


def run_mode(tree: Tree, model: str, mode: str, options: Options, out: Path) -> ModeRun:
    junit, counts = out / f"{model}-{mode}.xml", out / f"{model}-{mode}-counts.json"
    bridge = out / "testing_utils_bridge.json"
    bridge.write_text(json.dumps(tree.bridged_constants), encoding="utf-8")
    # Offline: tests that would download a checkpoint fail at once (in both modes) instead of
    # waiting minutes for the network.
    env = dict(os.environ, GRAPE_SUITE_MODE=mode, GRAPE_SUITE_BACKEND=options.backend, GRAPE_SUITE_COUNTS=str(counts),
               GRAPE_SUITE_TESTING_UTILS=str(bridge), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), str(tree.root), os.environ.get("PYTHONPATH", "")]))
    if options.hidden_act:
        env["GRAPE_SUITE_HIDDEN_ACT"] = options.hidden_act
    if options.backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "grape_suite_plugin",
               str(suite_file(tree.root, model)), f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    if options.keyword:
        command += ["-k", options.keyword]
    start = time.perf_counter()
    with open(out / f"{model}-{mode}.log", "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=tree.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if not junit.is_file():
        raise SuiteError(f"pytest wrote no report for {model} ({mode}); see {out / f'{model}-{mode}.log'}")
    loaded = json.loads(counts.read_text(encoding="utf-8")) if counts.is_file() else {"tests": {}}
    return ModeRun(parse_junit(junit), loaded["tests"], seconds)


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = PASSED, ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = FAILED, (child.get("message") or "").strip().splitlines()[:1]
                message = message[0][:300] if message else child.tag
                break
            if child.tag == "skipped":
                outcome, message = SKIPPED, (child.get("message") or "")[:300]
        outcomes[test] = (outcome, message)
    return outcomes


def compare(model: str, runs: dict[str, ModeRun]) -> dict:
    default, grape = runs["default"].outcomes, runs["grape"].outcomes
    regressions = [
        {"test": test, "default": outcome, "grape": grape.get(test, ("missing", ""))[0],
         "message": grape.get(test, ("", "not run with grape"))[1]}
        for test, (outcome, _) in sorted(default.items())
        if outcome == PASSED and grape.get(test, ("missing",))[0] != PASSED
    ]
    gains = [test for test, (outcome, _) in sorted(grape.items())
             if outcome == PASSED and default.get(test, ("missing",))[0] != PASSED]
    dispatch = sum(record["dispatch"].get("grape", 0) for record in runs["grape"].counts.values())
    kernels = sum(sum(record["kernels"].values()) for record in runs["grape"].counts.values())
    tally = {mode: {kind: sum(1 for outcome, _ in run.outcomes.values() if outcome == kind)
                    for kind in (PASSED, FAILED, SKIPPED)} for mode, run in runs.items()}
    return {
        "model": model, "tests": len(default), "outcomes": tally, "regressions": regressions, "gains": gains,
        "grape_dispatches": dispatch, "grape_kernel_calls": kernels,
        "seconds": {mode: round(run.seconds, 1) for mode, run in runs.items()},
    }


def write_report(results: list[dict], tree: Tree, options: Options, out: Path) -> Path:
    version = installed_transformers()[0]
    lines = [
        "# transformers' model test suites: default experts implementation vs grape",
        "",
        f"transformers {version}; grape experts backend `{options.backend}`"
        + (f"; tiny models' activation set to `{options.hidden_act}` in both runs" if options.hidden_act else "")
        + (f"; subset `-k {options.keyword}`" if options.keyword else "")
        + "; generated by `tests/transformers_suites/run_suites.py`.",
        "",
        "| suite | tests | passed (default) | passed (grape) | failed default / grape | skipped | "
        "grape dispatches | reached a kernel | regressions | seconds default / grape |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d, g = r["outcomes"]["default"], r["outcomes"]["grape"]
        lines.append(
            f"| {r['model']} | {r['tests']} | {d[PASSED]} | {g[PASSED]} | {d[FAILED]} / {g[FAILED]} | {d[SKIPPED]} | "
            f"{r['grape_dispatches']} | {r['grape_kernel_calls']} | {len(r['regressions'])} | "
            f"{r['seconds']['default']} / {r['seconds']['grape']} |"
        )
    lines += ["", "'reached a kernel': grape experts calls that ran a grape kernel; the rest of the grape "
              "dispatches ran transformers' own path on purpose (autograd recording, or an activation the "
              "kernels do not fuse)."]
    for r in results:
        for item in r["regressions"]:
            lines.append(f"- REGRESSION {item['test']}: default {item['default']}, grape {item['grape']}: "
                         f"{item['message']}")
    if tree.bridged_modules or tree.bridged_constants:
        lines += ["", "Bridges for checkout/version skew (see the runner's docstring):"]
        lines += [f"- tests/{module}.py missing: {', '.join(names)} skip" for module, names in tree.bridged_modules.items()]
        lines += [f"- testing_utils.{name} taken from the checkout" for name in tree.bridged_constants]
    report = out / "transformers_suites.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "transformers_suites.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers-tests", type=Path, required=True, help="a transformers source checkout")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--backend", default="auto", help="grape experts backend for the grape run (auto, cpu, triton, ...)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting a subset of each suite")
    parser.add_argument("--hidden-act", help="set the suites' tiny models' activation in both runs (e.g. silu: "
                        "the GELU suites then exercise grape's kernels instead of its fallback)")
    parser.add_argument("--sdist", type=Path, help="the installed transformers version's .tar.gz (default: PyPI, cached)")
    parser.add_argument("--out", type=Path, default=Path("runs/transformers-suites"), help="report directory")
    args = parser.parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            raise SuiteError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
        from grape_kernels.backends import get_backend

        if args.backend != "auto":
            get_backend(args.backend)
        missing = [name for name in TEST_REQUIREMENTS if importlib.util.find_spec(name) is None]
        if missing:
            raise SuiteError(f"transformers' tests need {', '.join(missing)}: pip install {' '.join(missing)}")
        options = Options(args.backend, args.keyword, args.hidden_act)
        checkout = args.transformers_tests.expanduser().resolve()
        check_checkout(checkout, models)
        sdist = locate_sdist(installed_transformers()[0], args.sdist)
        args.out.mkdir(parents=True, exist_ok=True)
        results = []
        with tempfile.TemporaryDirectory(prefix="grape-suites-") as tmp:
            tree = assemble(checkout, sdist, Path(tmp))
            for model in models:
                runs = {mode: run_mode(tree, model, mode, options, args.out) for mode in MODES}
                results.append(compare(model, runs))
                print(f"{model}: {len(results[-1]['regressions'])} regressions "
                      f"({results[-1]['seconds']['default']} s default, {results[-1]['seconds']['grape']} s grape)")
            report = write_report(results, tree, options, args.out)
    except (SuiteError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 1 if any(r["regressions"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
