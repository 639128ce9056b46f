"""Airflow DAG: score a CLIP-embedding dataset with clip-nsfw-spark through spark-submit.

No logic here: the DAG passes its params to ``jobs/score_embeddings.py``. Every run uses ``--resume``, so
an Airflow retry finishes what a failed attempt left instead of being refused (and starting again).
``model``, ``threshold`` and ``mode`` are passed only when set: unset, the config's own (or the job's
defaults) hold. A flag passed always would override the config file the run names.

Environment (on the Airflow workers):
- ``CLIP_NSFW_SPARK_CONN``: the Spark connection id (default ``spark_default``), e.g. a YARN or k8s master.
- ``CLIP_NSFW_APPLICATION``: the path or URL of score_embeddings.py as the cluster sees it (default:
  the file next to this folder).
- ``CLIP_NSFW_ARCHIVE``: a packed environment from ``clip-nsfw-spark package`` (local path, hdfs:// or
  s3://); shipped with ``--archives`` and used as the Python of the driver and executors. Leave it unset
  when the cluster's image already has the library (the Docker image).
"""

import os
from datetime import timedelta
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param

JOBS = Path(__file__).resolve().parent.parent
APPLICATION = os.environ.get("CLIP_NSFW_APPLICATION", str(JOBS / "score_embeddings.py"))
ARCHIVE = os.environ.get("CLIP_NSFW_ARCHIVE")
PACKED_PYTHON = "./environment/bin/python"

with DAG(
    dag_id="clip_nsfw_score",
    description="Annotate, filter or split a CLIP-embedding dataset with LAION's NSFW detector",
    schedule=None,
    catchup=False,
    tags=["clip-nsfw-spark"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "input": Param("", type="string", minLength=1, description="parquet file/folder/glob, or a LAION folder"),
        "output": Param("", type="string", minLength=1, description="output folder (outside the input)"),
        # Unset (null): the config's value, else the job's default (vit-l-14, 0.5, annotate).
        "model": Param(None, type=["null", "string"], description="vit-l-14, vit-b-32 … or a model path; "
                                                                  "null: the config's"),
        "threshold": Param(None, type=["null", "number"], minimum=0, maximum=1,
                           description="unsafe ⇔ score ≥ threshold; null: the config's"),
        "mode": Param(None, type=["null", "string"], enum=[None, "annotate", "filter", "split", "scores"],
                      description="null: the config's"),
        "config": Param(str(JOBS.parent / "conf" / "score_embeddings.yaml"), type="string",
                        description="job YAML as the Spark driver sees it"),
    },
) as dag:
    SparkSubmitOperator(
        task_id="score_embeddings",
        conn_id=os.environ.get("CLIP_NSFW_SPARK_CONN", "spark_default"),
        application=APPLICATION,
        name="clip-nsfw-score",
        application_args=[
            "--config", "{{ params.config }}",
            "--input", "{{ params.input }}",
            "--output", "{{ params.output }}",
            # Airflow renders each argument on its own and cannot drop one: an unset param renders as a
            # second --resume (a flag: harmless), a set one as --name=value.
            *(f"{{{{ '--{name}=' ~ params.{name} if params.{name} is not none else '--resume' }}}}"
              for name in ("model", "threshold", "mode")),
            "--resume",
        ],
        archives=f"{ARCHIVE}#environment" if ARCHIVE else None,
        conf={"spark.pyspark.python": PACKED_PYTHON, "spark.pyspark.driver.python": PACKED_PYTHON} if ARCHIVE else {},
    )
