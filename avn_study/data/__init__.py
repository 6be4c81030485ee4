"""The data layer: NIfTI I/O, phantom cohorts, verification, splits, preprocessing cache, slice datasets."""
