"""Outputs that skip what users don't need (issue #13): the scores sidecar with its ids, column projection,
reading only the needed columns, no statistics on embedding columns; every mode readable by pyarrow and
by Spark where Spark can read the types."""


import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, InputError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.driver.planner import plan
from clip_nsfw_spark.tools.sample import embedding_array, embeddings, metadata, write_laion_sample, write_parquet_sample
from clip_nsfw_spark.executor.reader import task_batches
from clip_nsfw_spark.executor.stages import StageClock
from conftest import needs_models


def run(source, output, **options):
    return run_job(JobConfig(input=str(source), output=str(output), **options))


def read_dir(path):
    return pq.read_table(str(path), partitioning=None)


@needs_models
def test_scores_sidecar_keeps_the_first_id_column_and_joins_back(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=1500, files=2, row_group_rows=250)
    report = run(source, tmp_path / "ann")
    run(source, tmp_path / "side", mode="scores", rows_per_task=500)
    side = read_dir(tmp_path / "side")
    assert side.column_names == ["key", "punsafe", "nsfw_reject_reason"]
    annotated = read_dir(tmp_path / "ann")
    joined = dict(zip(side.column("key").to_pylist(), side.column("punsafe").to_pylist()))
    assert joined == dict(zip(annotated.column("key").to_pylist(), annotated.column("punsafe").to_pylist()))
    assert report["rows"]["read"] == side.num_rows == 1500
    run(source, tmp_path / "ids", mode="scores", id_columns=("url", "key"))
    assert read_dir(tmp_path / "ids").column_names == ["url", "key", "punsafe", "nsfw_reject_reason"]


@needs_models
def test_scores_sidecar_without_an_id_column_gets_file_and_row_number(tmp_path):
    x = embeddings(700, 768, 3)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(700)], "embedding": embedding_array(x, True)}),
                   tmp_path / "in" / "a.parquet", row_group_size=100)
    report = run(tmp_path / "in", tmp_path / "side", mode="scores", rows_per_task=300, batch_rows=64)
    side = read_dir(tmp_path / "side")
    assert side.column_names == ["source_file", "row_index", "punsafe", "nsfw_reject_reason"]
    order = np.argsort(side.column("row_index").to_numpy())
    assert side.column("row_index").to_numpy()[order].tolist() == list(range(700))  # slices continue the count
    assert set(side.column("source_file").to_pylist()) == {str(tmp_path / "in" / "a.parquet")}
    # Written in one spelling (issue #23, class 7): a join on source_file works across runs given other ones.
    (tmp_path / "link").symlink_to(tmp_path / "in")
    for spelling in (f"{tmp_path}//in/./", f"file://{tmp_path}/in", str(tmp_path / "link")):
        run(spelling, tmp_path / "again", mode="scores", rows_per_task=300, batch_rows=64, overwrite=True)
        assert set(read_dir(tmp_path / "again").column("source_file").to_pylist()) == {
            str(tmp_path / "in" / "a.parquet")}, spelling
    # Two symlinks to one stored object (DVC, git-annex) are two files: their names are kept.
    (tmp_path / "store").mkdir()
    os.rename(tmp_path / "in" / "a.parquet", tmp_path / "store" / "obj-1234")
    (tmp_path / "in" / "a.parquet").symlink_to(tmp_path / "store" / "obj-1234")
    (tmp_path / "in" / "b.parquet").symlink_to(tmp_path / "store" / "obj-1234")
    run(tmp_path / "link", tmp_path / "dvc", mode="scores", rows_per_task=300, batch_rows=64)
    names = read_dir(tmp_path / "dvc").column("source_file").to_pylist()
    assert sorted(set(names)) == [str(tmp_path / "in" / "a.parquet"), str(tmp_path / "in" / "b.parquet")]
    assert len(names) == 1400
    (tmp_path / "in" / "b.parquet").unlink()
    run(tmp_path / "in", tmp_path / "ann")
    annotated = read_dir(tmp_path / "ann")
    assert np.array_equal(side.column("punsafe").to_numpy()[order], annotated.column("punsafe").to_numpy())
    assert report["input"]["tasks"] == 3


