"""The Airflow DAG: imports cleanly with the expected task and params, and runs the job end to end.

Airflow lives in its own virtualenv (``.venv-airflow``, made by ``.ci/run``): its Spark provider installs
``pyspark-client``, which would replace the job's pyspark. ``spark-submit`` comes from the job's venv.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models

AIRFLOW_VENV = Path(os.environ.get("CLIP_NSFW_AIRFLOW_VENV", ROOT / ".venv-airflow"))
AIRFLOW_PYTHON = AIRFLOW_VENV / "bin" / "python"
DAGS = ROOT / "jobs" / "airflow"

pytestmark = pytest.mark.skipif(
    not AIRFLOW_PYTHON.exists(),
    reason=f"!!! no Airflow virtualenv at {AIRFLOW_VENV}: .ci/run makes it; CI must run these tests !!!",
)

DAGBAG_SCRIPT = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("clip_nsfw_score")
task = dag.get_task("score_embeddings") if dag else None
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": [t.task_id for t in dag.tasks] if dag else [],
    "params": {k: dag.params.get_param(k).value for k in dag.params} if dag else {},
    "operator": type(task).__name__ if task else None,
    "retries": task.retries if task else None,
    "application": task.application if task else None,
    "args": task.application_args if task else None,
    # the arguments as a run renders them: no optional param set, then all of them
    "rendered": [[task.render_template(arg, {"params": params}, jinja_env=dag.get_template_env())
                  for arg in task.application_args]
                 for params in ({"config": "c.yaml", "input": "in", "output": "out", "model": None,
                                 "threshold": None, "mode": None},
                                {"config": "c.yaml", "input": "in", "output": "out", "model": "vit-b-32",
                                 "threshold": 0.1, "mode": "scores"})] if task else None,
}, default=str))
"""


def airflow_env(tmp_path) -> dict:
    return dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)


def test_dag_imports_with_expected_task_and_params(tmp_path):
    result = subprocess.run([str(AIRFLOW_PYTHON), "-c", DAGBAG_SCRIPT, str(DAGS)], capture_output=True, text=True,
                            env=airflow_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["errors"] == {}
    assert info["dags"] == ["clip_nsfw_score"] and info["tasks"] == ["score_embeddings"]
    assert info["operator"] == "SparkSubmitOperator" and info["retries"] == 2
    assert set(info["params"]) == {"input", "output", "model", "threshold", "mode", "config"}
    # Unset by default: a flag passed always overrode the config file (review 18: a filter config ran as annotate).
    assert info["params"]["threshold"] is None and info["params"]["model"] is None and info["params"]["mode"] is None
    unset, every = info["rendered"]
    assert unset == ["--config", "c.yaml", "--input", "in", "--output", "out", "--resume", "--resume", "--resume",
                     "--resume"]
    assert every == ["--config", "c.yaml", "--input", "in", "--output", "out", "--model=vit-b-32", "--threshold=0.1",
                     "--mode=scores", "--resume"]
    assert info["application"] == str(ROOT / "jobs" / "score_embeddings.py")
    assert "--resume" in info["args"] and "{{ params.input }}" in info["args"]


@needs_models
def test_airflow_dags_test_runs_the_job_on_local_spark(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=600, files=2)
    env = airflow_env(tmp_path) | {"AIRFLOW_CONN_SPARK_LOCAL": json.dumps({"conn_type": "spark", "host": "local[2]"}),
                                   "CLIP_NSFW_SPARK_CONN": "spark_local"}
    airflow = str(AIRFLOW_VENV / "bin" / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, env=env, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    # The mode and threshold from the config file the run names, no param (review 18: the DAG's defaults for
    # them were passed as flags, which override the file: this split ran as annotate at 0.5).
    config = tmp_path / "split.yaml"
    config.write_text("mode: split\nthreshold: 0.1\n")
    conf = json.dumps({"input": str(source), "output": str(tmp_path / "out"), "config": str(config)})
    result = subprocess.run([airflow, "dags", "test", "clip_nsfw_score", "-c", conf], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (tmp_path / "out" / "_SUCCESS").exists(), (result.stdout + result.stderr)[-4000:]
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*safe/*.parquet"))
    assert rows == 600
    report = json.loads((tmp_path / "out" / "_clip_nsfw_report.json").read_text())
    assert report["config"]["mode"] == "split" and report["threshold"] == 0.1
