"""worker.py: one task start to finish: outputs, statistics, the state file written last, errors that name the
file and leave nothing behind, and a Worker that crosses to executors by pickle.

Scorers here come from the ``make_scorer`` seam (a row's score is its first value) or, for ``scorer_for``, from
a tiny portable MLP built in the test: the real models are tested in the job and model tests.
"""

import dataclasses
import hashlib
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.contract import Head, ScoreOutput, ScoreTarget, TaskConfig
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import DamagedInputError, InputChangedError, InputError, OutputError, TaskError
from clip_nsfw_spark.driver.planner import plan
from clip_nsfw_spark.storage.filesystem import filesystem
from clip_nsfw_spark.scoring.weights import PortableWeights
from clip_nsfw_spark.executor.worker import Worker, process_task, scorer_for
from clip_nsfw_spark.executor.writer import MANIFEST_DIR, TASKS_DIR

HEAD = Head("first-value", "0" * 64, b"")
# First embedding value of each row → its score (threshold 0.5); None: a null embedding.
FIRST = [0.0, 0.15, 0.25, 0.55, 0.65, 1.0, -0.5, 1.5, None, 0.5]  # 0 and 1 are inside [0, 1]
STATE_KEYS = {"task_id", "rel", "source", "rows_planned", "outputs", "output_bytes", "rows_read", "rows_written", "rows_unsafe",
              "rows_rejected", "rejected_by_reason", "histograms", "outside_0_1", "unsafe_by_column", "seconds",
              "stage_seconds", "stage_cpu_seconds", "worker_max_rss_mb"}


@dataclasses.dataclass(frozen=True)
class FirstValue:
    dim: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x[:, 0], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class FirstValueFactory:
    """``make_scorer``: any head → FirstValue (picklable, so the Worker is)."""

    dim: int = 4

    def __call__(self, head: Head) -> FirstValue:
        return FirstValue(self.dim)


def write_input(folder, first=FIRST, row_group=4):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [None if v is None else [v, 0.0, 0.0, 0.0] for v in first]
    table = pa.table({"key": [f"k{i}" for i in range(len(first))], "emb": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table, folder / "a.parquet", row_group_size=row_group)
    return table


OVERLAP = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["in-turn", "overlapped"])
def overlap_mode(request):
    """Every test here twice: stages in turn, and read-ahead/write-behind threads (executor/overlap.py)."""
    OVERLAP[0] = request.param
    yield request.param
    OVERLAP[0] = False


def task_config(tmp_path, **changes) -> TaskConfig:
    values = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), storage_options={}, layout="parquet",
                  mode="split", keep="safe", targets=(ScoreTarget("emb", (ScoreOutput("p", 0, 0.5),)),),
                  reason_column="why", write_columns=None, row_ids=False, write_embeddings=False,
                  compression="zstd", batch_rows=3, histogram_bins=10, overlap=OVERLAP[0])
    return TaskConfig(**(values | changes))


