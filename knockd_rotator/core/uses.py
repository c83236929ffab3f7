"""Single use: the use counters of each door (STATE_DIR/uses) and the openings of each use."""

import os
import re

from knockd_rotator.core.errors import EXIT_ENVIRONMENT, EXIT_USAGE
from knockd_rotator.core.files import log, replace_file
from knockd_rotator.core.generator import (
    INT64_MAX, MAX_USE, NUMBER_DIGITS_MAX, own_variable, parse_number, ROTATOR_SUFFIX,
    RotatorError)
from knockd_rotator.core.plan import door_start, GRACE_SUFFIX, is_rotator


# A single-use door (KNOCKD_ROTATOR_SINGLE_USE=1) moves on to its next
# sequence as soon as it opens: its start_command runs `burn DOOR` first,
# which counts one more use of the period under the lock, rewrites the door
# with the sequence of the next use and reloads knockd.  A sequence seen on
# the wire is then worth nothing.  A grace sibling (`burn DOOR_GRACE`, which
# the grace block writes for it) burns the previous period's counter.
# STATE_DIR/uses holds, per door, the counter of each period still in use,
# the times of its latest burns and the openings of each use, for `status`.
#
# knockd opens for whoever completes a sequence it still holds, so replays
# sent within the ~0.2 s before the reload open the door too, each running
# the start_command.  A burn therefore names the use it burns (`--use
# START:N`, which every rotation keeps current in the door's start_command,
# like its sequence): however many openings of one use there are, the
# counter moves once and knockd reloads once.  add-client's doors also gate
# the burn in the shell (burn_command): each opening appends a line to
# STATE_DIR/burning/DOOR.START.N, and only the opening whose `mkdir` of
# DOOR.START.N.burn succeeds starts Python, so a flood of replays costs a
# shell each, not a Python process and a lock wait each.

USES = "uses"
BURNS_KEPT = 20           # latest burn times kept per door
BURST_BURNS, BURST_SECONDS = 5, 60    # this many burns this fast: `status` warns
BURNING = "burning"       # STATE_DIR/BURNING holds the openings of each use (see above)
BURN_USE = re.compile(r"([0-9]{1,%d}):([0-9]{1,10})" % NUMBER_DIGITS_MAX)


def read_uses(state_dir):
    """STATE_DIR/uses, with what is damaged in it dropped (and said so): the
    file is only ever rewritten whole, so a damaged one was edited or broken
    on disk, and the next burn writes it anew.  Fields it does not know are
    kept as they are."""
    import json
    path = os.path.join(state_dir, USES)
    try:
        with open(path, "rb") as handle:
            uses = json.loads(handle.read())
    except OSError:
        return {}
    except (ValueError, RecursionError):
        uses = None
    valid = {door: valid_use_entry(entry) for door, entry in
             (uses.items() if isinstance(uses, dict) else ())
             if door.endswith(ROTATOR_SUFFIX) and isinstance(entry, dict)}
    if valid != uses:
        log("warning: %s is damaged; what is left of it counts (the next burn rewrites it)"
            % path)
    return valid


def valid_use_entry(entry):
    """ENTRY of the uses file without its malformed counts and burn times."""
    def whole(value, high):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high

    valid = dict(entry)
    if "counts" in entry:
        counts = entry["counts"] if isinstance(entry["counts"], dict) else {}
        # A burn adds one to a count, which must stay within single use's u32.
        valid["counts"] = {start: count for start, count in counts.items()
                           if parse_number(start) is not None and whole(count, MAX_USE - 1)}
    if "burns" in entry:
        burns = entry["burns"] if isinstance(entry["burns"], list) else []
        valid["burns"] = [moment for moment in burns if whole(moment, INT64_MAX)]
    return valid


