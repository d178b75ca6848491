"""Renders the bad-input table (input -> error raised by the C++ op) from
tests/bad_inputs.py into README.md, so the README shows exactly what the tests check.

    python benchmarks/bad_input_table.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from tests.bad_inputs import CASES, run_kernel  # noqa: E402


def table() -> str:
    lines = ["| input | error |", "|---|---|"]
    for case in CASES:
        try:
            run_kernel(case.build())
        except Exception as error:  # noqa: BLE001 - every case must raise; shown as is
            message = str(error).splitlines()[0].replace("|", "\\|")
            lines.append(f"| {case.description} | `{type(error).__name__}`: {message} |")
        else:
            raise SystemExit(f"bad input accepted: {case.description}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = table()
    common.replace_between_markers(os.path.join(common.ROOT, "README.md"), "bad-inputs", text)
    print(text)
