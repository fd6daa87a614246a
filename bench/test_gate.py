"""The suite refuses to time a wrong kernel."""
from types import SimpleNamespace

import pytest
import torch

from bench.common import WrongResult, case, gate
from nanogpt.backends import REFERENCE, Backend, get_backend, naive_attention, register_backend, unregister_backend


class RecordingBenchmark:
    """Stands in for pytest-benchmark's fixture and records whether anything was timed."""
    disabled = False

    def __init__(self):
        self.extra_info, self.timed = {}, False

    def pedantic(self, target, rounds=1, iterations=1, warmup_rounds=0):
        self.timed = True
        target()
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=1.0))

    def __call__(self, *args, **kwargs):
        self.timed = True


def test_a_backend_off_by_one_percent_is_refused_before_timing():
    naive = get_backend(REFERENCE)
    def off_by_one_percent(q, k, v, dropout_p=0.0):
        return naive.attention(q, k, v, dropout_p) * 1.01

    register_backend("off_by_1pct", lambda: Backend("off_by_1pct", off_by_one_percent, naive.layer_norm, naive.gelu))
    try:
        wrong = get_backend("off_by_1pct").attention
        shape = (1, 2, 16, 16)

        def make_inputs(seed):
            g = torch.Generator().manual_seed(seed)
            qkv = [torch.randn(shape, generator=g).requires_grad_() for _ in range(3)]
            return qkv, torch.randn(shape, generator=g)

        def reference(inputs, grad_out):
            return [naive_attention(*[t.detach() for t in inputs])]

        bench = RecordingBenchmark()
        with pytest.raises(WrongResult, match="off by 1.00e-02 relative .* refusing to time a wrong kernel"):
            case(bench, lambda **kw: None, "attention", "off_by_1pct", wrong, make_inputs, reference,
                 torch.float32, "fwd", figure=lambda s: {})
        assert not bench.timed
        # the same path with the right kernel is timed
        case(bench, lambda **kw: None, "attention", "naive", naive_attention, make_inputs, reference,
             torch.float32, "fwd", figure=lambda s: {})
        assert bench.timed
    finally:
        unregister_backend("off_by_1pct")


def test_non_finite_output_is_refused():
    with pytest.raises(WrongResult, match="non-finite"):
        gate("x", [torch.tensor([float("nan")])], [torch.tensor([1.0])], torch.float32)
