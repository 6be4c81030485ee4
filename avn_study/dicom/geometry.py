"""How a DICOM slice stack and a NIfTI volume of the same grid index the same voxels.

A series' voxel (slice k, row i, column j) lies at ``IPP_0 + k * step + i * dr * col_dir + j * dc * row_dir``
in LPS patient coordinates (DICOM); a NIfTI affine maps its voxels to RAS (x and y negated). When both
describe one grid, the map between the index spaces is a signed axis permutation; :class:`StackMap`
finds it (or says that the grids differ) and moves arrays both ways, exactly, without resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avn_study.dicom.tree import Series

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
INDEX_ATOL = 1e-2  # voxels: index maps may differ by rounding of positions, not by a voxel


@dataclass(frozen=True)
class StackMap:
    """A signed permutation from a stack's (slice, row, column) axes to a volume's stored axes.

    Attributes:
        axes: ``axes[b]`` is the stack axis that becomes volume axis ``b``.
        flips: volume axes that run against their stack axis.
        shape: the volume's shape.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shape: tuple[int, int, int]

    def to_volume(self, stack: np.ndarray) -> np.ndarray:
        """A ``(slices, rows, columns)`` array as the volume's stored array."""
        out = np.transpose(stack, self.axes)
        return np.flip(out, [b for b in range(3) if self.flips[b]]) if any(self.flips) else out

    def to_stack(self, volume: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_volume`."""
        flipped = np.flip(volume, [b for b in range(3) if self.flips[b]]) if any(self.flips) else volume
        return np.transpose(flipped, np.argsort(self.axes))


def stack_vectors(series: Series) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The LPS position of voxel (0, 0, 0), the 3x3 matrix of LPS steps per (slice, row, column) index,
    and the stack's shape, from the sorted slices' headers."""
    ordered = series.sorted_instances()
    first = ordered[0]
    assert first.position is not None and first.orientation is not None and first.pixel_spacing is not None
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    between_rows, between_columns = first.pixel_spacing
    origin = np.asarray(first.position, dtype=np.float64)
    if len(ordered) > 1:
        step = (np.asarray(ordered[-1].position) - origin) / (len(ordered) - 1)
    else:  # one slice: its thickness along the normal
        normal = np.cross(row_dir, col_dir)
        step = normal / np.linalg.norm(normal)
    steps = np.column_stack([step, between_rows * col_dir, between_columns * row_dir])
    return origin, steps, (len(ordered), first.shape[0], first.shape[1])


def stack_map(series: Series, affine: np.ndarray, shape: tuple[int, ...]) -> StackMap | None:
    """The map from the series' stack to a volume with ``affine`` (RAS) and ``shape``; None when the
    two are not one grid (other spacing, orientation, extent or position)."""
    origin, steps, stack_shape = stack_vectors(series)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    start = inverse[:3, :3] @ (_LPS_TO_RAS @ origin) + inverse[:3, 3]
    matrix = inverse[:3, :3] @ _LPS_TO_RAS @ steps  # volume index change per stack index
    rounded = np.round(matrix)
    if not np.allclose(matrix, rounded, atol=INDEX_ATOL) or not np.allclose(start, np.round(start), atol=INDEX_ATOL):
        return None
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None  # not a signed permutation (a stack of another spacing or orientation)
    axes, flips = [0, 0, 0], [False, False, False]
    for a in range(3):
        b = int(np.flatnonzero(rounded[:, a])[0])
        axes[b], flips[b] = a, bool(rounded[b, a] < 0)
    shape3 = tuple(int(s) for s in shape[:3])
    for b in range(3):
        if shape3[b] != stack_shape[axes[b]] or round(start[b]) != (shape3[b] - 1 if flips[b] else 0):
            return None
    return StackMap(tuple(axes), tuple(flips), shape3)  # type: ignore[arg-type]