@needs_models
def test_scores_sidecar_on_the_laion_layout(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=600, files=2)
    run(tmp_path / "l", tmp_path / "side", mode="scores")
    side = read_dir(tmp_path / "side")
    assert side.column_names == ["key", "punsafe", "nsfw_reject_reason"] and side.num_rows == 600


@needs_models
def test_projection_keeps_or_drops_columns_in_every_mode(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=800, files=2)
    run(source, tmp_path / "meta", drop_columns=("embedding",))
    assert read_dir(tmp_path / "meta").column_names == ["key", "url", "caption", "punsafe", "nsfw_reject_reason"]
    run(source, tmp_path / "two", columns=("caption", "key"), mode="split", threshold=0.01)
    for side in ("safe", "unsafe"):
        assert read_dir(tmp_path / "two" / side).column_names == ["caption", "key", "punsafe"]
    run(source, tmp_path / "full")
    full = read_dir(tmp_path / "full")
    assert read_dir(tmp_path / "meta").equals(full.drop_columns(["embedding"]))


def test_projection_errors_name_what_is_there(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=10, files=1)
    with pytest.raises(InputError, match=r"column\(s\) 'nope' not in the input; columns found: key, url, caption, embedding"):
        run(tmp_path / "in", tmp_path / "o", drop_columns=("nope",))
    with pytest.raises(ConfigError, match="choose one of columns .* and drop_columns"):
        JobConfig(input="i", output="o", columns=("a",), drop_columns=("b",))
    with pytest.raises(ConfigError, match="id_columns is for mode scores"):
        JobConfig(input="i", output="o", id_columns=("key",))
    with pytest.raises(ConfigError, match="mode scores writes only id columns"):
        JobConfig(input="i", output="o", mode="scores", columns=("key",))


def test_tasks_read_only_the_columns_asked_for(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=300, files=1, row_group_rows=100)
    import fsspec

    task = plan(JobConfig(input=str(tmp_path / "in"), output="o")).tasks[0]
    batches = list(task_batches(task, fsspec.filesystem("file"), 64, StageClock(), ["key", "embedding"]))
    assert {tuple(b.schema.names) for b, _, _ in batches} == {("key", "embedding")}
    assert [first for _, _, first in batches] == [0, 64, 100, 164, 200, 264]


@needs_models
def test_embedding_columns_are_written_without_statistics(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=200, files=1)
    run(tmp_path / "in", tmp_path / "out")
    meta = pq.read_metadata(tmp_path / "out" / "part-00000.parquet")
    stats = {meta.schema.column(i).path: meta.row_group(0).column(i).is_stats_set for i in range(meta.num_columns)}
    assert stats["embedding.list.element"] is False
    assert stats["key"] and stats["punsafe"]


@needs_models
def test_every_mode_is_readable_by_spark(spark, tmp_path):
    x = embeddings(600, 768, 4, np.float32)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table(metadata(600, 0) | {"embedding": embedding_array(x, False)}), tmp_path / "in" / "a.parquet")
    for mode in ("annotate", "filter", "split", "scores"):
        run(tmp_path / "in", tmp_path / mode, mode=mode, threshold=0.01)
    counts = {mode: spark.read.parquet(str(tmp_path / mode / "a.parquet")).count() for mode in ("annotate", "filter", "scores")}
    counts["split"] = sum(spark.read.parquet(str(tmp_path / "split" / side / "a.parquet")).count()
                          for side in ("safe", "unsafe"))
    assert counts == {"annotate": 600, "filter": counts["filter"], "scores": 600, "split": 600}
    assert counts["filter"] == read_dir(tmp_path / "filter").num_rows
    row = spark.read.parquet(str(tmp_path / "annotate")).select("punsafe").first()
    assert isinstance(row.punsafe, float)


