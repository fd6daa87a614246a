"""How the kernels are checked: the error measure and the per-dtype tolerances, in one place.

Used by tests/ and bench/ alike (like torch.testing), so a kernel is held to the same bar by the test suite and by
the benchmark's correctness gate.

The measure is the relative Frobenius (L2) error ||actual - expected|| / ||expected|| against a reference computed
in float64 (tests) or float32 (benchmarks). For gradients, which can be exactly zero (attention at T=1), the
denominator is max(||expected||, ||scale||) with a natural scale such as the upstream gradient.
"""
import torch

# The tolerances on that relative error, per dtype and per kind of kernel:
#  - "pointwise": each output element is one rounding of an fp32 result (LayerNorm, GELU);
#  - "matmul": the inputs of fp32-accumulated products are rounded to the input dtype first (attention, linear).
# Gradients that sum over many rows (LayerNorm's dweight, GELU's dbias) get REDUCTION_FACTOR times as much.
TOLERANCE = {
    "pointwise": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    "matmul": {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2},
}
REDUCTION_FACTOR = 4


def tolerance(dtype: torch.dtype, kind: str = "pointwise") -> float:
    """The relative L2 error a kernel of `kind` ("pointwise" or "matmul") may show in `dtype`."""
    return TOLERANCE[kind][dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||actual - expected||_2 / max(||expected||_2, ||scale||_2), computed in float64."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm()
    if scale is not None:
        denom = torch.maximum(denom, scale.double().norm().to(denom.device))
    return ((actual - expected).norm() / denom.clamp_min(1e-30)).item()
