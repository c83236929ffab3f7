"""Exit codes, listed in docs/OPERATIONS.md (Exit codes), and those of `status`;
RotatorError is in the shared block (core/generator.py).
"""


# Exit codes, listed in docs/OPERATIONS.md (Exit codes).
EXIT_OK = 0
EXIT_FAILED = 1         # knockd did not take the new file; the old one is back
EXIT_USAGE = 2          # bad command line
EXIT_ENVIRONMENT = 3    # a KNOCKD_ROTATOR_* variable is missing or invalid
EXIT_CONFIG = 4         # knockd.conf cannot be read, or knockd would refuse it
EXIT_BUSY = 6           # another run held the lock for too long
EXIT_RECOVERY = 7       # knockd is down and could not be brought back: act now

# `status`'s states and their exit codes (the monitoring plugins' convention).
STATUS_CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


def printed_status(state, reasons, report, as_json):
    """Print what every engine's `status` prints alike: the JSON form, or the
    line of an UNKNOWN state.  Its exit code; None when the engine's text
    form is still to print."""
    if as_json:
        import json
        print(json.dumps({"state": state, "reasons": reasons, "report": report}, indent=2))
        return STATUS_CODES[state]
    if report is None:
        print("KNOCKD_ROTATOR UNKNOWN - %s" % reasons[0])
        return STATUS_CODES[state]
    return None