def test_the_width_check_skips_empty_rows_and_reads_no_more_than_it_needs(tmp_path):
    from clip_nsfw_spark.driver.job import embedding_widths
    from clip_nsfw_spark.storage.filesystem import filesystem

    rows = [[] if i < 2000 else [0.01] * 768 for i in range(2100)]  # a file that starts with empty lists
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": [str(i) for i in range(2100)], "emb": pa.array(rows, pa.list_(pa.float32()))}),
                   tmp_path / "in" / "a.parquet")
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert embedding_widths(plan(config), filesystem(config.input)[0]) == {"emb": 768}


@needs_models
@pytest.mark.parametrize("first", ["zero rows", "only null embeddings"])
def test_a_first_file_without_embeddings_does_not_turn_the_width_check_off(tmp_path, first):
    """Failed shards (zero rows, or every embedding null) sort first by name: the width comes from the first
    file that has an embedding, so 512-d data still gets the 'use vit-b-32' error instead of a run that
    rejects every row and exits 0 (a hostile user's finding)."""
    from clip_nsfw_spark.driver.job import WIDTH_PROBE_FILES, embedding_widths
    from clip_nsfw_spark.storage.filesystem import filesystem

    write_parquet_sample(str(tmp_path / "in"), rows=400, files=2, dim=512, fixed=False)  # list: no width in the type
    sound = pq.read_table(tmp_path / "in" / "part-00000.parquet")
    nulls = sound.slice(0, 50).set_column(
        sound.schema.get_field_index("embedding"), "embedding", pa.nulls(50, sound.schema.field("embedding").type))
    empty = sound.slice(0, 0) if first == "zero rows" else nulls
    for name in ("a-0.parquet", "a-1.parquet"):  # before part-* in plan order
        pq.write_table(empty, tmp_path / "in" / name)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert embedding_widths(plan(config), filesystem(config.input)[0]) == {"embedding": 512}
    with pytest.raises(Exception, match="512-d.*vit-b-32"):
        run(tmp_path / "in", tmp_path / "out", mode="filter")
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    # the probe is bounded: past WIDTH_PROBE_FILES files to read without an embedding, the width is unknown
    for i in range(WIDTH_PROBE_FILES):
        pq.write_table(nulls, tmp_path / "in" / f"a-{i:03d}.parquet")
    assert embedding_widths(plan(config), filesystem(config.input)[0]) == {}


@needs_models
def test_an_output_started_before_embedding_compression_existed_resumes(tmp_path):
    import json

    write_parquet_sample(str(tmp_path / "in"), rows=300, files=3)
    run(tmp_path / "in", tmp_path / "clean")
    run(tmp_path / "in", tmp_path / "out")
    state = tmp_path / "out" / "_clip_nsfw_tasks"
    job = json.loads((state / "_job.json").read_text())
    del job["embedding_compression"]  # as the previous version wrote it
    (state / "_job.json").write_text(json.dumps(job))
    (tmp_path / "out" / "_SUCCESS").unlink()
    (tmp_path / "out" / "part-00001.parquet").unlink()
    # Then, embeddings were written with the output's compression (zstd): the same run is that setting.
    with pytest.raises(Exception, match="embedding_compression: 'zstd' then, 'none' now"):
        run(tmp_path / "in", tmp_path / "out", resume=True)
    report = run(tmp_path / "in", tmp_path / "out", resume=True, embedding_compression="zstd")
    assert report["rows"]["read"] == 300 and report["tasks_resumed"] == 2
    assert read_dir(tmp_path / "out").drop(["punsafe"]).equals(read_dir(tmp_path / "clean").drop(["punsafe"]))
    assert read_dir(tmp_path / "out").column("punsafe").equals(read_dir(tmp_path / "clean").column("punsafe"))