def only_task(tmp_path, **options):
    return plan(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), **options)).tasks


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_a_task_writes_its_streams_and_a_state_file_of_its_statistics(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    stats = worker(task)
    state = tmp_path / "out" / TASKS_DIR / f"{task.task_id}.json"
    assert stats.pop("state_bytes") == os.path.getsize(state)  # what a batch state's copy is checked against
    assert set(stats) == STATE_KEYS and json.loads(state.read_text()) == stats
    assert stats["task_id"] == task.task_id and stats["rel"] == "a.parquet" and stats["source"] == task.source
    assert stats["rows_planned"] == stats["rows_read"] == 10
    assert stats["rows_written"] == {"safe": 4, "unsafe": 5, "rejected": 1}
    assert stats["rows_unsafe"] == 5 and stats["rows_rejected"] == 1
    assert stats["rejected_by_reason"] == {"null embedding": 1}
    assert stats["unsafe_by_column"] == {"p": 5}
    # Valid scores in [0, 1] are binned; raw-output heads' values outside it are counted apart.
    assert stats["histograms"] == {"p": [1, 1, 1, 0, 0, 2, 1, 0, 0, 1]} and stats["outside_0_1"] == {"p": [1, 1]}
    # every stage of a task is timed, wall and CPU (executor/stages.py); "model" only where a scorer was built
    assert set(stats["stage_seconds"]) - {"model"} == set(stats["stage_cpu_seconds"]) - {"model"} \
        == {"open", "read", "decode", "score", "encode", "write", "commit"}
    out = tmp_path / "out"
    assert stats["outputs"] == ["_rejected/a.parquet", "safe/a.parquet", "unsafe/a.parquet"]
    assert files_under(out) == sorted(stats["outputs"] + [f"{TASKS_DIR}/{task.task_id}.json",
                                                          f"{MANIFEST_DIR}/{task.task_id}.json"])
    assert json.loads((out / MANIFEST_DIR / f"{task.task_id}.json").read_text()) == {
        "task_id": task.task_id, "rel": "a.parquet", "run_id": None, "files": stats["outputs"]}
    assert {rel: pq.read_table(out / rel).num_rows for rel in stats["outputs"]} == {
        "_rejected/a.parquet": 1, "safe/a.parquet": 4, "unsafe/a.parquet": 5}
    assert pq.read_table(out / "unsafe" / "a.parquet").column("key").to_pylist() == ["k3", "k4", "k5", "k7", "k9"]
    assert json.loads((out / TASKS_DIR / f"{task.task_id}.json").read_text()) == json.loads(json.dumps(stats))


@dataclasses.dataclass
class Recording:
    """``open_filesystem`` seam: the real local filesystem, with every write-open and move logged."""

    log: list

    def __call__(self, url, storage_options=None):
        fs, root = filesystem(url, storage_options)
        return RecordingFilesystem(fs, self.log), root


class RecordingFilesystem:
    def __init__(self, fs, log):
        self._fs, self._log = fs, log

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self._log.append(("write", path))
        return self._fs.open(path, mode, **kwargs)

    def mv(self, source, target, **kwargs):
        self._log.append(("move", target))
        return self._fs.mv(source, target, **kwargs)


def test_the_state_file_is_written_last(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    log = []
    Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory(), open_filesystem=Recording(log))(task)
    state = str(tmp_path / "out" / TASKS_DIR / f"{task.task_id}.json")
    # Written whole: aside, then moved onto its name, after every output file was moved into place.
    assert log[-1] == ("move", state) and [entry for entry in log if entry[1] == state] == [log[-1]]
    assert log[-2][0] == "write" and "_clip_nsfw_aside." in log[-2][1]
    # The manifest before any data file (it names them), the state after all of them.
    manifest = str(tmp_path / "out" / MANIFEST_DIR / f"{task.task_id}.json")
    assert [target for action, target in log if action == "move"] == [manifest] + [
        str(tmp_path / "out" / rel) for rel in ("_rejected/a.parquet", "safe/a.parquet", "unsafe/a.parquet")] + [state]


@dataclasses.dataclass
class FailingMove:
    """``open_filesystem`` seam: the local filesystem, but moving a file into place fails."""

    def __call__(self, url, storage_options=None):
        fs, root = filesystem(url, storage_options)
        return NoMove(fs), root


class NoMove:
    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def mv(self, source, target, **kwargs):
        raise PermissionError(f"injected: cannot move to {target}")


def test_a_failed_commit_is_a_task_error_naming_the_file_and_leaves_nothing(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory(), open_filesystem=FailingMove())
    with pytest.raises(TaskError, match=rf"^task a.parquet \({tmp_path}/in/a.parquet\) failed: PermissionError: "
                                        "injected: cannot move to"):
        worker(task)
    assert files_under(tmp_path / "out") == []  # no final file, no temp file, no state file


def test_a_lost_lease_stops_the_commit(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path, run_id="run-1"), (HEAD,), make_scorer=FirstValueFactory())
    with pytest.raises(OutputError, match="run run-1 no longer holds the lease .* held by no run"):
        worker(task)
    assert files_under(tmp_path / "out") == []


def changed_after_planning(tmp_path, index):
    """Run task ``index`` of a file planned with row groups 0, 1, 2 and then rewritten as one row group."""
    write_input(tmp_path / "in", row_group=4)
    tasks = only_task(tmp_path, rows_per_task=4)
    write_input(tmp_path / "in", row_group=100)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    try:
        with pytest.raises(InputError, match=rf"^cannot read {tmp_path}/in/a.parquet: it now has 1 row group\(s\), "
                                             rf"the plan reads row group {index}: the file changed during the run"):
            worker(tasks[index])
    finally:
        assert files_under(tmp_path / "out") == []


