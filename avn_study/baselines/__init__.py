"""Other tools' rows on our folds, scored by our metrics."""
