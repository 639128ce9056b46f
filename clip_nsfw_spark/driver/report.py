"""The run's report (``_clip_nsfw_report.json``): the task statistics summed, with the config and the heads."""

from __future__ import annotations

import numpy as np

from clip_nsfw_spark.contract import TaskConfig

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.planner import Plan
from clip_nsfw_spark.models.registry import REGISTRY, canonical_name


def build_report(config: JobConfig, tasks: TaskConfig, plan: Plan, heads: list, stats, durations, resumed,
                 resume_actions=None) -> dict:
    """The JSON report: config (secrets redacted), heads, row counts by stream and reason, per-head unsafe
    counts and score histograms, timing. ``heads`` are job.RunHead (name, sha256, dim, source, threshold);
    ``model`` describes the first head (as when a run had one)."""
    written: dict[str, int] = {}
    rejected: dict[str, int] = {}
    stages: dict[str, float] = {}
    bins = config.histogram_bins
    histograms = {name: np.zeros(bins, dtype=np.int64) for name in tasks.score_columns}
    outside = {name: [0, 0] for name in tasks.score_columns}
    flagged = {name: 0 for name in tasks.score_columns}
    for s in stats:
        for stream, n in s["rows_written"].items():
            written[stream] = written.get(stream, 0) + n
        for reason, n in s["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + n
        for stage, seconds in s["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        for name in histograms:
            histograms[name] += np.asarray(s["histograms"][name], dtype=np.int64)
            outside[name] = [a + b for a, b in zip(outside[name], s["outside_0_1"][name])]
            flagged[name] += s["unsafe_by_column"][name]
    rows_read = sum(s["rows_read"] for s in stats)
    unsafe = sum(s["rows_unsafe"] for s in stats)
    n_rejected = sum(rejected.values())
    edges = np.linspace(0, 1, bins + 1).round(6).tolist()
    columns_of = {index: [o.score_column for t in tasks.targets for o in t.outputs if o.head == index]
                  for index in range(len(heads))}
    head_reports = []
    for index, head in enumerate(heads):
        spec = REGISTRY.get(canonical_name(head.name) or "")
        head_reports.append({
            "name": head.name, "sha256": head.sha256, "dim": head.dim, "source": head.source,
            "clip_model": spec.clip_model if spec else None, "threshold": head.threshold,
            "score_columns": {name: {"unsafe": flagged[name], "histogram": histograms[name].tolist(),
                                     "below_0": outside[name][0], "above_1": outside[name][1]}
                              for name in columns_of[index]}})
    first = head_reports[0]
    return {
        "status": "succeeded",
        "config": config.redacted() | {"layout": tasks.layout, "embedding_columns": list(tasks.embedding_columns),
                                       "score_columns": list(tasks.score_columns)},
        "output": tasks.output,  # the output's canonical URL: where the run wrote, however it was spelled
        "model": {k: first[k] for k in ("name", "sha256", "dim", "source", "clip_model")},
        "heads": head_reports,
        "input": {"layout": plan.layout, "tasks": len(plan.tasks), "rows": plan.total_rows,
                  "skipped_files": len(plan.skipped), "skipped_examples": [f"{p}: {why}" for p, why in plan.skipped[:10]]},
        "rows": {"read": rows_read, "written": written, "unsafe": unsafe, "safe": rows_read - unsafe - n_rejected,
                 "rejected": n_rejected, "rejected_by_reason": rejected,
                 "kept": written.get("kept") if config.mode == "filter" else None},
        "threshold": config.threshold,
        # Every score column together (raw heads' values outside [0, 1] are in the heads' below_0/above_1).
        "score_histogram": {"edges": edges, "counts": sum(histograms.values(), np.zeros(bins, np.int64)).tolist()},
        "durations_seconds": {k: round(v, 3) for k, v in durations.items()},
        "task_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "throughput_rows_per_second": round(rows_read / durations["run"], 1) if durations.get("run") else None,
        "tasks_resumed": resumed,
        "resume": resume_actions,
        "worker_max_rss_mb": max((s.get("worker_max_rss_mb", 0) for s in stats), default=0),
    }
