"""Evaluate NSFW models on labelled embeddings: metrics, threshold sweep, per-class breakdown, plots, report.

Labelled data comes in two layouts:

* LAION's test-set layout: one folder per class, each with ``img_emb/img_emb_N.npy`` (optionally
  ``metadata_N.parquet`` beside it). Class → label comes from ``class_labels`` (default: porn, hentai,
  sexy → 1 (NSFW); neutral, drawings → 0).
* parquet with an embedding column and a label column (0/1, booleans, or strings mapped by
  ``class_labels``). The label's value is also its class for the per-class breakdown.

Metrics come from scikit-learn; plots from matplotlib (Agg backend, PNG); the report is JSON + Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.scoring.embeddings import decode
from clip_nsfw_spark.errors import ConfigError, InputError, MissingDependencyError

DEFAULT_CLASS_LABELS = {"porn": 1, "hentai": 1, "sexy": 1, "neutral": 0, "drawings": 0}
DEFAULT_THRESHOLDS = (0.1, 0.45, 0.5)
SWEEP = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))


@dataclasses.dataclass
class Labelled:
    """Embeddings (n, d) float16/32, labels int (n,) in {0, 1}, and each row's class name (n,)."""

    embeddings: np.ndarray
    labels: np.ndarray
    classes: np.ndarray


