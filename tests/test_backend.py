"""The compiled extension is what the other test modules test: if it did not build or load,
they skip, and this test fails so that the suite cannot pass on the fallback alone."""
import torch

import mass_ext


def test_compiled_extension_is_loaded():
    assert mass_ext.backend("cpu") == "cpp", "mass_ext._C did not load: build it first"
    for name in ("route", "routed_linear", "routed_linear_prerouted"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mass_ext::{name}", "CPU"), name
