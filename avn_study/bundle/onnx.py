"""ONNX export of a bundle's model, checked against PyTorch with onnxruntime (``export --onnx``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avn_study.errors import AvnError, UsageError


def export_onnx(model: Any, path: Path, slice_size: int, tolerance: float = 1e-3, channels: int = 1) -> dict[str, Any]:
    """Write ``model.onnx`` (torch's dynamo exporter; outputs named by branch, dynamic batch axis) and
    check it against PyTorch with onnxruntime on random slices.

    Raises:
        UsageError: onnx / onnxscript / onnxruntime are not installed.
        AvnError: the ONNX outputs differ from PyTorch's by more than ``tolerance``.
    """
    import logging
    import warnings

    import numpy as np
    import torch

    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise UsageError(
            f"--onnx needs the onnx extra ({err.name} is missing): pip install 'avn-study[onnx]'"
        ) from None
    names = [b for b in ("seg", "loc", "recon") if b in model.branches]

    class Outputs(torch.nn.Module):  # dict outputs -> a tuple in a fixed order, named by branch
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(x)
            return tuple(out[n] for n in names)

    wrapper = Outputs().eval()
    example = torch.zeros(2, channels, slice_size, slice_size)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], output_names=names,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                              verbose=False)  # fmt: skip
    finally:
        quiet.setLevel(level)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, channels, slice_size, slice_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = wrapper(x)
    outputs = session.run(names, {"image": x.numpy()})
    diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(outputs, reference, strict=True))
    if not diff <= tolerance:
        raise AvnError(f"{path}: ONNX outputs differ from PyTorch by {diff:.3g} (> {tolerance}); not exported")
    opset = next((o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "file": path.name,
        "input": {"name": "image", "shape": ["batch", channels, slice_size, slice_size], "dtype": "float32"},
        "outputs": names,
        "outputs_are": "seg, loc: logits (seg is the final, gated necrosis logit); recon: the reconstruction",
        "opset": opset,
        "max_abs_diff_vs_torch": diff,
    }
