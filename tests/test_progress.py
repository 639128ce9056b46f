"""Progress from the tasks' state files: counts, rows and the rendered line."""

import json

from clip_nsfw_spark.driver.progress import ProgressWatcher
from clip_nsfw_spark.storage.filesystem import filesystem


def test_watcher_counts_completed_tasks_and_rows(tmp_path):
    fs, root = filesystem(str(tmp_path))
    state = tmp_path / "_clip_nsfw_tasks"
    state.mkdir()
    (state / "_job.json").write_text("{}")
    (state / "aaa.json").write_text(json.dumps({"rows_read": 1000}))
    watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", total_tasks=4, total_rows=4000, already={"old"},
                              rows_before=1000, interactive=False)
    watcher.poll()
    (state / "bbb.json").write_text(json.dumps({"rows_read": 500}))
    (state / "ccc.json").write_text("{not json yet")  # a state file still being written is retried later
    watcher.poll()
    assert watcher.seen == {"old", "aaa", "bbb"} and watcher.rows_done == 1500
    line = watcher.line()
    assert "3/4 tasks" in line and "2,500/4,000 rows" in line and "rows/s" in line and "ETA" in line
