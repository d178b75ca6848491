"""Every bad input of tests/bad_inputs.py raises the same exception type, with a message
naming the argument, the expected and the actual value, on every path: the public API
(C++ kernels), the pure-PyTorch reference and the fake kernels (FakeTensor / compile)."""
from __future__ import annotations

import re

import pytest

import mass_ext

from .bad_inputs import CASES, RUNNERS

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

PATHS = ["kernel", "reference", "fake"]


def _raise(case, path):
    if path == "fake" and not case.fake:
        pytest.skip("data-dependent or Python-layer check: no fake-kernel counterpart")
    call = case.build()
    with pytest.raises(Exception) as excinfo:
        RUNNERS[path](call)
    return excinfo.value


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_raises(case, path):
    error = _raise(case, path)
    assert type(error) is case.error, f"{path}: {type(error).__name__}: {error}"
    message = str(error)
    for part in case.substrings:
        assert part in message, f"{path}: {part!r} not in {message!r}"


def _normalise(message):
    """Floats print as 'nan', '-1' in C++ and 'nan', '-1.0' in Python: compare '-1'."""
    return re.sub(r"(\d)\.0\b", r"\1", message)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_and_reference_messages_agree(case):
    """_validation.py mirrors csrc/checks.cpp message for message."""
    kernel = _raise(case, "kernel")
    reference = _raise(case, "reference")
    assert _normalise(str(kernel)) == _normalise(str(reference))


def test_table_is_well_formed():
    descriptions = [case.description for case in CASES]
    assert len(descriptions) == len(set(descriptions))
    for case in CASES:
        assert case.error in (TypeError, ValueError, IndexError)
        assert case.substrings and all(isinstance(s, str) and s for s in case.substrings)
        case.build()  # builds without raising: the error comes from the call
