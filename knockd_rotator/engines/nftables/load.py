"""A run of the nftables engine: the doors file and the settings, planned
ahead (core/plan.py's held_windows), loaded into the table in one `nft -f`
transaction; the single-use sequences that the kernel burned are read back
first, so that the counters move on.

The kernel switches sequences at the boundaries by itself, so a run only
has to come before the windows it loaded run out (next_top_up): a run that
finds the table present, no new burn, and the doors and settings as the last
load planned them (planned.py's record) loads nothing.
"""

import contextlib
import json
import os
import subprocess
import sys

from knockd_rotator.core.errors import EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_FAILED
from knockd_rotator.core.files import keep_state, log, read_config, take_lock, utc
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.plan import held_windows, next_top_up, Plan
from knockd_rotator.core.settings import (
    rotation_settings, server_settings, settings_reader, settings_warnings, with_env_file)
from knockd_rotator.core.uses import read_uses, with_burn, write_uses
from knockd_rotator.engines.nftables import kernel, ruleset
from knockd_rotator.engines.nftables.doors import parse_doors
from knockd_rotator.planned import as_planned, record_planned

RECORD = "nftables.json"
# The rulesets this process loaded, per doors file: the watch tops them up.
LOADED = {}


def horizon(settings):
    """How far ahead the doors hold their sequences: two runs of the timer."""
    return 2 * settings["SERVER_INTERVAL"]