def test_a_file_changed_after_planning_is_an_input_error(tmp_path):
    changed_after_planning(tmp_path, 1)


def test_a_file_that_lost_several_row_groups_is_an_input_error(tmp_path):
    changed_after_planning(tmp_path, 2)


def test_a_file_that_is_not_parquet_any_more_is_an_input_error(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    (tmp_path / "in" / "a.parquet").write_bytes(b"gone")
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    with pytest.raises(InputError, match=rf"^cannot read {tmp_path}/in/a.parquet: ArrowInvalid"):
        worker(task)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_a_corrupt_page_fails_the_task_naming_the_file_and_leaves_nothing(tmp_path):
    write_input(tmp_path / "in", first=[0.1] * 400, row_group=100)
    tasks = only_task(tmp_path)
    path = tmp_path / "in" / "a.parquet"
    page = pq.read_metadata(path).row_group(2).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[page:page + 64] = b"\xab" * 64  # a page header no reader can decode
    path.write_bytes(bytes(data))
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    # pyarrow's own verdict on the bytes (not a failed read): permanent, one line naming file and row group
    with pytest.raises(DamagedInputError, match=rf"^{tmp_path}/in/a.parquet is damaged: row group 2: .*thrift"):
        worker(tasks[0])
    # Rows of the first row groups were written to temp files before the error: all aborted.
    assert files_under(tmp_path / "out") == []


def test_row_ids_are_the_source_file_and_the_row_in_it(tmp_path):
    write_input(tmp_path / "in", row_group=4)
    tasks = only_task(tmp_path, rows_per_task=4)
    config = task_config(tmp_path, mode="scores", write_columns=(), row_ids=True)
    Worker(config, (HEAD,), make_scorer=FirstValueFactory())(tasks[1])  # rows 4..7
    sidecar = pq.read_table(tmp_path / "out" / tasks[1].rel)
    assert sidecar.column_names == ["source_file", "row_index", "p", "why"]
    assert sidecar.column("source_file").to_pylist() == [str(tmp_path / "in" / "a.parquet")] * 4
    assert sidecar.column("row_index").to_pylist() == [4, 5, 6, 7]
    assert sidecar.column("p").to_pylist() == np.float32(FIRST[4:8]).tolist()


def test_the_worker_crosses_to_executors_by_pickle(tmp_path):
    config = task_config(tmp_path)
    default = Worker(config, (HEAD,))
    restored = pickle.loads(pickle.dumps(default))
    assert restored == default and restored.make_scorer is scorer_for and restored.open_filesystem is filesystem
    seamed = Worker(config, (HEAD,), make_scorer=FirstValueFactory(dim=4))
    assert pickle.loads(pickle.dumps(seamed)) == seamed != default
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    stats = pickle.loads(pickle.dumps(seamed))(task)  # the copy works as the original
    assert stats["rows_written"] == {"safe": 4, "unsafe": 5, "rejected": 1}


def test_process_task_is_the_workers_call(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    stats = process_task(task, Worker(task_config(tmp_path, mode="annotate"), (HEAD,), make_scorer=FirstValueFactory()))
    assert stats["rows_written"] == {"annotated": 10} and stats["outputs"] == ["a.parquet"]


# -------------------------------------------------------------------------------- the default scorer seam


def tiny_head(tmp_path, weight: float) -> Head:
    """A portable one-layer head: score = sigmoid(weight × first value)."""
    kernel = np.zeros((4, 1), np.float32)
    kernel[0, 0] = weight
    weights = PortableWeights.build(name="tiny", dim=4, mean=np.zeros(4), variance=np.ones(4), epsilon=1e-3,
                                    vocabularies={}, kernels=[kernel], biases=[np.zeros(1)], activations=["sigmoid"])
    path = tmp_path / f"tiny-{weight}.npz"
    weights.save(path)
    data = path.read_bytes()
    return Head("tiny", hashlib.sha256(data).hexdigest(), data)


def test_scorer_for_builds_each_head_once_per_process(tmp_path):
    up, down = tiny_head(tmp_path, 10.0), tiny_head(tmp_path, -10.0)
    scorer = scorer_for(up)
    assert scorer_for(up) is scorer and scorer_for(down) is not scorer
    assert scorer.dim == 4 and scorer.name == "tiny" and scorer.sha256 == up.sha256
    x = np.array([[1, 0, 0, 0], [-1, 0, 0, 0]], np.float32)
    assert (scorer(x) > 0.99).tolist() == [True, False] and (scorer_for(down)(x) > 0.99).tolist() == [False, True]
    # The cache is keyed by the payload's sha256: a payload is never parsed twice in one process.
    assert scorer_for(dataclasses.replace(up, data=b"not read again")) is scorer


def test_the_default_worker_scores_with_the_heads_it_was_given(tmp_path):
    write_input(tmp_path / "in", first=[-1.0, 1.0, None, 2.0])
    (task,) = only_task(tmp_path)
    stats = Worker(task_config(tmp_path), (tiny_head(tmp_path, 10.0),))(task)  # make_scorer = scorer_for
    assert stats["rows_written"] == {"safe": 1, "unsafe": 2, "rejected": 1}
    assert pq.read_table(tmp_path / "out" / "unsafe" / "a.parquet").column("key").to_pylist() == ["k1", "k3"]


def test_embeddings_not_kept_are_still_read_for_scoring(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    config = task_config(tmp_path, mode="annotate", write_columns=("key",))
    Worker(config, (HEAD,), make_scorer=FirstValueFactory())(task)
    out = pq.read_table(tmp_path / "out" / "a.parquet")
    assert out.column_names == ["key", "p", "why"]
    assert out.column("p").to_pylist() == [None if v is None else float(np.float32(v)) for v in FIRST]


def test_a_laion_slice_writes_its_own_npy_rows_beside_its_metadata(tmp_path):
    (tmp_path / "in" / "img_emb").mkdir(parents=True)
    (tmp_path / "in" / "metadata").mkdir()
    x = np.zeros((50, 4), np.float32)
    x[:, 0] = np.arange(50) / 64  # exact in float16; row i scores i/64
    np.save(tmp_path / "in" / "img_emb" / "img_emb_0.npy", x)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(50)]}), tmp_path / "in" / "metadata" / "metadata_0.parquet",
                   row_group_size=16)
    tasks = only_task(tmp_path, rows_per_task=20)
    targets = (ScoreTarget("embedding", (ScoreOutput("p", 0, 0.5),)),)
    config = task_config(tmp_path, layout="laion-npy", mode="annotate", targets=targets, write_embeddings=True)
    stats = Worker(config, (HEAD,), make_scorer=FirstValueFactory())(tasks[1])  # rows 20..39
    out = pq.read_table(tmp_path / "out" / tasks[1].rel)
    assert stats["rows_read"] == 20 and out.column_names == ["key", "embedding", "p", "why"]
    assert out.column("key").to_pylist() == [f"k{i}" for i in range(20, 40)]
    assert np.array(out.column("embedding").to_pylist(), np.float32).tolist() == x[20:40].tolist()
    assert out.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    assert out.column("p").to_pylist() == (np.arange(20, 40) / 64).tolist()


