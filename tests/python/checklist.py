"""What the SDK check scripts share: run each check, report it, and end with one summary line
the end-to-end tests look for ("<name>: N passed, M failed") and a non-zero exit when a check
failed."""

import sys
import traceback

_results = []


def check(fn):
    """Runs `fn` now and records whether it passed; usable as a decorator."""
    try:
        fn()
        _results.append(True)
        print(f"PASS {fn.__name__}", flush=True)
    except Exception:  # noqa: BLE001 - report every failure and go on
        _results.append(False)
        print(f"FAIL {fn.__name__}", flush=True)
        traceback.print_exc(file=sys.stdout)
    return fn


def finish(name):
    """Prints the summary line and exits: status 1 when a check failed."""
    passed = sum(_results)
    failed = len(_results) - passed
    print(f"{name}: {passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


def refused_naming(cases, error):
    """Each `(call, param)` of `cases` fails with `error` (an SDK's error for a 400) whose body
    names `param`."""
    for call, param in cases:
        try:
            call()
        except error as refused:
            assert refused.body["param"] == param, (param, refused.body)
        else:
            raise AssertionError(f"accepted: {param}")
