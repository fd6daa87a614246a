"""How the kernels are checked: the error measure and the per-dtype tolerances, in one place.

Used by tests/ and bench/ alike (like torch.testing), so a kernel is held to the same bar by the test suite and by
the benchmark's correctness gate.

The measure is the relative Frobenius (L2) error ||actual - expected|| / ||expected|| against a reference computed
in float64 (tests) or float32 (benchmarks). For gradients, which can be exactly zero (attention at T=1), the
denominator is max(||expected||, ||scale||) with a natural scale such as the upstream gradient.
"""
import torch

# The tolerances on that relative error, per kind of kernel and per dtype (Liger-Kernel's tests keep one such table
# per kernel; here the kinds share it):
#  - "pointwise": each output element is one rounding of an fp32 result (LayerNorm, GELU, the model in fp32);
#  - "matmul": the inputs of fp32-accumulated products are rounded to the input dtype first (attention, linear);
#  - "loss_head": linear + cross-entropy: fp32 products in full fp32 ("ieee" dots), as tight as a pointwise kernel;
#    in fp16/bf16 the logits' gradient is rounded before the two gradient GEMMs, like any low-precision matmul.
# Gradients that sum over many rows (LayerNorm's dweight, GELU's dbias, a linear's dW) get REDUCTION_FACTOR times
# as much: PyTorch's own low-precision kernels accumulate rounding there too.
_TOLERANCES = {
    "pointwise": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    "matmul": {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2},
    "loss_head": {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2},
}
REDUCTION_FACTOR = 4


def tolerance(dtype: torch.dtype, kind: str = "pointwise", reduction: bool = False) -> float:
    """The relative L2 error a kernel of `kind` ("pointwise", "matmul" or "loss_head") may show in `dtype`; with
    `reduction`, for a gradient summed over many rows. The one way tests and benchmarks ask for a tolerance."""
    return _TOLERANCES[kind][dtype] * (REDUCTION_FACTOR if reduction else 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||actual - expected||_2 / max(||expected||_2, ||scale||_2), computed in float64."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm()
    if scale is not None:
        denom = torch.maximum(denom, scale.double().norm().to(denom.device))
    return ((actual - expected).norm() / denom.clamp_min(1e-30)).item()
