"""The run's report (``_clip_nsfw_report.json``): the task statistics summed, with the config and the heads."""

from __future__ import annotations

import numpy as np

from clip_nsfw_spark.contract import TaskConfig

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.planner import Plan
from clip_nsfw_spark.models.registry import REGISTRY, canonical_name


def build_report(config: JobConfig, tasks: TaskConfig, plan: Plan, heads: list, totals: dict, durations, resumed,
                 resume_actions=None, rows_run: int | None = None, cores: int | None = None,
                 run_totals: dict | None = None, outside_workers: dict | None = None) -> dict:
    """The JSON report: config (secrets redacted), heads, row counts by stream and reason, per-head unsafe
    counts and score histograms, timing. ``totals`` is every task's stats summed (contract.add_figures), the
    resumed ones' included; ``rows_run`` the rows of the tasks this run ran (all, when not given), which
    the throughput counts; ``heads`` are contract.Head (name, sha256, dim, source, threshold); ``model``
    describes the first head (as when a run had one). ``run_totals``: the stats of this run's tasks alone,
    summed, and ``cores`` the cores its runner had: the account of the task phase's core-seconds
    (``task_phase_core_seconds``), its idle split by ``outside_workers`` where the runner measured them."""
    bins = config.histogram_bins
    written: dict[str, int] = dict(totals.get("rows_written") or {})
    rejected: dict[str, int] = dict(totals.get("rejected_by_reason") or {})
    stages: dict[str, float] = dict(totals.get("stage_seconds") or {})
    histograms = {name: np.asarray((totals.get("histograms") or {}).get(name) or np.zeros(bins), dtype=np.int64)
                  for name in tasks.score_columns}
    outside = {name: list((totals.get("outside_0_1") or {}).get(name) or [0, 0]) for name in tasks.score_columns}
    flagged = {name: (totals.get("unsafe_by_column") or {}).get(name, 0) for name in tasks.score_columns}
    rows_read = totals.get("rows_read") or 0
    unsafe = totals.get("rows_unsafe") or 0
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
                                       "score_columns": list(tasks.score_columns),
                                       "overlap_used": tasks.overlap},  # "overlap" resolved (job.overlap_wanted)
        "output": tasks.output,  # the output's canonical URL: where the run wrote, however it was spelled
        "model": {k: first[k] for k in ("name", "sha256", "dim", "source", "clip_model")},
        "heads": head_reports,
        # Tasks planned from the listing count their rows when they run: every task is complete here, so the
        # rows read are the input's rows.
        "input": {"layout": plan.layout, "tasks": len(plan.tasks),
                  "rows": rows_read if plan.listed else plan.total_rows,
                  "tasks_planned_from_listing": plan.listed,
                  "skipped_files": len(plan.skipped), "skipped_examples": [f"{p}: {why}" for p, why in plan.skipped[:10]]},
        "rows": {"read": rows_read, "written": written, "unsafe": unsafe, "safe": rows_read - unsafe - n_rejected,
                 "rejected": n_rejected, "rejected_by_reason": rejected,
                 "kept": written.get("kept") if config.mode == "filter" else None},
        "threshold": config.threshold,
        # Every score column together (raw heads' values outside [0, 1] are in the heads' below_0/above_1).
        "score_histogram": {"edges": edges, "counts": sum(histograms.values(), np.zeros(bins, np.int64)).tolist()},
        "durations_seconds": {k: round(v, 3) for k, v in durations.items()},
        "task_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "task_phase_core_seconds": core_seconds(run_totals or {}, cores, durations.get("run"),
                                                totals.get("rows_read") if rows_run is None else rows_run,
                                                outside_workers),
        # Rows scored by this run over its task phase: a resume's earlier rows are not this run's work.
        "throughput_rows_per_second": round((rows_read if rows_run is None else rows_run) / durations["run"], 1)
        if durations.get("run") and (rows_run is None or rows_run > 0) else None,
        "tasks_resumed": resumed,
        "resume": resume_actions,
        "worker_max_rss_mb": totals.get("worker_max_rss_mb", 0),
    }


def core_seconds(run_totals: dict, cores: int | None, run_seconds: float | None, rows: int | None,
                 outside_workers: dict | None = None) -> dict | None:
    """Where the task phase's ``cores × run seconds`` went: the CPU seconds of each stage of this run's tasks
    and worker processes (executor/stages.py; in pipeline order), and the rest, ``idle``: cores waiting (for
    storage, for Spark to start a task, for the last tasks to end) or busy outside the Python workers
    (Spark's JVM, PySpark's daemon). None when the phase ran nothing, or its runner did not tell its cores.

    ``rows_per_core_second``: the rows the phase scored over its core-seconds, to set against the scoring
    kernel's rows per second on one thread (bench/bench.py).

    ``idle_by_source``, where the runner measured ``outside_workers`` around its Spark tasks
    (spark/runner._whole_machine_jvm: a local master on every CPU of a Linux machine): idle split into
    ``machine_idle`` (no CPU busy: waiting for storage, for Spark to start a task, for the last tasks),
    ``stolen`` (by the hypervisor), ``driver`` (this process: progress, the lease), ``jvm`` (Spark's:
    scheduling, the tasks' bytes to and from the workers), ``unmeasured`` (cores × the phase's seconds outside
    that span: packing the tasks, starting and ending the progress watcher) and ``other``, the rest: busy CPU
    outside the stages in the Python workers (PySpark's own code in them, threads no clock follows), PySpark's
    daemon, the kernel's threads (page-cache reclaim and writeback), other processes. Absent elsewhere."""
    from clip_nsfw_spark.executor.stages import PROCESS_STAGES, TASK_STAGES

    if not cores or not run_seconds or not rows:
        return None
    cpu = run_totals.get("stage_cpu_seconds") or {}
    order = [s for s in PROCESS_STAGES if s != "transfer"] + list(TASK_STAGES) + ["transfer"]
    by_stage = {stage: round(cpu.get(stage, 0.0), 3) for stage in order}
    by_stage |= {stage: round(seconds, 3) for stage, seconds in cpu.items() if stage not in by_stage}
    total = cores * run_seconds
    # negative where the stages used more cores than the runner told (a cluster that grew, a local run whose
    # threads took every core of the machine)
    by_stage["idle"] = round(total - sum(cpu.values()), 3)
    account = {"cores": cores, "wall_seconds": round(run_seconds, 3), "core_seconds": round(total, 3),
               "by_stage": by_stage, "rows_per_core_second": round(rows / total, 1)}
    if outside_workers:
        sources = {name: round(outside_workers[name], 3) for name in ("machine_idle", "stolen", "driver", "jvm")}
        sources["unmeasured"] = round(cores * max(0.0, run_seconds - outside_workers["window_seconds"]), 3)
        sources["other"] = round(by_stage["idle"] - sum(sources.values()), 3)
        account["idle_by_source"] = sources
    return account
