"""Run the fault-injection suite (tests/fault/) and print the figures docs/reliability.md quotes.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fault_report.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

KILL_TESTS = ("test_kill_during_training", "test_force_rerun_killed", "test_second_ctrl_c", "test_kill_while_",
              "test_a_killed_compress")
MUTATIONS = {"test_racing_removes_of_one_adapter": 6, "test_concurrent_mutations_keep_the_registry_whole": 24}
HOSTILE_ADAPTERS = ("test_a_crafted_target_modules_regex", "test_nan_weights_are_refused", "test_a_nan_metric")
# The fuzz test's requests: tests/fault/test_serve_fuzz.py's HOSTILE generated plus its 10 known_attacks()
FUZZ = {"test_hostile_requests_harm_only_themselves": 310}


def category(name: str) -> str:
    if name.startswith(KILL_TESTS):
        return "kills"
    if name.split("[")[0] in MUTATIONS:
        return "mutations"
    if name.startswith(("test_bad_input[", "test_bad_body[", *HOSTILE_ADAPTERS)):
        return "bad inputs"
    if name in FUZZ:
        return "fuzz"
    return "other"


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fault.xml"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/fault", f"--junitxml={report}"], cwd=repo)
        seconds = time.perf_counter() - started
        cases = ET.parse(report).getroot().iter("testcase")
        tried, passed = Counter(), Counter()
        for case in cases:
            kind = category(case.get("name", ""))
            weight = {**MUTATIONS, **FUZZ}.get(case.get("name", "").split("[")[0], 1)
            tried[kind] += weight
            if not any(child.tag in ("failure", "error", "skipped") for child in case):
                passed[kind] += weight
    print(f"fault suite: {sum(tried.values())} checks in {seconds:.0f} s")
    for kind, label in (("kills", "kills survived"), ("mutations", "concurrent mutations consistent"),
                        ("bad inputs", "bad inputs answered clearly"),
                        ("fuzz", "hostile requests to a running server that harmed only themselves"),
                        ("other", "other checks passed")):
        print(f"  {label}: {passed[kind]}/{tried[kind]}")


if __name__ == "__main__":
    main()