def read_record(state_dir):
    """STATE_DIR/RECORD: what the last load held (door numbers, final edges
    of single-use windows, windows per door, when), each empty when there
    is none.  What is damaged in it is dropped: the next load writes it
    anew."""
    try:
        with open(os.path.join(state_dir, RECORD), "rb") as handle:
            record = json.loads(handle.read())
    except (OSError, ValueError, RecursionError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    whole = (lambda value: isinstance(value, int) and not isinstance(value, bool))
    finals = [final for final in record.get("finals") if isinstance(final, list)
              and len(final) == 6 and whole(final[0]) and final[1] in ruleset.PROTOCOLS
              and whole(final[2]) and isinstance(final[3], str) and whole(final[4])
              and whole(final[5])] if isinstance(record.get("finals"), list) else []
    doors = {name: entry for name, entry in record["doors"].items()
             if isinstance(entry, dict) and whole(entry.get("period"))
             and whole(entry.get("number")) and isinstance(entry.get("guard"), list)
             and all(whole(port) for port in entry["guard"])
             and isinstance(entry.get("windows"), list) and all(
                 isinstance(w, list) and len(w) == 4 and whole(w[0]) and whole(w[2])
                 and whole(w[3]) and (w[1] is None or whole(w[1])) for w in entry["windows"])
             } if isinstance(record.get("doors"), dict) else {}
    loaded = record.get("loaded") if whole(record.get("loaded")) else None
    numbers = record.get("numbers") if isinstance(record.get("numbers"), dict) else {}
    return {"numbers": numbers, "finals": finals, "doors": doors,
            "loaded": loaded}


def door_numbers(previous, names):
    """{door: number}: each door keeps the number it had (node ids are built
    from it, so knocks in progress and burned uses survive a load); a new
    door takes the lowest free one, and one that no door of PREVIOUS held
    while there is such a number: a door removed in this load leaves its
    number, and what the table holds under it, to a later load."""
    if len(names) > ruleset.MAX_DOORS:
        raise RotatorError("%d doors; the nftables engine holds at most %d"
                           % (len(names), ruleset.MAX_DOORS), "see docs/NFTABLES.md, Limits",
                           EXIT_CONFIG)
    previous = {name: number for name, number in previous.items()
                if isinstance(number, int) and 0 <= number < ruleset.MAX_DOORS}
    numbers, taken = {}, set()
    for name in names:
        number = previous.get(name)
        if number is not None and number not in taken:
            numbers[name] = number
            taken.add(number)
    held = taken | set(previous.values())
    free = [n for n in range(ruleset.MAX_DOORS) if n not in held] + \
        [n for n in range(ruleset.MAX_DOORS) if n in held and n not in taken]
    for name, number in zip([name for name in names if name not in numbers], free):
        numbers[name] = number
    return numbers


def kernel_doors(doors, settings_of, uses, numbers, now, ahead):
    """The ruleset's Doors for DOORS (DoorLines) at NOW (pure)."""
    planned = []
    for door in doors:
        settings = settings_of(door.name)
        planned.append(ruleset.Door(door.name, numbers[door.name], door.guard,
                                    door.open_seconds, door.seq_timeout, settings.period,
                                    door.family,
                                    tuple(held_windows(settings, now, ahead, uses))))
    return planned


def plan_doors(doors, settings_of, uses, record, now, settings):
    """(numbers, planned): each door's number and the ruleset's Doors that a
    load at NOW makes (and that `check` tries on nft)."""
    numbers = door_numbers(record["numbers"], [door.name for door in doors])
    return numbers, kernel_doors(doors, settings_of, uses, numbers, now, horizon(settings))


def burned_uses(record):
    """[(door, start, use)] that the kernel burned since the last load, or
    None when the table is not there (or nft cannot be asked)."""
    finals = {(node, proto, port): (door, start, use)
              for node, proto, port, door, start, use in record["finals"]}
    try:
        spent = kernel.read_spent()
    except (OSError, subprocess.CalledProcessError):
        return None
    return kernel.spent_uses(spent, ruleset.Ruleset({}, {}, [], finals))


def follow_burns(uses, burned, now, settings_of, doors):
    """USES with every burned use counted (a use burnt already counts once)."""
    names = {door.name for door in doors}
    for door, start, use in burned:
        if door in names and settings_of(door).single_use:
            uses = with_burn(uses, door, now, settings_of, (start, use))
    return uses


def nft_apply(load):
    """kernel.apply, its failures as RotatorError."""
    try:
        kernel.apply(load)
    except FileNotFoundError:
        raise RotatorError("nft is not installed", "apt-get install nftables",
                           EXIT_ENVIRONMENT) from None
    except RuntimeError as exc:
        raise RotatorError("the kernel refused the table: %s" % " ".join(str(exc).split()),
                           "the previous table is still loaded, unchanged (one transaction); "
                           "run as root, and see `check`", EXIT_FAILED) from None


def record_load(state_dir, numbers, loaded, planned, now):
    record = {"numbers": numbers, "loaded": int(now),
              "finals": [list(key) + list(value) for key, value in sorted(loaded.finals.items())],
              "doors": {door.name: {"number": door.number, "guard": list(door.ports),
                                    "period": door.period,
                                    "windows": [[w.start, w.use, w.valid_from, w.valid_until]
                                                for w in door.windows if w.valid_until > now]}
                        for door in planned}}
    keep_state(os.path.join(state_dir, RECORD), json.dumps(record, sort_keys=True).encode())


def rotate(doors_path, environ, now, dry_run=False, verbose=False):
    """Load the table for DOORS_PATH at NOW (read the burns back first).
    Returns a Plan with .doors and .event (when the next load is due)."""
    settings = server_settings(environ)
    state_dir = settings["STATE_DIR"]
    with contextlib.nullcontext() if dry_run else take_lock(state_dir):
        data = read_config(doors_path)
        doors = parse_doors(data, doors_path)
        environ = with_env_file(environ, settings["ENV_FILE"])
        settings_of = settings_reader(environ)
        record, uses = read_record(state_dir), read_uses(state_dir)
        burned = None if dry_run else burned_uses(record)
        counted = follow_burns(uses, burned or [], now, settings_of, doors)
        if counted != uses:
            write_uses(state_dir, counted)
            uses = counted
        # Timings only: settings_of would derive every PIN door's key.
        events = [next_top_up(rotation_settings(environ, door.name), now, horizon(settings))
                  for door in doors]
        event = min(events, default=None)
        recorded = not (dry_run or verbose) and burned is not None \
            and as_planned(state_dir, data, environ, uses, now)
        if recorded:
            return recorded
        # What a knockd rotation warns of too, on each run that plans again.
        for warning in settings_warnings(
                environ, {door.name: settings_of(door.name) for door in doors}):
            log("warning: " + warning)
        numbers, planned = plan_doors(doors, settings_of, uses, record, now, settings)
        # A door new to the record counts its openings from zero.
        fresh = {numbers[d.name] for d in doors if d.name not in record["numbers"]}
        try:
            previous = LOADED.get(doors_path) if burned is not None else None
            load, loaded = ruleset.render(planned, now, previous, fresh)
        except ValueError as exc:
            raise RotatorError("%s: %s" % (doors_path, exc),
                               "see docs/NFTABLES.md, Limits", EXIT_CONFIG) from None
        plan = Plan(doors=[door.name for door in doors], event=event,
                    starts={door.name: min((w.start for w in door.windows), default=now)
                            for door in planned})
        if dry_run:
            print_windows(planned)
            return plan
        try:
            nft_apply(load)
        except RotatorError as exc:
            if previous is None:
                raise
            # A top-up assumes the table as this process left it: load it whole.
            log("warning: the top-up was refused (%s); loading the whole table" % exc.what)
            load, loaded = ruleset.render(planned, now, fresh=fresh)
            nft_apply(load)
        LOADED[doors_path] = loaded
        record_load(state_dir, numbers, loaded, planned, now)
        record_planned(state_dir, data, environ, uses, now, plan)
    log("loaded the table inet %s: %d doors, their sequences held until %s%s"
        % (ruleset.TABLE, len(planned), utc(held_until(planned, now)),
           "" if event is None else "; next top-up at %s" % utc(event)))
    return plan


def held_until(planned, now):
    """The moment until which every door of PLANNED has a sequence loaded."""
    return min((max(w.valid_until for w in door.windows) for door in planned if door.windows),
               default=now)


def print_windows(planned):
    """What a dry run says it would load: each door's windows, no sequence."""
    for door in planned:
        single = sum(w.use is not None for w in door.windows)
        sys.stdout.write("%s: guards tcp %s; %d sequences, from %s until %s%s\n" % (
            door.name, ",".join(map(str, door.ports)), len(door.windows),
            utc(min(w.valid_from for w in door.windows)),
            utc(max(w.valid_until for w in door.windows)),
            " (single use: several uses of each period)" if single else ""))
