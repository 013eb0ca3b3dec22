"""Test-only fault injection: the one place it is read.

`RESTORAY_FAULTS` holds comma-separated `name=value` pairs, read on the driver when a job starts (Ray workers get
what they need through the job's own arguments, so the variable does not have to reach them):

- `build.fail_after_rows=N`: each dataset-build write task raises once it has committed N rows (an interruption);
- `index.fail_after_rows=N`: each index-build write task raises once it has committed N embedded sources;
- `restore.fail_after_rows=N`: each restore-batch write task raises once it has committed N restored sources.

Training's recovery is tested by losing a real node (tests/integration/test_multinode.py), not by a fault.

Unset in every real run; an unknown name is an error, so a misspelt fault never silently tests nothing.
"""

from __future__ import annotations

import os

from restoration.errors import InputError

VARIABLE = "RESTORAY_FAULTS"
KNOWN = {"build.fail_after_rows", "index.fail_after_rows", "restore.fail_after_rows"}


def active() -> dict[str, int]:
    text = os.environ.get(VARIABLE, "").strip()
    faults: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in KNOWN or not value.strip().lstrip("-").isdigit():
            raise InputError(f"{VARIABLE}: {item!r} is not one of {', '.join(sorted(KNOWN))} with an integer value")
        faults[name] = int(value)
    return faults


def fault(name: str) -> int:
    """The fault's value, 0 when it is not set."""
    if name not in KNOWN:
        raise ValueError(f"unknown fault {name!r}")
    return active().get(name, 0)
