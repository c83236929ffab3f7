"""The planned record: what each knockd's file was planned from, so that a run that finds it all
as recorded plans nothing again.
"""

import hashlib
import os
import threading

from knockd_rotator.core import commands
from knockd_rotator.core.files import keep_state
from knockd_rotator.core.generator import PIN_ITERATIONS
from knockd_rotator.core.plan import Plan


# A run by hand and the timer's hourly run mostly find the files current, but
# learnt it by planning every door again: in a new process, which has no
# keys (they are never written), 1000 PIN doors cost 11 s of PBKDF2.  So each
# good rotation records, per knockd, what its file was planned from: the
# file's SHA-256, a PBKDF2 of every KNOCKD_ROTATOR_* value and of the code
# (code_paths, so that an update plans again; PIN_ITERATIONS rounds: a PIN
# guessed against it costs what one guessed against a sequence seen on the
# wire costs), the single-use counters and the
# moments between which that plan holds (the plan changes only at an event).
# A run that finds all of them as recorded has nothing to change.
PLANNED = "planned"
# This process's "salt" (the first it met) and "script" (the code's SHA-256).
PLANNED_BASIS = {}
PLANNED_DIGESTS = {}     # (salt, inputs) -> digest, for the threads of one run
PLANNED_LOCK = threading.Lock()


def code_paths():
    """The script users run, then every module of this package in a fixed order:
    the code a plan comes from, so that an update of any of it plans again."""
    package = os.path.dirname(os.path.abspath(__file__))
    modules = sorted(os.path.relpath(os.path.join(folder, name), package)
                     for folder, _, names in os.walk(package)
                     for name in names if name.endswith(".py"))
    return [commands.SCRIPT] + [os.path.join(package, module) for module in modules]


def inputs_digest(environ, salt):
    """The PBKDF2 of ENVIRON's KNOCKD_ROTATOR_* values and the code (code_paths), under SALT."""
    import json
    if "script" not in PLANNED_BASIS:
        code = hashlib.sha256()
        try:
            for path in code_paths():
                with open(path, "rb") as handle:
                    code.update(handle.read())
            PLANNED_BASIS["script"] = code.hexdigest()
        except OSError:
            PLANNED_BASIS["script"] = ""
    inputs = json.dumps([PLANNED_BASIS["script"]] + sorted(
        item for item in environ.items() if item[0].startswith("KNOCKD_ROTATOR_")))
    with PLANNED_LOCK:       # the first thread derives it, the others find it
        if (salt, inputs) not in PLANNED_DIGESTS:
            PLANNED_DIGESTS[(salt, inputs)] = hashlib.pbkdf2_hmac(
                "sha256", inputs.encode("utf-8", "surrogateescape"), salt,
                PIN_ITERATIONS).hex()
        return PLANNED_DIGESTS[(salt, inputs)]


def uses_digest(uses):
    import json
    return hashlib.sha256(json.dumps(uses, sort_keys=True).encode()).hexdigest()


def record_planned(state_dir, data, environ, uses, now, plan):
    """After a good rotation: DATA is the file PLAN makes until its event."""
    import json
    import secrets
    if plan.event is None:
        return
    salt = PLANNED_BASIS.setdefault("salt", secrets.token_bytes(16))
    record = {"file": hashlib.sha256(data).hexdigest(), "salt": salt.hex(),
              "inputs": inputs_digest(environ, salt), "uses": uses_digest(uses),
              "from": now, "until": plan.event, "starts": plan.starts}
    keep_state(os.path.join(state_dir, PLANNED), json.dumps(record, sort_keys=True).encode())


def as_planned(state_dir, data, environ, uses, now):
    """The Plan (its doors, starts and event only) recorded for DATA, if it
    still holds at NOW for ENVIRON and USES, else None: plan it again.  Only
    for a DATA the engine was seen to load: one it did not must be loaded."""
    import json
    if b"ONE_TIME_SEQUENCES" in data.upper():
        return None          # their keepers follow files that knockd uses up
    try:
        with open(os.path.join(state_dir, PLANNED), "rb") as handle:
            record = json.loads(handle.read())
        salt = bytes.fromhex(record["salt"])
        holds = (record["from"] <= now < record["until"]
                 and record["file"] == hashlib.sha256(data).hexdigest()
                 and record["uses"] == uses_digest(uses)
                 and record["inputs"] == inputs_digest(environ, salt))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not holds:
        return None
    PLANNED_BASIS.setdefault("salt", salt)
    return Plan(doors=list(record["starts"]), starts=record["starts"], event=record["until"])
