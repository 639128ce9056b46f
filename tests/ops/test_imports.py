"""The package's import graph: roles by sub-package, imports one way, no cycle, Spark in one place.

Every module is named by its dotted path inside the package (``executor.worker``, ``contract``); its role is
its sub-package (``executor``) or, for a top-level module, its own name. ``ALLOWED`` says which roles a role
may import (function-level imports included): executors see the contract, the scoring core, parquet and
storage, never the driver; the scoring core sees no IO. ``models.registry`` (the catalogue of heads, plain
data) and ``errors`` may be imported from anywhere.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "clip_nsfw_spark"
SHARED = {"errors", "models.registry"}
ALLOWED = {
    "errors": set(),
    "contract": set(),
    "scoring": {"contract"},
    "parquet": set(),
    "storage": set(),
    "models": {"contract", "scoring"},
    "executor": {"contract", "scoring", "parquet", "storage"},
    "driver": {"contract", "scoring", "parquet", "storage", "models", "executor"},
    # (parquet: the preloading worker daemon, spark/daemon.py, loads the decoder's kernels before forking)
    "spark": {"contract", "scoring", "parquet", "storage", "models", "executor", "driver"},
    "api": {"scoring", "models"},
    "tools": {"contract", "scoring", "parquet", "storage", "models", "executor", "driver", "api"},
    "cli": {"contract", "scoring", "parquet", "storage", "models", "executor", "driver", "spark", "tools", "api"},
}
# Roles that never import pyspark: Spark glue is the spark/ sub-package (and the CLI/tools that start it).
NO_SPARK = {"contract", "scoring", "parquet", "storage", "models", "executor", "driver", "api"}
# What an executor's Python worker may never load.
HEAVY = {"tensorflow", "torch", "pyspark"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def role(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path, root: Path = PACKAGE) -> tuple[set[str], set[str]]:
    """(package modules imported anywhere in the file, top-level names of other packages imported)."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    local, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([module] if module else []))
            elif module == "clip_nsfw_spark" or module.startswith("clip_nsfw_spark."):
                name = module.removeprefix("clip_nsfw_spark").lstrip(".")
            else:
                external.add(module.split(".")[0])
                continue
            for alias in node.names:  # `from clip_nsfw_spark.scoring import kernels` names a module
                candidate = f"{name}.{alias.name}" if name else alias.name
                local.add(candidate if _exists(candidate, root) else name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clip_nsfw_spark."):
                    local.add(alias.name.removeprefix("clip_nsfw_spark."))
                else:
                    external.add(alias.name.split(".")[0])
    return local - {""}, external


def _exists(module: str, root: Path) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))
            if module_name(path, root) and path.name != "__main__.py"}


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: {m for m in imports_of(path, root)[0] if m in found} - {name} for name, path in found.items()}


def violations(root: Path = PACKAGE) -> list[str]:
    """'a imports b' for every import that crosses the roles' rules."""
    bad = []
    for name, targets in graph(root).items():
        for target in sorted(targets):
            if target in SHARED or role(target) == role(name) or role(target) in ALLOWED.get(role(name), set()):
                continue
            bad.append(f"{name} imports {target}")
    return bad


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for child in sorted(edges.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child, path + [child])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_every_module_has_a_known_role():
    unknown = sorted(name for name in modules() if role(name) not in ALLOWED)
    assert not unknown, f"modules outside the roles of ALLOWED: {unknown}"


def test_imports_follow_the_roles():
    assert violations() == []


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _tiny_package(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "clip_nsfw_spark"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


def test_the_checks_can_fail(tmp_path):
    root = _tiny_package(tmp_path, {
        "executor/worker.py": "from clip_nsfw_spark.driver.config import JobConfig\n",
        "driver/config.py": "def f():\n    from ..executor import worker\n",
        "scoring/kernels.py": "from clip_nsfw_spark import errors\nfrom clip_nsfw_spark.storage import lease\n",
        "storage/lease.py": "", "errors.py": "",
    })
    assert graph(root)["executor.worker"] == {"driver.config"}
    assert graph(root)["driver.config"] == {"executor.worker"}
    assert violations(root) == ["executor.worker imports driver.config", "scoring.kernels imports storage.lease"]
    assert find_cycle(graph(root)) == ["driver.config", "executor.worker", "driver.config"]


@pytest.mark.parametrize("name", sorted(name for name in modules() if role(name) in NO_SPARK))
def test_spark_is_imported_by_the_spark_glue_only(name):
    assert "pyspark" not in imports_of(modules()[name])[1], f"{name} imports pyspark; Spark glue lives in spark/"


def test_the_executor_path_never_imports_tensorflow_or_torch():
    edges, found = graph(), modules()
    seen, todo = set(), ["executor.worker"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    assert {role(m) for m in seen} <= {"executor", "contract", "scoring", "parquet", "storage", "errors", "models"}
    assert {m for m in seen if role(m) == "models"} <= SHARED
    for name in seen:
        assert not imports_of(found[name])[1] & HEAVY, name


def test_a_python_worker_on_local_files_imports_no_s3_client_or_heavy_library():
    """What this package brings into a Spark task's Python worker (the executor and the task's function's
    module; PySpark's own worker module is PySpark's), imported: no S3 client (botocore and fsspec.asyn were
    ~45 ms of every worker's start, imported now only where S3 is used), no pandas, TensorFlow or torch."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, clip_nsfw_spark.executor.worker, clip_nsfw_spark.spark.runner; "
            "print('LOADED ' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'botocore', 'aiobotocore', 's3fs', 'pandas', 'tensorflow', 'torch'} or m == 'fsspec.asyn')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent)
    [loaded] = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    assert json.loads(loaded[len("LOADED "):]) == []
