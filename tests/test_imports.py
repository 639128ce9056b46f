"""The package's import graph: one way, no cycle (function-level imports included), Spark in one place."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clip_nsfw_spark"
# Modules that never import pyspark (the pure core and the executor's data path): Spark glue is spark.py.
NO_SPARK = {"scorer", "kernels", "weights", "registry", "embeddings", "batch", "planner", "reader", "writer", "report",
            "worker", "outcomes", "config", "prompts", "heads", "pages", "splice", "thrift", "job", "output"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(package modules imported anywhere in the file, top-level names of other packages imported)."""
    local, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("clip_nsfw_spark"):
                name = module.removeprefix("clip_nsfw_spark").lstrip(".")
                if name:
                    local.add(name.split(".")[0])
                else:  # from . import x
                    local.update(alias.name for alias in node.names)
            elif node.level == 0:
                external.add(module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clip_nsfw_spark."):
                    local.add(alias.name.split(".")[1])
                else:
                    external.add(alias.name.split(".")[0])
    return local, external


def graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imports_of(path)[0] & set(modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for child in sorted(edges[node]):
            if state.get(child) == 1:
                cycle = path[path.index(child):] + [child]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, path + [child])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_cycle_check_can_fail(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    assert imports_of(tmp_path / "a.py")[0] == {"b"} and imports_of(tmp_path / "b.py")[0] == {"a"}


def test_spark_is_imported_by_the_spark_glue_only():
    for name in sorted(NO_SPARK):
        path = PACKAGE / f"{name}.py"
        if path.exists():
            assert "pyspark" not in imports_of(path)[1], f"{name}.py imports pyspark; Spark glue lives in spark.py"


def test_the_executor_path_never_imports_tensorflow_or_torch():
    executor = {"scorer", "kernels", "weights", "embeddings", "batch", "reader", "writer", "worker", "prompts",
                "pages", "splice", "thrift", "outcomes", "storage", "lease", "registry", "errors", "config", "planner"}
    seen, todo = set(), ["worker"]
    edges = graph()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(edges.get(module, ()))
    assert seen <= executor, f"the worker reaches {sorted(seen - executor)}"
    for name in seen:
        assert not imports_of(PACKAGE / f"{name}.py")[1] & {"tensorflow", "torch", "pyspark"}, name
