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

#: Domain logic: what things cost, when periods start, what a fingerprint is, which addresses are public...
DOMAIN = ["proxy.pricing", "proxy.budget", "proxy.cache", "proxy.netguard", "proxy.validate", "proxy.money",
          "proxy.values", "proxy.catalog", "proxy.auth", "proxy.webhooks", "proxy.store", "proxy.store.sqlite",
          "proxy.store.accounts", "proxy.settle", "proxy.sweeper", "proxy.refresh", "proxy.tracker"]


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


def test_the_graph_sees_every_kind_of_import():
    graph = _graph()
    assert "proxy.values" in graph["proxy.store"]  # only under TYPE_CHECKING
    assert "proxy.app" in graph["proxy.cli"]  # only inside a function
    assert "proxy.pipeline" in graph["proxy.pipeline.s1_authenticate"]  # "from . import"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_not_even_for_types():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("name", DOMAIN)
def test_domain_logic_imports_no_pipeline_and_no_composition_root(name):
    reached = _reachable(_graph(), name)
    assert sorted(m for m in reached if m == "proxy.pipeline" or m.startswith("proxy.pipeline.")) == []
    assert "proxy.app" not in reached


def test_nothing_imports_the_composition_root_but_the_cli_that_serves_it():
    assert sorted(name for name, targets in _graph().items() if "proxy.app" in targets) == ["proxy.cli"]


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