def load_labelled(path: str | Path, class_labels: dict | None = None, embedding_column: str | None = None,
                  label_column: str = "label") -> Labelled:
    """Read labelled embeddings from class folders or parquet (see the module docstring)."""
    mapping = dict(DEFAULT_CLASS_LABELS if class_labels is None else class_labels)
    root = Path(path)
    if not root.exists():
        raise InputError(f"labelled data {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "img_emb").is_dir()) if root.is_dir() else []
    if class_dirs:
        unknown = [p.name for p in class_dirs if p.name not in mapping]
        if unknown:
            raise InputError(f"no label for class folder(s) {', '.join(unknown)}; known: {mapping}. "
                             "Give --class-label NAME=0|1 for each.")
        parts, labels, classes = [], [], []
        for folder in class_dirs:
            files = sorted((folder / "img_emb").glob("img_emb_*.npy"),
                           key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
            for npy in files:
                x = np.load(npy, allow_pickle=False)
                parts.append(x)
                labels.append(np.full(len(x), int(mapping[folder.name])))
                classes.append(np.full(len(x), folder.name, dtype=object))
        return Labelled(np.concatenate(parts), np.concatenate(labels), np.concatenate(classes))
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise InputError(f"{root} holds neither class folders with img_emb/ nor parquet files")
    parts, labels, classes = [], [], []
    for file in files:
        table = pq.read_table(file)
        if label_column not in table.column_names:
            raise InputError(f"label column {label_column!r} not in {file}; columns: {', '.join(table.column_names)}")
        column = embedding_column or next((f.name for f in table.schema if f.name != label_column
                                           and str(f.type).startswith(("list", "large_list", "fixed_size_list"))), None)
        if column is None:
            raise InputError(f"no embedding column in {file}; name it with --embedding-column")
        raw = table.column(label_column).to_pylist()
        values, ok, reasons = decode(table.column(column), len(table.column(column)[0]))
        if not ok.all():
            raise InputError(f"{file}: {int((~ok).sum())} rows cannot be scored (first: {next(r for r in reasons if r)})")
        parts.append(values)
        labels.append(np.array([_label(v, mapping, file) for v in raw]))
        classes.append(np.array([str(v) for v in raw], dtype=object))
    return Labelled(np.concatenate(parts), np.concatenate(labels), np.concatenate(classes))


def _label(value, mapping: dict, where) -> int:
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return int(value)
    if str(value) in mapping:
        return int(mapping[str(value)])
    raise InputError(f"label {value!r} in {where} is neither 0/1 nor a mapped class ({mapping})")


# ------------------------------------------------------------------------------------------------ metrics


def metrics_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Confusion matrix and the usual rates when unsafe ⇔ score ≥ threshold."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    predicted = (np.asarray(scores, np.float64) >= float(threshold)).astype(int)  # exactly, as the job compares
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {"threshold": float(threshold), "accuracy": float(accuracy_score(labels, predicted)),
            "precision": float(precision_score(labels, predicted, zero_division=0)),
            "recall": float(recall_score(labels, predicted, zero_division=0)),
            "f1": float(f1_score(labels, predicted, zero_division=0)),
            "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}}


def threshold_for(scores: np.ndarray, labels: np.ndarray, recall: float | None = None,
                  precision: float | None = None) -> float | None:
    """The highest threshold whose recall ≥ ``recall``, or the lowest whose precision ≥ ``precision``."""
    from sklearn.metrics import precision_recall_curve

    p, r, t = precision_recall_curve(labels, scores)
    p, r = p[:-1], r[:-1]  # the last point has no threshold
    if recall is not None:
        ok = np.flatnonzero(r >= recall)
        return float(t[ok.max()]) if len(ok) else None
    ok = np.flatnonzero(p >= precision)
    return float(t[ok.min()]) if len(ok) else None


def summarize(scores: np.ndarray, data: Labelled, thresholds, recall=None, precision=None) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    per_class = {}
    for name in sorted(set(data.classes)):
        mask = data.classes == name
        per_class[name] = {"rows": int(mask.sum()), "label": int(data.labels[mask][0]),
                           "flagged": {str(t): float((scores[mask].astype(np.float64) >= t).mean())
                                       for t in thresholds},
                           "mean_score": float(scores[mask].mean())}
    found = {}
    if recall is not None:
        found["for_recall"] = {"recall": recall, "threshold": threshold_for(scores, data.labels, recall=recall)}
    if precision is not None:
        found["for_precision"] = {"precision": precision,
                                  "threshold": threshold_for(scores, data.labels, precision=precision)}
    return {"rows": int(len(scores)), "positives": int(data.labels.sum()),
            "roc_auc": float(roc_auc_score(data.labels, scores)),
            "pr_auc": float(average_precision_score(data.labels, scores)),
            "at_thresholds": [metrics_at(scores, data.labels, t) for t in thresholds],
            "sweep": [metrics_at(scores, data.labels, t) for t in SWEEP],
            "per_class": per_class, **found}


# -------------------------------------------------------------------------------------------------- plots


def plot(results: dict, scores: dict, data: Labelled, out: Path) -> dict[str, str]:
    """ROC, PR, per-class score histograms and threshold → precision/recall, as PNG files in ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("plots need matplotlib: pip install 'clip-nsfw-spark[evaluate]'") from err
    from sklearn.metrics import precision_recall_curve, roc_curve

    files = {}
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(data.labels, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {results[name]['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(fontsize=7)
    files["roc"] = _save(fig, out / "roc.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, s in scores.items():
        p, r, _ = precision_recall_curve(data.labels, s)
        ax.plot(r, p, label=f"{name} (AP {results[name]['pr_auc']:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.legend(fontsize=7)
    files["pr"] = _save(fig, out / "pr.png")

    first = next(iter(scores))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted(set(data.classes)):
        ax.hist(scores[first][data.classes == name], bins=np.linspace(0, 1, 41), alpha=0.5, label=name)
    ax.set(xlabel=f"score ({first})", ylabel="rows", title="Scores per class", yscale="log")
    ax.legend(fontsize=7)
    files["histograms"] = _save(fig, out / "histograms.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in scores:
        sweep = results[name]["sweep"]
        ts = [m["threshold"] for m in sweep]
        ax.plot(ts, [m["precision"] for m in sweep], label=f"precision {name}")
        ax.plot(ts, [m["recall"] for m in sweep], "--", label=f"recall {name}")
    ax.set(xlabel="threshold (unsafe ⇔ score ≥ threshold)", ylabel="rate", title="Threshold vs precision/recall")
    ax.legend(fontsize=7)
    files["threshold"] = _save(fig, out / "threshold.png")
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# ------------------------------------------------------------------------------------------- large data


def score_with_job(model: str, data_path: str, scratch: Path, runner, embedding_column: str | None,
                   label_column: str, class_labels: dict | None) -> tuple[np.ndarray, Labelled]:
    """Score a parquet labelled set with the scoring job (``runner``: Spark); only labels and scores come
    back to the driver, never the embeddings. Returns (scores, labels without embeddings)."""
    from clip_nsfw_spark.driver.config import JobConfig
    from clip_nsfw_spark.driver.job import run_job

    mapping = dict(DEFAULT_CLASS_LABELS if class_labels is None else class_labels)
    # replace_scores: a LAION-style set already has a punsafe column; the evaluation is of this model's scores
    run_job(JobConfig(input=str(data_path), output=str(scratch), model=model, overwrite=True, replace_scores=True,
                      embedding_columns=(embedding_column,) if embedding_column else ()), runner=runner)
    files = sorted(p for p in scratch.rglob("*.parquet") if not p.relative_to(scratch).parts[0].startswith("_"))
    table = pa.concat_tables([pq.read_table(p, columns=["punsafe", "nsfw_reject_reason", label_column]) for p in files])
    if table.column("nsfw_reject_reason").null_count != len(table):
        raise InputError(f"{data_path}: some rows cannot be scored (see {scratch}); fix them before evaluating")
    raw = table.column(label_column).to_pylist()
    labelled = Labelled(np.empty((len(raw), 0), np.float32), np.array([_label(v, mapping, data_path) for v in raw]),
                        np.array([str(v) for v in raw], dtype=object))
    return table.column("punsafe").to_numpy(), labelled


# ---------------------------------------------------------------------------------------------- the command


def evaluate(models: list[str], data_path: str, out: str | Path, thresholds=DEFAULT_THRESHOLDS,
             compare: bool = False, recall: float | None = None, precision: float | None = None,
             class_labels: dict | None = None, embedding_column: str | None = None,
             label_column: str = "label", scores_fn=None, labelled: Labelled | None = None,
             runner=None) -> dict:
    """Score ``data_path`` with each model (and, with ``compare``, its float16-quantised copy); write
    ``report.json``, ``report.md`` and the PNG plots to ``out``; return the report.

    ``scores_fn(model, embeddings) → scores`` replaces in-process scoring (the Spark path uses it);
    ``labelled`` gives the data in memory (``data_path`` is then only its description). ``runner`` (a
    Spark runner, see spark/runner.py) scores parquet data with the job instead of in this process.
    """
    from clip_nsfw_spark.api import load_scorer

    bad = [f"threshold {t!r}" for t in thresholds if not 0 <= t <= 1]
    bad += [f"{name} {value!r}" for name, value in (("recall", recall), ("precision", precision))
            if value is not None and not 0 < value <= 1]
    if bad:  # checked before any scoring: a score is in [0, 1], a recall or precision in (0, 1]
        raise ConfigError(f"evaluate: {', '.join(bad)} out of range: thresholds are in [0, 1], recall and "
                          "precision in (0, 1]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, np.ndarray] = {}
    if runner is not None:  # large sets: the scoring job (Spark) scores, the driver sees labels and scores
        if compare:
            raise InputError("--compare needs the embeddings in memory; run it without --spark on a sample")
        from clip_nsfw_spark.models.registry import KIND_PROMPTS, REGISTRY, canonical_name

        prompt_heads = [m for m in models if REGISTRY.get(canonical_name(str(m)) or "") is not None
                        and REGISTRY[canonical_name(str(m))].kind == KIND_PROMPTS]
        if prompt_heads:  # the job scores one MLP head per run until it runs several heads
            raise InputError(f"--spark scores MLP heads only; evaluate {', '.join(prompt_heads)} without --spark")
        for model in models:
            scores[model], data = score_with_job(model, data_path, out / "_scores", runner, embedding_column,
                                                 label_column, class_labels)
        models = []
    else:
        data = labelled or load_labelled(data_path, class_labels, embedding_column, label_column)
    for model in models:
        score = scores_fn or (lambda m, x: load_scorer(m)(x))
        scores[model] = score(model, data.embeddings)
        if compare:
            quantised = data.embeddings.astype(np.float16)
            scores[f"{model} (float16-quantised input)"] = score(model, quantised)
            scores[f"{model} (as-is input)"] = scores[model]
    results = {name: summarize(s, data, thresholds, recall, precision) for name, s in scores.items()}
    plots = plot(results, scores, data, out)
    report = {"data": str(data_path), "rows": int(len(data.labels)), "positives": int(data.labels.sum()),
              "thresholds": list(thresholds), "models": results, "plots": plots}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of {', '.join(report['models'])}", "",
             f"Data: `{report['data']}` — {report['rows']:,} rows, {report['positives']:,} labelled NSFW.", "",
             "| model | ROC-AUC | PR-AUC |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['roc_auc']:.4f} | {r['pr_auc']:.4f} |" for name, r in report["models"].items()]
    for name, r in report["models"].items():
        lines += ["", f"## {name}", "", "| threshold | accuracy | precision | recall | F1 | TN | FP | FN | TP |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in r["at_thresholds"]:
            c = m["confusion"]
            lines.append(f"| {m['threshold']:.2f} | {m['accuracy']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} | "
                         f"{m['f1']:.4f} | {c['tn']} | {c['fp']} | {c['fn']} | {c['tp']} |")
        lines += ["", "Share of each class flagged unsafe:", "",
                  "| class | label | rows | mean score | " + " | ".join(f"≥ {t}" for t in report["thresholds"]) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(report["thresholds"])]
        for cls, info in r["per_class"].items():
            lines.append(f"| {cls} | {info['label']} | {info['rows']} | {info['mean_score']:.4f} | "
                         + " | ".join(f"{info['flagged'][str(t)]:.3f}" for t in report["thresholds"]) + " |")
        for key in ("for_recall", "for_precision"):
            if key in r:
                target = r[key]
                lines.append(f"\nThreshold reaching {key.split('_')[1]} ≥ {target[key.split('_')[1]]}: "
                             f"{target['threshold'] if target['threshold'] is None else round(target['threshold'], 4)}")
        lines += ["", "<details><summary>Threshold sweep</summary>", "",
                  "| threshold | precision | recall | F1 |", "|---:|---:|---:|---:|"]
        lines += [f"| {m['threshold']:.2f} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} |" for m in r["sweep"]]
        lines += ["", "</details>"]
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in report["plots"].items()]
    return "\n".join(lines) + "\n"
