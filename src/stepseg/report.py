"""The results report: the paper's Table 1 beside ours, the seed ablation, and figures.

Everything is read from the workflow's files (layout in docs/design.md): per-study metrics
`metrics/{variant}/{split}_per_study.csv`, training logs `models/{variant}/train_log.csv`, and for
the example cases `nifti/{study}/{SUV,SEG}.nii.gz` and each variant's test predictions.
Training-log columns are read generically (every numeric column, grouped by name prefix), so the
report does not break when the training loop logs another term.

The numbers are computed from the per-study metrics alone (`compute_tables`, pure); formatting
them as text (`text_tables`, `markdown_page`, `html_page`) and drawing the figures render them.
"""

from __future__ import annotations

import html
import itertools
import logging
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

from stepseg import gate, metrics, names, nifti
from stepseg.atomic import atomic_file
from stepseg.settings import ReportSettings

log = logging.getLogger(__name__)

SPLITS = names.EVAL_SPLITS
# the split the best variant is reported on, never chosen on
HELD_OUT = "test"
# the splits the best variant may be chosen on, in order of preference; the first the metrics
# hold is used: out-of-fold predictions where cross-validation gives them, else validation
SELECTION_SPLITS = ("oof", "val")
# the pairwise comparison's last "split": every evaluated study (out-of-fold or val, and test;
# each study is in one split), the most studies a verdict between two variants can rest on
POOLED = "pooled"
SET_LABELS = {
    "oof": "Out-of-fold",
    "val": "Validation set",
    "test": "Preliminary test set",
    POOLED: "Pooled (every evaluated study)",
}
# Liu, Zhong & Mo (autoPET 2022), Table 1: DSC, false positive and false negative volume (ml).
# Their validation row stands beside our out-of-fold one too: both are the selection split,
# on studies the model did not train on (theirs one held-out set, ours every non-test study).
PAPER_TABLE1 = {"val": (0.80, 1.87, 1.14), "test": (0.92, 0.89, 0.53)}
PAPER_TABLE1["oof"] = PAPER_TABLE1["val"]
PAPER_DATA = {
    "oof": "Liu et al. 2022 (paper): their validation set of 40 patients (not cross-validated)",
    "val": "Liu et al. 2022 (paper): their validation set of 40 patients",
    "test": "Liu et al. 2022 (paper): the autoPET 2022 challenge's preliminary test set",
}
HEADLINE = {"dice": "DSC", "fpv_ml": "False Positive (ml)", "fnv_ml": "False Negative (ml)"}
HIGHER_IS_BETTER = {"dice": True, "fpv_ml": False, "fnv_ml": False}
NO_DIFFERENCE = "no difference at 95 %"
# pairwise.csv: one row per (pair of trained variants, split, metric of HEADLINE)
PAIRWISE_COLUMNS = [
    "variant_a", "variant_b", "split", "metric", "n_studies", "mean_difference", "ci_low",
    "ci_high", "wilcoxon_p", "conclusion",
]  # fmt: skip
# autoPET 2022 ranking weights: Dice 50 %, FPV 25 %, FNV 25 % (lower rank is better).
RANK_WEIGHTS = {"dice": 0.5, "fpv_ml": 0.25, "fnv_ml": 0.25}
CASE_NAMES = ("best", "median", "worst")


def load_per_study(metrics_csvs: Mapping[tuple[str, str], str | Path]) -> pd.DataFrame:
    """All per-study tables, keyed by (variant, split), in one frame with those two columns."""
    frames = []
    for (variant, split), path in metrics_csvs.items():
        if split not in SPLITS:
            raise ValueError(f"{path}: split {split!r} is not one of {', '.join(SPLITS)}")
        frame = pd.read_csv(path)
        missing = set(metrics.PER_STUDY_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path} lacks columns {sorted(missing)}")
        frame.insert(0, "split", split)
        frame.insert(0, "variant", variant)
        frames.append(frame)
    if not frames:
        raise ValueError("no metrics tables given")
    table = pd.concat(frames, ignore_index=True)
    table["has_lesions"] = table["has_lesions"].astype(bool)
    return table


def eval_splits(per_study: pd.DataFrame) -> list[str]:
    """The evaluated splits the metrics hold, in the order of `names.EVAL_SPLITS`: the report
    shows what was evaluated, not a fixed list."""
    present = set(per_study["split"])
    unknown = present - set(SPLITS)
    if unknown:
        raise ValueError(f"splits {sorted(unknown)} are not among {', '.join(SPLITS)}")
    return [split for split in SPLITS if split in present]