@dataclasses.dataclass
class Recorded:
    """``make_scorer``: FirstValue, recording the rows of every call; ``fail`` raised on call ``fail_at``."""

    calls: list
    fail: BaseException | None = None
    fail_at: int = 0

    def __call__(self, head):
        def score(x):
            self.calls.append(len(x))
            if self.fail is not None and len(self.calls) == self.fail_at:
                raise self.fail
            return FirstValue(4)(x)

        score.dim = 4
        return score


def test_batches_are_at_most_batch_rows(tmp_path):
    write_input(tmp_path / "in", row_group=8)
    (task,) = only_task(tmp_path)
    calls = []
    Worker(task_config(tmp_path, batch_rows=3), (HEAD,), make_scorer=Recorded(calls))(task)
    # Row groups 0-7 and 8-9 in batches of at most 3 (3, 3, 2 | 2); row 8 has no embedding: not scored.
    assert calls == [3, 3, 2, 1]


def test_a_bug_in_a_task_is_a_one_line_task_error_and_leaves_nothing(tmp_path):
    write_input(tmp_path / "in", row_group=4)
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=Recorded([], ValueError("bad\n  value"), 2))
    with pytest.raises(TaskError, match=rf"^task a.parquet \({tmp_path}/in/a.parquet\) failed: ValueError: bad value$"):
        worker(task)
    assert files_under(tmp_path / "out") == []


