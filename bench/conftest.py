"""pytest bench/              : every case once, checked against its reference (a quick smoke test)
pytest bench/ --benchmark  : the timed suite (pytest-benchmark's own --benchmark-* options keep working)
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

from bench.common import environment, measure_roofline  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="time the cases (without it each case runs once, as a correctness smoke test)")


def pytest_configure(config):
    if not config.getoption("--benchmark", default=False):
        config.option.benchmark_disable = True  # pytest-benchmark runs each function once, untimed
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from bench.common import UNTIMED
    output_json["untimed"] = list(UNTIMED)
    output_json["command"] = " ".join(["pytest", *config.invocation_params.args])


@pytest.fixture(scope="session")
def timing(request):
    return request.config.getoption("--benchmark")


@pytest.fixture(scope="session")
def env():
    return environment()


@pytest.fixture(scope="session")
def roofline(timing):
    """Measured once per session, and only when timing."""
    return measure_roofline() if timing else None


@pytest.fixture
def record(benchmark, env, roofline):
    """Fill the benchmark's extra_info with the environment, the roofline and the case's own figures."""
    def _record(**fields):
        benchmark.extra_info.update(env)
        if roofline:
            benchmark.extra_info.update({f"roofline_{k}": v for k, v in roofline.items()})
        benchmark.extra_info.update(fields)
    return _record