def selection_split(splits: Collection[str]) -> str:
    """The split the best variant is chosen on: the first of `SELECTION_SPLITS` in `splits`.

    Never the held-out test split, so that the reported test numbers of the chosen variant are
    not flattered by the choice; without a selection split the report refuses to choose.
    """
    for split in SELECTION_SPLITS:
        if split in splits:
            return split
    raise ValueError(
        f"the metrics cover the splits {sorted(splits)}, none of {', '.join(SELECTION_SPLITS)}: "
        f"no split to choose the best variant on ({HELD_OUT} is never used to choose)"
    )


def trained_variants(per_study: pd.DataFrame) -> list[str]:
    """The configured variants with trained models (`<variant>-seed<k>`), in the order the
    metrics list them (the config's): what the pairwise comparison compares."""
    parsed = [names.parse_trained(str(v)) for v in per_study["variant"].unique()]
    return list(dict.fromkeys(variant for variant, seed in parsed if seed is not None))


def summary_table(per_study: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, split): the autoPET aggregate means and lesion/clinical means."""
    rows = []
    for (variant, split), group in per_study.groupby(["variant", "split"], sort=True):
        model, seed = names.parse_trained(str(variant))
        rows.append(
            {"variant": variant, "model": model, "seed": seed, "split": split}
            | metrics.summarise(group)
        )
    return pd.DataFrame(rows)


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd across seeds of each model's headline metrics, per split."""
    rows = []
    in_order = summary.sort_values("split", key=lambda s: s.map(SPLITS.index), kind="stable")
    for (model, split), group in in_order.groupby(["model", "split"], sort=False):
        row: dict[str, object] = {"model": model, "split": split, "n_seeds": len(group)}
        for column in HEADLINE:
            values = group[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else math.nan
            row[f"{column}_sd"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values("model", kind="stable", ignore_index=True)


def paired_comparison(
    per_study: pd.DataFrame, variant_a: str, variant_b: str, split: str
) -> pd.DataFrame:
    """`variant_a` minus `variant_b` per study of `split` (`POOLED`: of every evaluated split;
    each variant's seeds averaged per study), for Dice, FPV and FNV over the studies where both
    are defined: mean difference, its
    95 % t-interval, the Wilcoxon signed-rank p-value and the conclusion the interval supports.
    Empty when either variant has no metrics on `split`.

    A t-interval rather than a bootstrap over studies: at the few lesion studies a split holds,
    a percentile bootstrap is narrower and covers less (in 2000 simulations about 85 % at 5
    normal differences and 78 % at 5 skewed ones, against the t-interval's 96 % and 87 %). Both
    treat the trained models as fixed: the interval covers the choice of studies, not the
    training noise beyond what averaging the seeds removes.
    """
    from scipy import stats

    data = per_study if split == POOLED else per_study[per_study["split"] == split]
    data = data.assign(model=[names.parse_trained(str(v))[0] for v in data["variant"]])
    rows = []
    for column in HEADLINE:
        means = data.groupby(["model", "study"])[column].mean().unstack("model")
        if variant_a not in means or variant_b not in means:
            return pd.DataFrame(columns=PAIRWISE_COLUMNS)
        diff = (means[variant_a] - means[variant_b]).dropna()
        n = len(diff)
        mean = float(diff.mean()) if n else math.nan
        half = (
            float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
            if n > 1
            else math.nan
        )
        p_value = (
            float(stats.wilcoxon(diff, zero_method="zsplit").pvalue)
            if n > 1 and diff.abs().sum() > 0
            else math.nan
        )
        low, high = mean - half, mean + half
        rows.append(
            {"variant_a": variant_a, "variant_b": variant_b, "split": split, "metric": column,
             "n_studies": n, "mean_difference": mean, "ci_low": low, "ci_high": high,
             "wilcoxon_p": p_value,
             "conclusion": conclusion(column, variant_a, variant_b, low, high)}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


def conclusion(column: str, variant_a: str, variant_b: str, low: float, high: float) -> str:
    """Which variant the 95 % interval of `variant_a` - `variant_b` in `column` favours (higher
    Dice, lower FPV and FNV are better); no difference when the interval holds zero."""
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if low <= 0 <= high:
        return NO_DIFFERENCE
    a_higher = low > 0
    return f"{variant_a if a_higher == HIGHER_IS_BETTER[column] else variant_b} better"


def pairwise_comparison(per_study: pd.DataFrame) -> pd.DataFrame:
    """`paired_comparison` of every two trained variants (the earlier in the config's order
    first) on every evaluated split, then pooled over them (with more than one); empty with
    fewer than two trained variants."""
    splits = eval_splits(per_study)
    if len(splits) > 1:
        splits.append(POOLED)
    frames = [
        paired_comparison(per_study, a, b, split)
        for a, b in itertools.combinations(trained_variants(per_study), 2)
        for split in splits
    ]
    frames = [frame for frame in frames if not frame.empty]
    return (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PAIRWISE_COLUMNS)
    )


def ranking_table(summary: pd.DataFrame, split: str = HELD_OUT) -> pd.DataFrame:
    """autoPET-style ranking of our variants: average rank per metric, weighted 50/25/25."""
    table = summary[summary["split"] == split].set_index("variant")[list(HEADLINE)].copy()
    score = pd.Series(0.0, index=table.index)
    for column, weight in RANK_WEIGHTS.items():
        ascending = column != "dice"
        ranks = table[column].rank(ascending=ascending, method="average", na_option="bottom")
        table[f"{column}_rank"] = ranks
        score += weight * ranks
    table["score"] = score
    return table.sort_values(["score", "dice"], ascending=[True, False]).reset_index()


def best_variant(ablation: pd.DataFrame, split: str) -> str:
    """The configured variant with the highest Dice on `split`, its seeds' means averaged (lower
    FPV breaks ties, then the name), so that a variant with more seeds gets no extra draws."""
    return _best(ablation[ablation["split"] == split], "model", "dice_mean", "fpv_ml_mean")


def best_model(summary: pd.DataFrame, variant: str, split: str) -> str:
    """The trained model of `variant` (its seed) with the highest Dice on `split`, lower FPV
    breaking ties: the one whose test predictions the example cases show."""
    rows = summary[(summary["model"] == variant) & (summary["split"] == split)]
    return _best(rows, "variant", "dice", "fpv_ml")


def _best(rows: pd.DataFrame, name: str, dice: str, fpv: str) -> str:
    """`rows`' `name` with the highest `dice` (undefined last), then the lowest `fpv`."""
    ordered = rows.assign(dice_key=rows[dice].fillna(-math.inf)).sort_values(
        ["dice_key", fpv, name], ascending=[False, True, True]
    )
    return str(ordered[name].iloc[0])


def pick_cases(per_study: pd.DataFrame, cases: Sequence[str]) -> dict[str, str]:
    """Best, median and worst study by Dice (lesion studies), or by FPV when none has lesions."""
    unknown = set(cases) - set(CASE_NAMES)
    if unknown:
        raise ValueError(f"unknown mip_cases {sorted(unknown)}; choose from {CASE_NAMES}")
    lesion = per_study[per_study["has_lesions"]]
    if len(lesion):
        ordered = lesion.assign(missed=lesion["fpv_ml"] + lesion["fnv_ml"]).sort_values(
            ["dice", "missed", "study"], ascending=[False, True, True]
        )
    else:
        ordered = per_study.sort_values(["fpv_ml", "study"])
    studies = ordered["study"].tolist()
    position = {"best": 0, "median": (len(studies) - 1) // 2, "worst": len(studies) - 1}
    return {case: studies[position[case]] for case in cases}


def results_table(summary: pd.DataFrame, data_source: str) -> pd.DataFrame:
    """results.csv: the paper's Table 1 rows of the evaluated splits, then every (variant,
    split)'s summary."""
    paper = pd.DataFrame(
        [
            {
                "source": "paper",
                "variant": "Liu et al. 2022",
                "split": split,
                "data": PAPER_DATA[split],
            }
            | dict(zip(HEADLINE, PAPER_TABLE1[split], strict=True))
            for split in SPLITS
            if split in set(summary["split"])
        ]
    )
    ours = summary.assign(
        source="ours", data=[f"our {data_source} {s} split" for s in summary["split"]]
    )
    results = pd.concat([paper, ours], ignore_index=True)
    results.insert(2, "set", results["split"].map(SET_LABELS))
    return results


@dataclass(frozen=True, kw_only=True)
class ReportTables:
    """The report's numbers, computed from the per-study metrics alone (`compute_tables`), so
    that they can be checked without drawing a figure; rendering only formats and draws them."""

    per_study: pd.DataFrame
    summary: pd.DataFrame
    results: pd.DataFrame
    ablation: pd.DataFrame
    ranking: pd.DataFrame
    pairwise: pd.DataFrame  # every two trained variants on every split; empty with fewer
    selection: str  # the split the best variant is chosen on (never HELD_OUT)
    best: str  # the configured variant with the highest Dice on `selection`
    best_model: str  # its model (seed) with the highest Dice on `selection`
    cases: Mapping[str, str]  # each mip case -> its HELD_OUT study of `best_model`


def compute_tables(
    per_study: pd.DataFrame, *, cases: Sequence[str], data_source: str
) -> ReportTables:
    """Every table of the report and the example cases from `load_per_study`'s frame."""
    summary = summary_table(per_study)
    ablation = ablation_table(summary)
    selection = selection_split(eval_splits(per_study))
    best = best_variant(ablation, selection)
    model = best_model(summary, best, selection)
    held_out = per_study[(per_study["variant"] == model) & (per_study["split"] == HELD_OUT)]
    return ReportTables(
        per_study=per_study,
        summary=summary,
        results=results_table(summary, data_source),
        ablation=ablation,
        ranking=ranking_table(summary),
        pairwise=pairwise_comparison(per_study),
        selection=selection,
        best=best,
        best_model=model,
        cases=pick_cases(held_out, cases),
    )


# ---- tables as text ------------------------------------------------------------------------


def _fmt(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_sd(mean: float, sd: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table1_rows(summary: pd.DataFrame, data_source: str) -> pd.DataFrame:
    """The paper's Table 1 layout, with the paper's numbers above ours in each set."""
    rows = []
    for split in [s for s in SPLITS if s in set(summary["split"])]:
        dice, fpv, fnv = PAPER_TABLE1[split]
        paper = [f"{dice:.2f}", f"{fpv:.2f}", f"{fnv:.2f}", "n/a", "n/a"]
        rows.append([SET_LABELS[split], PAPER_DATA[split], *paper])
        ours = summary[summary["split"] == split].sort_values("variant")
        for row in ours.itertuples():
            where = f"ours: {row.variant}, our {data_source} {split} split" + (
                " (not the challenge's test set)" if split == "test" else ""
            )
            rows.append(
                [
                    SET_LABELS[split],
                    where,
                    _fmt(row.dice, 3),
                    _fmt(row.fpv_ml, 2),
                    _fmt(row.fnv_ml, 2),
                    _fmt(row.fpv_lesion_free_ml, 2),
                    f"{row.n_studies} ({row.n_lesion_studies})",
                ]
            )
    columns = [
        "Set",
        "Result",
        *HEADLINE.values(),
        "False Positive in lesion-free studies (ml)",
        "Studies (with lesions)",
    ]
    return pd.DataFrame(rows, columns=columns)


def ablation_rows(ablation: pd.DataFrame) -> pd.DataFrame:
    rows = [
        [
            row.model,
            SET_LABELS[row.split],
            row.n_seeds,
            _mean_sd(row.dice_mean, row.dice_sd, 3),
            _mean_sd(row.fpv_ml_mean, row.fpv_ml_sd, 2),
            _mean_sd(row.fnv_ml_mean, row.fnv_ml_sd, 2),
        ]
        for row in ablation.itertuples()
    ]
    return pd.DataFrame(rows, columns=["Model", "Set", "Seeds", *HEADLINE.values()])


def pairwise_rows(pairwise: pd.DataFrame) -> pd.DataFrame:
    rows = [
        [
            f"{row.variant_a} - {row.variant_b}",
            SET_LABELS[row.split],
            HEADLINE[row.metric],
            row.n_studies,
            _fmt(row.mean_difference, 3),
            f"[{_fmt(row.ci_low, 3)}, {_fmt(row.ci_high, 3)}]",
            _fmt(row.wilcoxon_p, 3),
            row.conclusion,
        ]
        for row in pairwise.itertuples()
    ]
    columns = [
        "Variants (A - B)",
        "Set",
        "Metric",
        "Studies",
        "Mean A - B",
        "95 % t-interval",
        "Wilcoxon p",
        "Conclusion",
    ]
    return pd.DataFrame(rows, columns=columns)


def ranking_rows(ranking: pd.DataFrame) -> pd.DataFrame:
    rows = [
        [
            row.variant,
            _fmt(row.dice, 3),
            _fmt(row.fpv_ml, 2),
            _fmt(row.fnv_ml, 2),
            f"{row.dice_rank:g} / {row.fpv_ml_rank:g} / {row.fnv_ml_rank:g}",
            f"{row.score:.2f}",
        ]
        for row in ranking.itertuples()
    ]
    columns = ["Variant", *HEADLINE.values(), "Ranks (DSC / FP / FN)", "Score"]
    return pd.DataFrame(rows, columns=columns)


def detection_rows(summary: pd.DataFrame) -> pd.DataFrame:
    rows = [
        [
            row.variant,
            SET_LABELS[row.split],
            f"{row.tp_lesions:.2f} / {row.fp_lesions:.2f} / {row.fn_lesions:.2f}",
            f"{_fmt(row.mtv_true_ml, 1)} / {_fmt(row.mtv_pred_ml, 1)}",
            f"{_fmt(row.tlg_true, 1)} / {_fmt(row.tlg_pred, 1)}",
            f"{_fmt(row.suvmax_true, 1)} / {_fmt(row.suvmax_pred, 1)}",
        ]
        for row in summary.sort_values(
            ["split", "variant"], key=lambda s: s.map(SPLITS.index) if s.name == "split" else s
        ).itertuples()
    ]
    columns = [
        "Variant",
        "Set",
        "Lesions TP / FP / FN",
        "MTV true / pred (ml)",
        "TLG true / pred",
        "SUVmax true / pred",
    ]
    return pd.DataFrame(rows, columns=columns)


def markdown_table(table: pd.DataFrame) -> str:
    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def text_tables(tables: ReportTables, data_source: str) -> dict[str, pd.DataFrame]:
    """The tables of results.md and results.html, by title, formatted as text."""
    text = {
        "Table 1 layout: the paper's numbers and ours": table1_rows(tables.summary, data_source),
        "Ablation across seeds (mean ± sd)": ablation_rows(tables.ablation),
        "autoPET-style ranking of our variants on the test split": ranking_rows(tables.ranking),
        "Lesion-wise detection and clinical quantities (mean per study)": detection_rows(
            tables.summary
        ),
    }
    if not tables.pairwise.empty:
        text["Pairwise comparison of the trained variants (seeds averaged per study)"] = (
            pairwise_rows(tables.pairwise)
        )
    return text


def report_notes(
    tables: ReportTables,
    data_source: str,
    folds: int,
    gate_records: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """What the reader must know to read the tables: metrics, sources, the models trained
    (seeds and `folds`), the best variant and its held-out numbers, how the pairwise comparison
    is made, and each gated variant's threshold (`gate_records`: {gated variant: its record})."""
    held_out = tables.ablation[
        (tables.ablation["model"] == tables.best) & (tables.ablation["split"] == HELD_OUT)
    ].iloc[0]
    best_on_held_out = ", ".join(
        f"{label} {_mean_sd(held_out[f'{column}_mean'], held_out[f'{column}_sd'], digits)}"
        for (column, label), digits in zip(HEADLINE.items(), (3, 2, 2), strict=True)
    )
    n_models = int(held_out["n_seeds"])
    models = f"mean ± sd over its {n_models} models" if n_models > 1 else "one model"
    notes = [
        "DSC, False Positive and False Negative are the official autoPET metrics (Dice, false "
        "positive and false negative volume in ml over connected components, 18-connected unless "
        "evaluate.connectivity says otherwise), averaged over the studies where they are "
        "defined (Dice and FN only over studies with lesions).",
        "The paper's numbers are quoted from Liu, Zhong & Mo (autoPET 2022), Table 1. Their "
        "preliminary test set is the challenge's hidden set; ours is the held-out test split of "
        f"this run's cohort (download source: {data_source}), so the numbers are not comparable "
        "one to one.",
        f"Best variant: {tables.best}, the highest Dice on the {tables.selection} split (its "
        f"seeds averaged), chosen there only, never on {HELD_OUT}. On {HELD_OUT}: "
        f"{best_on_held_out} ({models}). Example cases are the "
        f"{', '.join(tables.cases)} {HELD_OUT} studies of {tables.best_model}, its model with "
        f"the highest {tables.selection} Dice.",
        models_note(tables.summary, folds, list(gate_records or {})),
    ]
    if not tables.pairwise.empty:
        notes.append(
            "Pairwise comparison: for every two trained variants A and B (in the config's order) "
            "and each split, then pooled over every evaluated study (the verdict: the most "
            "studies, none chosen on), A - B per study, each variant's seeds averaged per study, "
            "over the studies where both are defined; a 95 % t-interval over those studies (a "
            "bootstrap interval would cover less at so few studies) and the Wilcoxon signed-rank "
            "p. The "
            "conclusion names the variant the interval favours (higher Dice, lower FPV and FNV), "
            f"'{NO_DIFFERENCE}' when it holds zero. The interval covers the choice of studies, "
            "not the training noise beyond what averaging the seeds removes."
        )
    if gate_records:
        notes.append(gate_note(gate_records))
    return notes


def gate_note(gate_records: Mapping[str, Mapping[str, Any]]) -> str:
    """How the `<variant>_gated` rows were made, with each one's thresholds."""
    described = "; ".join(
        f"{gated}: test {_threshold(record['threshold'])}, "
        f"{record['selection_split']} by fold "
        + ", ".join(
            f"{fold} {_threshold(value)}" for fold, value in record["fold_thresholds"].items()
        )
        for gated, record in gate_records.items()
    )
    return (
        "Gated variants (<variant>_gated, gate.enabled): the variant's predictions without the "
        "components whose lesion presence (the whole-crop output channel's least-squares factor "
        "on its fill, per sliding window, averaged over the component) is below a threshold "
        "(the paper's section 2.2 proposal). The threshold gives the lowest mean FPV at a mean "
        "Dice no lower than without the gate (it may only remove false positives), on "
        "the selection split only: an out-of-fold study is gated with the one chosen on the "
        "other folds, a test study with the one chosen on every out-of-fold study (-inf: "
        f"nothing dropped). Thresholds: {described}."
    )


def _threshold(value: float) -> str:
    return f"{value:g}" if math.isinf(value) else f"{value:.3f}"


def models_note(summary: pd.DataFrame, folds: int, gated: Collection[str] = ()) -> str:
    """Which models the rows stand for: each variant's seeds, and the folds behind each seed
    (`gated`: the gated variants, `<variant>_gated-seed<k>`, which are no models of their own)."""
    models = summary.dropna(subset=["seed"])
    trained = models[~models["variant"].isin(list(gated))].groupby("model", sort=False)["seed"]
    seeds = "; ".join(
        f"{model} seeds {', '.join(str(int(s)) for s in sorted(set(group)))}"
        for model, group in trained
    )
    if folds == 1:
        return (
            f"Trained models: {seeds}; one model per seed, trained on the train split and "
            "validated on the val split (no cross-validation: train.folds 1)."
        )
    return (
        f"Trained models: {seeds}; each seed {folds} models, one per fold of a {folds}-fold "
        "cross-validation (folds by patient, stratified by lesion status). Out-of-fold: every "
        "non-test study, predicted by the one model of its seed that did not train on it. Test: "
        f"each seed's fold ensemble (the mean of its {folds} models' probabilities, then "
        "infer.threshold). A seed's row is that seed's out-of-fold and ensemble predictions."
    )


def markdown_page(
    tables: Mapping[str, pd.DataFrame],
    notes: Sequence[str],
    figures: Sequence[tuple[str, str]],
) -> str:
    """results.md: the notes, each table under its title, and links to `figures` (title and
    path relative to results.md)."""
    parts = ["# stepseg results", ""]
    parts += [f"- {note}" for note in notes]
    for title, table in tables.items():
        parts += ["", f"## {title}", "", markdown_table(table)]
    parts += ["", "## Figures", ""]
    parts += [f"- [{title}]({path})" for title, path in figures]
    return "\n".join(parts) + "\n"


def html_page(tables: Mapping[str, pd.DataFrame], notes: Sequence[str]) -> str:
    """The tables as one standalone HTML page, which Snakemake's report embeds and displays."""
    body = ["<ul>", *(f"<li>{html.escape(note)}</li>" for note in notes), "</ul>"]
    for title, table in tables.items():
        body += [f"<h2>{html.escape(title)}</h2>", table.to_html(index=False, border=0)]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>stepseg results</title>"
        "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style></head><body>"
        "<h1>stepseg results</h1>" + "\n".join(body) + "</body></html>"
    )


# ---- figures -------------------------------------------------------------------------------


# Titles of the column groups the training loop writes (stepseg.train); other groups keep their
# prefix as the title.
GROUP_TITLES = {
    "ch": "loss terms (unweighted, per output channel)",
    "s": "loss weights (learned s_i, or the fixed weights)",
    "grad": "gradient norm of each weighted term at the last shared layer",
    "loss": "total loss",
    "lr": "learning rate",
    "val": "validation",
    "seconds": "seconds per epoch",
}


def _column_groups(log_table: pd.DataFrame) -> dict[str, list[str]]:
    """Numeric columns grouped by the digit-free prefix before the first underscore, so that
    `ch0_dicefocal`, `ch1_mse`, ... share one panel and `s_ch0_dicefocal`, ... another."""
    groups: dict[str, list[str]] = {}
    for column in log_table.columns:
        if column == "epoch":
            continue
        values = pd.to_numeric(log_table[column], errors="coerce")
        if values.notna().any():
            prefix = re.sub(r"\d+", "", str(column).split("_", 1)[0]) or str(column)
            groups.setdefault(prefix, []).append(column)
    return groups


def plot_training_curves(log_csv: str | Path, out_png: str | Path, variant: str, dpi: int) -> None:
    """One panel per column group of the training log, against the epoch."""
    table = pd.read_csv(log_csv)
    groups = _column_groups(table)
    if not groups:
        raise ValueError(f"{log_csv} has no numeric column to plot")
    x = table["epoch"] if "epoch" in table else pd.Series(range(len(table)), name="row")
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False, layout="constrained"
    )
    for ax, (group, columns_of_group) in zip(axes.flat, groups.items(), strict=False):
        for name in columns_of_group:
            values = pd.to_numeric(table[name], errors="coerce")
            logged = values.notna()  # e.g. validation only every few epochs: join the points
            ax.plot(x[logged], values[logged], marker=".", label=name)
        panel = table[columns_of_group].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        positive = panel[np.isfinite(panel)]
        if positive.size and positive.min() > 0 and positive.max() / positive.min() > 100:
            ax.set_yscale("log")
        ax.set_title(GROUP_TITLES.get(group, group), fontsize=9)
        ax.set_xlabel(str(x.name))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"Training log of {variant}")
    _save(fig, out_png, dpi)


def plot_learning_curves(
    train_logs: Mapping[str, str | Path], out_png: str | Path, dpi: int
) -> None:
    """Validation Dice (pooled over the fixed validation patches) of every trained variant
    against its cumulative training time: whether more budget would still pay."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8), layout="constrained")
    for variant, log_csv in sorted(train_logs.items()):
        table = pd.read_csv(log_csv)
        minutes = pd.to_numeric(table["seconds"], errors="coerce").cumsum() / 60
        dice = pd.to_numeric(table["val_dice"], errors="coerce")
        logged = dice.notna()
        ax.plot(minutes[logged], dice[logged], marker=".", label=variant)
    ax.set_xlabel("training time (minutes, this machine)")
    ax.set_ylabel("validation Dice (patches)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Learning curves", fontsize=9)
    _save(fig, out_png, dpi)


def plot_distributions(per_study: pd.DataFrame, out_png: str | Path, dpi: int) -> None:
    """Per-study Dice, FPV and FNV of every variant: box plots with the studies as points, one
    row per evaluated split."""
    variants = sorted(per_study["variant"].unique())
    splits = eval_splits(per_study)
    fig, axes = plt.subplots(
        len(splits),
        len(HEADLINE),
        figsize=(4.5 * len(HEADLINE), 3.2 * len(splits)),
        squeeze=False,
        layout="constrained",
    )
    rng = np.random.default_rng(0)
    for i, split in enumerate(splits):
        for j, (column, label) in enumerate(HEADLINE.items()):
            ax = axes[i, j]
            data = [
                per_study.loc[(per_study["variant"] == v) & (per_study["split"] == split), column]
                .dropna()
                .to_numpy()
                for v in variants
            ]
            ax.boxplot(data, showfliers=False)
            for k, values in enumerate(data, start=1):
                ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.7)
            ax.set_xticks(range(1, len(variants) + 1), variants, rotation=30, ha="right")
            ax.set_title(f"{SET_LABELS[split]}: {label}", fontsize=9)
    _save(fig, out_png, dpi)


def coronal_mip(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Maximum along the antero-posterior axis, oriented head up and patient right on the
    viewer's left (radiological convention), whatever the storage orientation."""
    i_code, _, k_code = nib.aff2axcodes(affine)  # NIfTI (i, j, k) = our (x, y, z)
    mip = array.max(axis=1)  # (z, x)
    if k_code == "S":
        mip = mip[::-1]
    if i_code == "R":
        mip = mip[:, ::-1]
    return mip


def plot_case(
    *,
    study: str,
    suv_path: str | Path,
    seg_path: str | Path,
    pred_path: str | Path,
    title: str,
    out_png: str | Path,
    dpi: int,
) -> None:
    """Coronal SUV MIP with the projected outlines of the ground truth and the prediction."""
    suv = nifti.load(suv_path, study, np.float32)
    seg = nifti.load(seg_path, study)
    pred = nifti.load(pred_path, study)
    nifti.check_same_grid(
        study,
        {
            "SUV": (Path(suv_path), suv),
            "SEG": (Path(seg_path), seg),
            "pred": (Path(pred_path), pred),
        },
    )
    sz, _, sx = suv.spacing_zyx
    mip = coronal_mip(suv.array, suv.affine)
    fig, ax = plt.subplots(figsize=(4.5, 4.5 * mip.shape[0] * sz / (mip.shape[1] * sx) + 0.8))
    vmax = max(float(np.percentile(mip, 99.5)), 1e-6)
    ax.imshow(mip, cmap="gray_r", vmin=0, vmax=vmax, aspect=sz / sx, interpolation="nearest")
    # ground truth wide and solid, prediction thin and dashed: both stay visible where they agree
    for volume, label, colour, width, dash in (
        (seg, "ground truth", "tab:green", 1.8, "solid"),
        (pred, "prediction", "tab:red", 0.9, "dashed"),
    ):
        outline = coronal_mip((volume.array != 0).astype(np.uint8), volume.affine)
        if outline.any():
            ax.contour(outline, levels=[0.5], colors=colour, linewidths=width, linestyles=dash)
        ax.plot([], [], color=colour, lw=width, ls=dash, label=label)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    _save(fig, out_png, dpi)


def _save(fig: plt.Figure, out_png: str | Path, dpi: int) -> None:
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


# ---- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReportOutputs:
    """The report's files: tables, figures, one training-curve PNG per trained variant and one
    case PNG per `mip_cases` entry, keyed by variant and case."""

    table: Path
    pairwise: Path
    markdown: Path
    html: Path
    distributions: Path
    learning_curves: Path
    curves: Mapping[str, Path]
    cases: Mapping[str, Path]


def write_report(
    *,
    metrics_csvs: Mapping[tuple[str, str], str | Path],
    train_logs: Mapping[str, str | Path],
    test_images: Mapping[str, tuple[str | Path, str | Path]],
    test_predictions: Mapping[str, Mapping[str, str | Path]],
    outputs: ReportOutputs,
    settings: ReportSettings,
    data_source: str,
    folds: int,
    gate_records: Mapping[str, str | Path] | None = None,
) -> None:
    """Write results.csv, pairwise.csv, results.md, results.html and every figure of `outputs`.

    `metrics_csvs`: each (variant, split)'s per-study metrics; `train_logs`: each training job's
    log (one per trained variant and fold, `names.fold_model_name`); `test_images`: each test
    study's (SUV, SEG) files; `test_predictions`: every variant's test prediction by study;
    `folds`: `train.folds`, named in the notes; `gate_records`: each gated variant's gate record
    (`stepseg.gate.write_choice`). The cases are drawn from the best variant's model
    chosen on the selection split (`compute_tables`).
    """
    if set(outputs.curves) != set(train_logs):
        raise ValueError(
            f"training logs of {sorted(train_logs)} but curve outputs for {sorted(outputs.curves)}"
        )
    tables = compute_tables(
        load_per_study(metrics_csvs), cases=settings.mip_cases, data_source=data_source
    )
    with atomic_file(outputs.table) as tmp:
        tables.results.to_csv(tmp, index=False)
    with atomic_file(outputs.pairwise) as tmp:
        tables.pairwise.to_csv(tmp, index=False)
    _write_figures(tables, train_logs, test_images, test_predictions, outputs, settings.figure_dpi)

    figures = [
        ("Per-study metric distributions", outputs.distributions),
        ("Learning curves (validation Dice against training time)", outputs.learning_curves),
    ]
    figures += [(f"Training curves of {v}", outputs.curves[v]) for v in train_logs]
    figures += [(f"{c} test case", outputs.cases[c]) for c in tables.cases]
    base = outputs.markdown.parent
    links = [(title, Path(path).relative_to(base).as_posix()) for title, path in figures]
    text = text_tables(tables, data_source)
    records = {gated: gate.read_choice(path) for gated, path in (gate_records or {}).items()}
    notes = report_notes(tables, data_source, folds, records)
    with atomic_file(outputs.markdown) as tmp:
        tmp.write_text(markdown_page(text, notes, links), encoding="utf-8")
    with atomic_file(outputs.html) as tmp:
        tmp.write_text(html_page(text, notes), encoding="utf-8")
    log.info("report written; best variant by %s Dice: %s", tables.selection, tables.best)


def _write_figures(
    tables: ReportTables,
    train_logs: Mapping[str, str | Path],
    test_images: Mapping[str, tuple[str | Path, str | Path]],
    test_predictions: Mapping[str, Mapping[str, str | Path]],
    outputs: ReportOutputs,
    dpi: int,
) -> None:
    """Training and learning curves, metric distributions, and the best variant's test cases."""
    for variant, log_csv in train_logs.items():
        plot_training_curves(log_csv, outputs.curves[variant], variant, dpi)
    plot_learning_curves(train_logs, outputs.learning_curves, dpi)
    plot_distributions(tables.per_study, outputs.distributions, dpi)
    best = tables.best_model
    rows = tables.per_study.set_index(["variant", "split", "study"])
    for case, study in tables.cases.items():
        row = rows.loc[(best, HELD_OUT, study)]
        title = (
            f"{case} test study of {best}: {study}\nDice {_fmt(row['dice'], 3)}, "
            f"FPV {row['fpv_ml']:.2f} ml, FNV {_fmt(row['fnv_ml'], 2)} ml"
        )
        suv, seg = test_images[study]
        plot_case(
            study=study,
            suv_path=suv,
            seg_path=seg,
            pred_path=test_predictions[best][study],
            title=title,
            out_png=outputs.cases[case],
            dpi=dpi,
        )