def test_an_interrupted_task_stops_as_interrupted_and_leaves_nothing(tmp_path):
    from clip_nsfw_spark.errors import Terminated

    write_input(tmp_path / "in", row_group=4)
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=Recorded([], Terminated(), 3))
    with pytest.raises(Terminated):  # not wrapped: the job must see the interruption, not a task failure
        worker(task)
    assert files_under(tmp_path / "out") == []


@dataclasses.dataclass
class SecondWriteOpenFails:
    """``open_filesystem`` seam: the local filesystem, but its second open for writing fails (a full disk)."""

    def __call__(self, url, storage_options=None):
        fs, root = filesystem(url, storage_options)
        return WriteOpenFails(fs), root


class WriteOpenFails:
    def __init__(self, fs, fail_at=2):
        self._fs, self.opens, self.fail_at = fs, 0, fail_at

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self.opens += 1
            if self.opens == self.fail_at:
                raise OSError(f"injected: no space left to open {path}")
        return self._fs.open(path, mode, **kwargs)


@dataclasses.dataclass
class ThirdWriteOpenFails:
    """``open_filesystem`` seam: the third open for writing fails. In split mode the safe and unsafe files are
    opened with the task; the rejected rows' file is opened when the first rejected row is written: with
    overlap, in the write-behind thread."""

    def __call__(self, url, storage_options=None):
        fs, root = filesystem(url, storage_options)
        return WriteOpenFails(fs, fail_at=3), root


def test_a_write_that_fails_while_batches_are_written_leaves_nothing_and_no_thread(tmp_path):
    import threading

    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory(),
                    open_filesystem=ThirdWriteOpenFails())
    with pytest.raises(TaskError, match=r"injected: no space left to open .*\.parquet"):
        worker(task)
    assert files_under(tmp_path / "out") == []
    assert not [t for t in threading.enumerate() if t.name.startswith("clip-nsfw-")]


def test_a_task_that_cannot_open_its_outputs_leaves_no_temp_file(tmp_path):
    write_input(tmp_path / "in")
    (task,) = only_task(tmp_path)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory(),
                    open_filesystem=SecondWriteOpenFails())
    with pytest.raises(TaskError, match="injected: no space left"):
        worker(task)
    assert files_under(tmp_path / "out") == []


def test_a_file_that_grew_since_planning_is_refused_before_anything_is_written(tmp_path):
    """The file keeps its two row groups but holds more rows than planned: the task reads its footer, sees
    that the row groups it was given hold other rows, and stops before writing anything."""
    write_input(tmp_path / "in", row_group=5)  # 10 rows, 2 row groups: one task planned for 10 rows
    (task,) = only_task(tmp_path)
    write_input(tmp_path / "in", first=FIRST * 3, row_group=15)  # 30 rows, still 2 row groups
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    with pytest.raises(InputChangedError, match=rf"^cannot read {tmp_path}/in/a.parquet: its row groups \[0, 1\] "
                                                r"now hold 30 rows, the plan counted 10: the file changed since it "
                                                r"was planned\. Rerun with --resume"):
        worker(task)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_a_batch_state_is_written_only_while_the_run_holds_the_lease(tmp_path):
    write_input(tmp_path / "in", row_group=4)
    tasks = only_task(tmp_path, rows_per_task=4)
    worker = Worker(task_config(tmp_path), (HEAD,), make_scorer=FirstValueFactory())
    results = [worker(task) for task in tasks]
    worker.record_together(results)
    (batch,) = (tmp_path / "out" / TASKS_DIR).glob("_batch-*.json")
    assert [state["task_id"] for state in json.loads(batch.read_text())["states"]] == [t.task_id for t in tasks]
    batch.unlink()
    lost = Worker(task_config(tmp_path, run_id="run-1"), (HEAD,), make_scorer=FirstValueFactory())
    lost.record_together(results)  # run-1 holds no lease here: nothing written, and no error (only a copy)
    assert not list((tmp_path / "out" / TASKS_DIR).glob("_batch-*.json"))
