"""The exact-answer bench over every registered sampler (present and future, from the registry).

Each sampler declares how it is certified (``Sampler.certification``); a sampler that declares nothing fails here.
The measured numbers are printed with ``-s`` and collected by benchmarks/exact_bench.py.
"""

import pytest

from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import certify_sampler

SAMPLERS = collect(get_plugin_manager()).samplers


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_on_exact_bench(name):
    cls = SAMPLERS.get(name)
    result = certify_sampler(cls)
    print(result)