def with_burn(uses, door, now, settings_of, use=None):
    """USES after one opening of DOOR (a rotator door, or its grace sibling) at
    NOW; USES itself when USE, the (period start, counter) that the opening
    matched, is burnt already or its period's sequences are no longer held.
    Without USE (a start_command written before burns named their use) the
    opening counts as a new use, as it did then."""
    base, back = (door[:-len(GRACE_SUFFIX)], 1) if door.endswith(GRACE_SUFFIX) else (door, 0)
    if not is_rotator(base.encode("utf-8", "surrogateescape")):
        raise RotatorError("%s is not a rotator door" % door,
                           "name a [*_ROTATOR] door or its _GRACE sibling", EXIT_USAGE)
    settings = settings_of(base)
    if not settings.single_use:
        raise RotatorError("door %s is not single-use" % base,
                           "set %s=1, or take `burn` out of its start_command"
                           % own_variable("SINGLE_USE", base), EXIT_ENVIRONMENT)
    current = door_start(now, settings)
    entry = uses.get(base, {})
    counts = {key: value for key, value in entry.get("counts", {}).items()
              if int(key) >= current - settings.period}
    if use is None:
        start = current - back * settings.period
        counts[str(start)] = counts.get(str(start), 0) + 1
    else:
        start, number = use
        if start not in (current, current - settings.period) \
                or counts.get(str(start), 0) > number:
            return uses
        counts[str(start)] = number + 1
    burns = (entry.get("burns", []) + [int(now)])[-BURNS_KEPT:]
    openings = {"%d:%d" % use: count for use, count in recorded_openings(entry).items()
                if use[0] >= current - settings.period}
    return dict(uses, **{base: {"counts": counts, "burns": burns, "openings": openings}})


def recorded_openings(entry):
    """The openings per use, {(period start, counter): openings}, of ENTRY
    (a door's in the uses file); what is malformed in it is left out."""
    openings = entry.get("openings")
    found = {}
    for key, count in openings.items() if isinstance(openings, dict) else ():
        match = BURN_USE.fullmatch(key)
        if match and isinstance(count, int) and not isinstance(count, bool) and count > 0:
            found[(int(match.group(1)), int(match.group(2)))] = count
    return found


def parse_use(text):
    """burn's --use START:N, as (START, N)."""
    match = BURN_USE.fullmatch(text)
    # The counter moves to N + 1, which must stay a use (u32).
    if not match or int(match.group(2)) >= MAX_USE - 1:
        raise RotatorError("--use %r is not START:N (N below %d)" % (text[:40], MAX_USE - 1),
                           "let the rotation write the door's start_command", EXIT_USAGE)
    return int(match.group(1)), int(match.group(2))


def use_markers(state_dir, door):
    """{(start, counter): path} of DOOR's opening records in STATE_DIR/BURNING."""
    folder = os.path.join(state_dir, BURNING)
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    found = {}
    for name in names:
        record = name[:-len(".burn")] if name.endswith(".burn") else name
        match = re.fullmatch(r"([0-9]+)\.([0-9]+)", record[len(door) + 1:])
        if record.startswith(door + ".") and match:
            found[(int(match.group(1)), int(match.group(2)))] = os.path.join(folder, record)
    return found


def openings_of(path):
    """How many openings the shell recorded in PATH (one line each)."""
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except OSError:
        return 0


def with_openings_kept(state_dir, uses, door, burning, oldest):
    """USES with the openings recorded for DOOR's burnt uses moved into it,
    their records removed (those of periods before OLDEST only removed).
    BURNING, the use being burnt now, stays: replays of it may still come
    until knockd has re-read the file."""
    entry = uses.get(door)
    if entry is None:
        return uses
    openings = {"%d:%d" % use: count for use, count in recorded_openings(entry).items()}
    for (start, number), path in use_markers(state_dir, door).items():
        burnt = entry["counts"].get(str(start), 0) > number
        if (start, number) == burning or not (burnt or start < oldest):
            continue
        if start >= oldest:
            key = "%d:%d" % (start, number)
            openings[key] = openings.get(key, 0) + openings_of(path)
        for remove, gone in ((os.unlink, path), (os.rmdir, path + ".burn")):
            try:
                remove(gone)
            except OSError:
                pass
    return dict(uses, **{door: dict(entry, openings=openings)})


def door_openings(state_dir, uses, door, start):
    """{counter: openings} of DOOR's uses in the period from START, kept and recorded."""
    found = {number: count for (recorded, number), count
             in recorded_openings(uses.get(door, {})).items() if recorded == start}
    for (marked, number), path in use_markers(state_dir, door).items():
        if marked == start:
            found[number] = found.get(number, 0) + openings_of(path)
    return found


def write_uses(state_dir, uses):
    import json
    replace_file(os.path.join(state_dir, USES),
                 json.dumps(uses, sort_keys=True).encode() + b"\n", create=True)
