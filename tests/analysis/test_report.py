"""The Markdown report's table cells."""

from __future__ import annotations


def test_a_metric_defined_on_few_patients_says_so_in_its_cell() -> None:
    """HD95 of a model that finds no necrosis is defined only on the empty cases (0 mm): the cell must not
    read like a perfect score without saying over how many patients it is."""
    import pandas as pd

    from avn_study.analysis.report import _cell

    row = pd.Series({"n_patients": 16, "hd95_mm_mean": 0.0, "hd95_mm_sd": 0.0, "hd95_mm_ci_low": 0.0,
                     "hd95_mm_ci_high": 0.0, "hd95_mm_n": 6, "dice_mean": 0.5, "dice_sd": 0.1,
                     "dice_ci_low": 0.4, "dice_ci_high": 0.6, "dice_n": 10})  # fmt: skip
    assert _cell(row, "hd95_mm", 1) == "0.0 ± 0.0 [0.0, 0.0] (defined for 6 of 16 patients)"
    assert _cell(row, "dice", 3) == "0.500 ± 0.100 [0.400, 0.600]"  # its own count is the table's column
    assert _cell(row.replace(6, 16), "hd95_mm", 1) == "0.0 ± 0.0 [0.0, 0.0]"
