"""The index page's summary figure: arms on the accuracy / attention-correctness plane, verdict counts."""

import math
from types import SimpleNamespace

import pandas as pd

from disentangle.report import summary


def result(acc, status="finished"):
    return SimpleNamespace(metrics={"test_acc": acc}, status=status)


def test_arm_table_is_the_mean_and_interval_over_seeds():
    runs = [("baseline", 0.0, 0, result(0.75)), ("baseline", 0.0, 1, result(1.0)),
            ("head_usage", 0.3, 0, result(0.5)), ("head_usage", 0.3, 1, result(float("nan"), "diverged"))]
    levels = pd.DataFrame({"constraint": ["baseline", "head_usage"], "support_excess_cls": [0.1, 0.3],
                           "support_excess_cls_ci_low": [0.0, 0.2], "support_excess_cls_ci_high": [0.2, 0.4]})
    table = summary.arm_table(runs, levels).set_index("constraint")
    assert table.loc["baseline", "test_acc"] == 0.875 and table.loc["baseline", "n"] == 2
    assert table.loc["baseline", "test_acc_ci_low"] < 0.75 < 1.0 < table.loc["baseline", "test_acc_ci_high"]
    assert table.loc["head_usage", "n"] == 1 and math.isnan(table.loc["head_usage", "test_acc_ci_low"])  # one seed
    assert table.loc["head_usage", "weight"] == 0.3 and table.loc["head_usage", "support_excess_cls"] == 0.3


def test_verdict_counts_list_every_verdict():
    rows = [{"verdict": "supported"}, {"verdict": "supported"}, {"verdict": "inconclusive"}]
    assert summary.verdict_counts(rows) == {"supported": 2, "not supported": 0, "inconclusive": 1}


def test_figure_and_alt_text_from_the_table():
    table = [{"constraint": "baseline", "weight": 0.0, "n": 2, "test_acc": 0.85, "test_acc_ci_low": 0.2,
              "test_acc_ci_high": 1.5, "support_excess_cls": 0.1, "support_excess_cls_ci_low": 0.0,
              "support_excess_cls_ci_high": 0.2},
             {"constraint": "head_usage", "weight": 0.3, "n": 1, "test_acc": 0.5, "test_acc_ci_low": float("nan"),
              "test_acc_ci_high": float("nan"), "support_excess_cls": 0.3, "support_excess_cls_ci_low": 0.2,
              "support_excess_cls_ci_high": 0.4}]
    counts = {"supported": 2, "not supported": 0, "inconclusive": 1}
    fig = summary.figure(table, counts)
    assert len(fig.axes) == 2
    alt = summary.alt_text(table, counts)
    assert "baseline: accuracy 0.850, support mass above chance +0.100" in alt
    assert "(w=0.3): accuracy 0.500" in alt and "2 supported, 0 not supported, 1 inconclusive" in alt
