"""The compiled extension is what the other test modules test: if it did not build or load,
they skip, and this test fails so that the suite cannot pass on the fallback alone."""
import torch

import mass_ext


def test_compiled_extension_is_loaded():
    assert mass_ext.backend("cpu") == "cpp", "mass_ext._C did not load: build it first"
    for name in ("route", "routed_linear", "routed_linear_prerouted", "_grouped_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mass_ext::{name}", "CPU"), name


FALLBACK_SCRIPT = r"""
import logging, sys, torch
sys.modules["mass_ext._C"] = None          # as if the extension had not been built
records = []
logging.getLogger("mass_ext").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r)})())
import mass_ext
from mass_ext import reference
assert mass_ext.backend("cpu") == "reference", mass_ext.backend("cpu")
assert any("using the pure-PyTorch reference" in r.getMessage() for r in records), records
g = torch.Generator().manual_seed(0)
T, r, d_in, d_out = 3, 2, 9, 5
x = torch.randn(4, d_in, generator=g)
W, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
U, S = torch.randn(T, d_out, r, generator=g), torch.rand(T, r, generator=g)
V = torch.linalg.qr(torch.randn(T, d_in, r, generator=g)).Q.transpose(1, 2).contiguous()
assert torch.equal(mass_ext.routed_linear(x, W, b, U, S, V, 2),
                   reference.routed_linear(x, W, b, U, S, V, 2))
assert torch.equal(mass_ext.route(x, V, 2).indices, reference.route(x, V, 2).indices)
try:
    mass_ext.routed_linear(x, W, b, U, S, V, 4)
except ValueError as e:
    assert "top_k must be in 1..T = 1..3, got 4" in str(e), e
else:
    raise AssertionError("bad top_k accepted")
print("fallback ok")
"""


def test_unbuilt_extension_falls_back_to_the_reference():
    """Without mass_ext._C: one warning, every op runs the reference, errors unchanged."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr
