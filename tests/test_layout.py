"""The house shows its plan: no import cycles (type-only ones included), domain logic free of the request pipeline,
the pipeline's policies named in the order the app runs them, and every annotation resolvable."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import typing
from pathlib import Path

import pytest

import proxy
from proxy.pipeline import StageNotRun, SubmitContext

ROOT = Path(proxy.__file__).parent

#: The rooms of docs/architecture.md, highest first: a module imports only from its own room or a lower level, never
#: from a higher one, and never from another room of its own level. The top of proxy/ holds only the composition
#: modules; config and services sit there because everything reads them, and their level says who may.
LEVELS = [
    ["proxy.cli"],                                          # the command
    ["proxy.app"],                                          # the composition root
    ["proxy.pipeline", "proxy.console", "proxy.simulator"],  # the request path, the console, the upstream's double
    ["proxy.http"],                                         # routes, admin API, OpenAPI, errors as responses, server
    ["proxy.services"],                                     # the shared objects handlers reach
    ["proxy.auth", "proxy.jobs"],                           # who is calling; what follows a job after its submit
    ["proxy.config"],                                       # the frozen configuration
    ["proxy.store", "proxy.net"],                           # persistence; calls to addresses a client chose
    ["proxy.domain", "proxy.ops"],                          # the rules; how the gateway runs, stops and is watched
]
ROOMS = [room for level in LEVELS for room in level]
TOP_LEVEL = ["__init__.py", "app.py", "config.py", "services.py"]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {"proxy": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="proxy."):
        module = importlib.util.find_spec(info.name)
        assert module is not None and module.origin is not None
        found[info.name] = Path(module.origin)
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every gateway module ``name`` imports anywhere in its text: top level, in functions, under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            stem = (f"{base}.{module}" if module else base) if node.level else module
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_sees_every_kind_of_import(tmp_path):
    known = {"proxy.domain", "proxy.domain.money", "proxy.domain.values", "proxy.domain.clock", "proxy.domain.views"}
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom . import money\nif TYPE_CHECKING:\n"
                      "    from .values import Hold\ndef f():\n    from .clock import Clock\n")
    assert _imports("proxy.domain.probe", source, known) == {"proxy.domain", "proxy.domain.money",
                                                              "proxy.domain.values", "proxy.domain.clock"}
    graph = _graph()
    assert "proxy.app" in graph["proxy.cli.serve"]  # only inside a function
    assert "proxy.pipeline" in graph["proxy.pipeline.s1_authenticate"]  # "from . import"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_not_even_for_types():
    assert _cycles(_graph()) == []


def _room(name: str) -> str:
    rooms = [room for room in ROOMS if name == room or name.startswith(room + ".")]
    assert rooms, f"{name} is in no room of docs/architecture.md"
    return max(rooms, key=len)


def _level(room: str) -> int:
    return next(index for index, level in enumerate(LEVELS) if room in level)


def test_only_the_composition_modules_are_at_the_top():
    assert sorted(path.name for path in ROOT.glob("*.py")) == TOP_LEVEL
    packages = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))
    assert packages == sorted(room.removeprefix("proxy.") for room in ROOMS if (ROOT / room.removeprefix("proxy.")).is_dir())
    assert sorted(path.name for path in ROOT.iterdir() if path.is_dir() and path.name != "__pycache__") == sorted(
        packages + ["assets", "policies"])


def test_every_module_is_in_a_room():
    assert sorted(name for name in _modules() if name != "proxy" and not any(
        name == room or name.startswith(room + ".") for room in ROOMS)) == []


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a room to a room on its own level or a higher one."""
    wrong = []
    for name, targets in graph.items():
        if name == "proxy":
            continue
        here = _room(name)
        for target in targets:
            if target == "proxy":
                continue
            there = _room(target)
            if there != here and _level(there) <= _level(here):
                wrong.append(f"{name} -> {target}")
    return sorted(wrong)


def test_imports_run_down_the_rooms_never_up_and_never_sideways():
    assert _wrong_way(_graph()) == []


def test_the_room_check_catches_an_upward_import():
    graph = {"proxy.domain.money": {"proxy.store.records"}, "proxy.store.records": set()}
    assert _wrong_way(graph) == ["proxy.domain.money -> proxy.store.records"]


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_domain_imports_no_http_pipeline_store_jobs_or_aiohttp():
    graph = _graph()
    domain = sorted(name for name in graph if name != "proxy" and _room(name) == "proxy.domain")
    assert len(domain) > 15
    for name in domain:
        reached = (_reachable(graph, name) | {name}) - {"proxy"}
        assert sorted(m for m in reached if _room(m) != "proxy.domain") == [], name
        assert sorted({"aiohttp", "asyncpg", "sqlite3", "jinja2"} & _third_party(_modules()[name])) == [], name


def test_no_module_is_longer_than_a_reader_takes_in():
    lines = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert sorted(name for name, count in lines.items() if count > MAX_LINES) == []


def test_nothing_imports_the_composition_root_but_the_cli_that_serves_it():
    assert sorted(name for name, targets in _graph().items() if "proxy.app" in targets) == ["proxy.cli.serve"]


def test_policies_are_named_in_the_order_the_app_runs_them(tmp_path):
    from proxy.app import build_app
    from proxy.config import load_config
    from proxy.pipeline import PIPELINE

    stages = sorted(p.stem for p in (ROOT / "pipeline").glob("s[0-9]_*.py"))
    assert stages == ["s1_authenticate", "s2_validate", "s3_ratelimit", "s4_webhook", "s5_idempotency", "s6_dedup",
                      "s7_price", "s8_budget", "s9_forward"]
    app = build_app(load_config({}, upstream_key="k", jwt_secret="s" * 32, db_path=str(tmp_path / "g.db")))
    ran = [type(policy) for policy in app[PIPELINE].policies]
    defined = []
    for stem in stages:
        module = importlib.import_module(f"proxy.pipeline.{stem}")
        source = Path(module.__file__).read_text()
        defined += [getattr(module, name) for name in re.findall(r"^class ([A-Z][A-Za-z]+)\(Policy\)", source, re.M)]
    assert ran == defined


def test_every_annotation_resolves():
    from proxy.store import Store
    hints = typing.get_type_hints(Store.begin_submission)
    assert sorted(hints) == ["admission", "hold", "return", "submission"]
    typing.get_type_hints(SubmitContext.__init__)
    typing.get_type_hints(SubmitContext.submission)
    for name in _modules():
        if name.endswith(".__main__"):  # running it is the command itself
            continue
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == name:
                typing.get_type_hints(value)
                for attribute in vars(value).values():
                    if callable(attribute) and getattr(attribute, "__module__", None) == name:
                        typing.get_type_hints(attribute)


def test_a_stage_result_read_before_its_policy_ran_names_that_policy():
    ctx = SubmitContext(request=None, model=None)  # type: ignore[arg-type]
    with pytest.raises(StageNotRun, match=r"ctx\.estimate is set by the price policy"):
        ctx.estimate  # noqa: B018
    with pytest.raises(StageNotRun, match=r"ctx\.caller is set by the auth policy"):
        ctx.submission("h", "MISS")
    ctx.params = {"prompt": "x"}
    assert ctx.params == {"prompt": "x"}
    assert type(ctx).hold.is_set(ctx) is False
