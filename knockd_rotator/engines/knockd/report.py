"""The knockd engine's check (knockd's grammar and its silent traps) and status (for
monitoring, Nagios exit codes)."""

import hashlib
import os
import sys

from knockd_rotator.core.commands import run_command
from knockd_rotator.core.errors import (
    EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_OK, EXIT_RECOVERY, printed_status, STATUS_CODES)
from knockd_rotator.core.files import keep_state, read_config, readable_by_others, utc
from knockd_rotator.core.generator import (
    MAX_PERIOD, period_start, ROTATOR_SUFFIX, RotatorError)
from knockd_rotator.core.plan import AT_MAX, is_rotator, use_count
from knockd_rotator.core.settings import (
    server_settings, settings_reader, settings_warnings, with_env_file)
from knockd_rotator.core.uses import BURNING, BURST_BURNS, BURST_SECONDS, door_openings, read_uses
from knockd_rotator.engines import knockd as engine
from knockd_rotator.engines.knockd import trial
from knockd_rotator.engines.knockd.config import (
    config_errors, door_sequences, finding, ipv6_warnings, parse_config, rotator_doors,
    rotator_errors, trap_errors, trap_warnings, with_placeholders)
from knockd_rotator.engines.knockd.grace import split_grace_block
from knockd_rotator.engines.knockd.instances import (
    CROWDED_DOORS, crowded_knockd, door_load, knockd_files, settings_for)
from knockd_rotator.engines.knockd.one_time import file_errors, one_time_supplies
from knockd_rotator.engines.knockd.processes import knockd_listening
from knockd_rotator.engines.knockd.render import plan_rotation


def check(config_path, environ):
    """Report what knockd 0.8 refuses and the traps it passes over in silence,
    in knockd.conf and every instance's file."""
    settings = server_settings(environ)
    paths = knockd_files(config_path)
    return max(check_file(path, environ, settings_for(path, settings), path == paths[0])
               for path in paths)


def one_time_warnings(placed):
    """(line, what, fix) of the one_time_sequences files PLACED names: used up,
    or with a line longer than the one before it."""
    warnings = []
    for line, path, supply in one_time_supplies(placed):
        if isinstance(supply, OSError):
            continue
        if supply.unused == 0:
            warnings.append((line.number, "one_time_sequences file %s is used up: its door "
                             "opens for nobody" % path, "add sequences at its end"))
        warnings += [(line.number, "line %d of the one_time_sequences file %s has more ports "
                      "than the line before it: once knockd 0.8 moves on to it, other doors "
                      "go deaf" % (number, path), "give every line as many ports")
                     for number in supply.longer]
    return warnings


def unrotated_doors(user_lines):
    """(line, what, fix) of each rotator door of USER_LINES without a sequence yet."""
    with_sequence = door_sequences(user_lines)
    return [(line.number, "rotator door [%s] has no sequence yet: knockd refuses to "
             "start until a rotation writes one" % line.section.decode("utf-8", "replace"),
             "run knockd_rotator_server.py once")
            for line in user_lines if line.kind == "section" and is_rotator(line.section)
            and line.section.decode("utf-8", "surrogateescape") not in with_sequence]


def checked_door_settings(user_lines, settings_of, errors):
    """{door: settings} of the rotator doors of USER_LINES; a door whose
    settings are wrong is appended to ERRORS at its first line instead."""
    first_lines = {}
    for line in user_lines:
        if line.kind == "section" and is_rotator(line.section):
            first_lines.setdefault(line.section.decode("utf-8", "surrogateescape"), line.number)
    door_settings = {}
    for door, number in first_lines.items():
        try:
            door_settings[door] = settings_of(door)
        except RotatorError as exc:
            errors.append((number, "door [%s]: %s" % (door, exc.what), exc.fix))
    return door_settings


def check_file(config_path, environ, settings, whole_run):
    """check() of one file; WHOLE_RUN: also what concerns every file."""
    lines = parse_config(read_config(config_path))
    user_lines, _ = split_grace_block(lines)
    doors = rotator_doors(user_lines)
    placed = with_placeholders(user_lines)
    errors = sorted(config_errors(placed) + rotator_errors(placed) + trap_errors(placed)
                    + file_errors(placed))
    unrotated = unrotated_doors(user_lines)
    warnings = (trap_warnings(placed) + ipv6_warnings(placed) + one_time_warnings(placed)
                + unrotated)
    environ = with_env_file(environ, settings["ENV_FILE"])
    door_settings = checked_door_settings(user_lines, settings_reader(environ), errors)
    for number, what, fix in errors:
        print("error: " + finding(config_path, number, what, fix), file=sys.stderr)
    refusal, untried = (None, None) if errors else trial.knockd_trial(placed, settings)
    if refusal:
        print("error: knockd refuses %s: %s (fix what knockd names)" % (config_path, refusal),
              file=sys.stderr)
    running, detail = run_command(settings["CHECK_COMMAND"])
    listening, deaf = knockd_listening(config_path) if running else (
        False, "knockd is not running (check command failed (%s))" % detail)
    # Before the first rotation knockd cannot run yet: that one starts it.
    first_start = not running and bool(unrotated)
    if listening is False and not first_start:
        print("error: %s (run knockd_rotator_server.py, which starts or resumes it; "
              "journalctl -u %s)" % (deaf, settings["UNIT"]), file=sys.stderr)
    for number, what, fix in sorted(warnings):
        print("warning: " + finding(config_path, number, what, fix), file=sys.stderr)
    others = ["warning: " + warning
              for warning in settings_warnings(environ, door_settings, whole_run)]
    others += ["warning: " + crowded for crowded in [crowded_knockd(lines)] if crowded]
    others += ["warning: %s was not tried on knockd (%s)" % (config_path, untried)
               for untried in [untried] if untried]
    others += ["warning: %s: the first rotation starts it" % deaf] if first_start else []
    others += [warning for warning in (whole_run and readable_by_others(settings["ENV_FILE"]),
                                       readable_by_others(config_path, "the live sequences"))
               if warning]
    for warning in others:
        print(warning, file=sys.stderr)
    if not doors:
        print("warning: %s has no door whose name ends with %s (nothing to rotate)"
              % (config_path, ROTATOR_SUFFIX), file=sys.stderr)
    print("%s: %d errors, %d warnings, %d rotator doors" % (
        config_path, len(errors) + bool(refusal) + (listening is False and not first_start),
        len(warnings) + len(others) + (not doors), len(doors)))
    print("%s: %s compiles %d doors, %d during a grace window (add-client gives it %d at "
          "most; past %d with grace windows, each reload leaves it deaf for 0.5 s or more)"
          % ((config_path, settings["UNIT"]) + door_load(lines)
             + (settings["DOORS_PER_KNOCKD"], CROWDED_DOORS)))
    if listening is False and not first_start:
        return EXIT_RECOVERY
    return EXIT_CONFIG if errors or refusal else EXIT_OK


# Exit codes of `status`: the monitoring (Nagios) convention.
# A door may hold the previous sequence this long after its rotation was due
# (the lead before a boundary) before `status` calls it critical: a rotation
# of many knockd takes seconds (500 doors in 50 knockd: up to 6.3 s).
STATUS_SLACK = 10
# Fewer unused one_time_sequences than this: `status` warns in time to add
# some, before the door opens for nobody (see KEEPER_MARK).
ONE_TIME_LOW = 10


# `status` without any secret (a monitoring account): at each good run the
# rotator records, per door, its period, grace and a fingerprint of the
# sequence it wrote; status compares the file against that.  The fingerprint
# is SHA-256 over the door, the period start and the sequence: learning the
# sequence from it means trying PORT_SPAN ** length candidates.
FINGERPRINTS = "fingerprints"


def fingerprint(door, start, sequence):
    return hashlib.sha256(b"knockd-rotator fingerprint\0%s\0%d\0%s" % (
        door.encode("utf-8", "surrogateescape"), start, sequence)).hexdigest()


def record_fingerprints(state_dir, plan):
    import json
    record = {door: {"period": plan.settings[door].period, "grace": plan.settings[door].grace,
                     "lead": plan.settings[door].lead,
                     "mode": plan.settings[door].mode, "start": plan.starts[door],
                     "fingerprint": fingerprint(door, plan.starts[door], plan.current[door])}
              for door in plan.doors}
    keep_state(os.path.join(state_dir, FINGERPRINTS),
               json.dumps(record, sort_keys=True, indent=1).encode() + b"\n")


def valid_fingerprint(known):
    """Whether KNOWN is an entry of the fingerprints file as record_fingerprints writes it."""
    def whole(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    return (isinstance(known, dict) and whole(known.get("period"), 1, MAX_PERIOD)
            and whole(known.get("grace"), 0, MAX_PERIOD) and whole(known.get("lead", 0), 0,
                                                                  MAX_PERIOD)
            and isinstance(known.get("mode"), str) and "start" in known
            and (known["start"] is None or whole(known["start"], 0, AT_MAX))
            and isinstance(known.get("fingerprint", 0), (str, type(None))))


def recorded_status(old_data, settings, now):
    """door_status()'s doors and plan facts from the fingerprints, no secret needed."""
    import json
    try:
        with open(os.path.join(settings["STATE_DIR"], FINGERPRINTS), "rb") as handle:
            record = json.loads(handle.read())
    except RecursionError:
        record = {}
    except (OSError, ValueError) as exc:
        raise RotatorError("no secret to compute the sequences with, and no fingerprints "
                           "recorded by a rotation (%s)" % getattr(exc, "strerror", exc),
                           "run status as root, or let a rotation run first", EXIT_ENVIRONMENT)
    user_lines, old_block = split_grace_block(parse_config(old_data))
    held = door_sequences(user_lines)
    doors = []
    for door in rotator_doors(user_lines):
        known = record.get(door) if isinstance(record, dict) else None
        if not valid_fingerprint(known):      # damaged, or no rotation recorded it
            known = {"period": 1, "grace": 0, "mode": "?", "start": None, "fingerprint": None}
        period, grace, lead = known["period"], known["grace"], known.get("lead", 0)
        start = period_start(now + lead, period)
        matches = fingerprint(door, known["start"] or 0, held.get(door) or b"") == \
            known["fingerprint"]
        doors.append({"door": door, "mode": known["mode"], "period": period, "grace": grace,
                      "lead": lead, "period_start": start,
                      "next_rotation_in": int(start + period - lead - now),
                      "grace_active": now < start + grace,
                      "current": matches and known["start"] == start,
                      "previous": matches and known["start"] == start - period,
                      "sequence": (held.get(door) or b"").decode("utf-8", "replace")})
    return doors, old_block, None


def planned_status(config_path, old_data, environ, settings, now):
    """door_status()'s doors and plan facts, from the secrets."""
    uses = read_uses(settings["STATE_DIR"])
    plan = plan_rotation(config_path, old_data, now,
                         settings_reader(with_env_file(environ, settings["ENV_FILE"])),
                         uses=uses, burning=os.path.join(settings["STATE_DIR"], BURNING))
    held = door_sequences(plan.user_lines)
    doors = []
    for door in plan.doors:
        door_settings, start = plan.settings[door], plan.starts[door]
        period, grace, lead = door_settings.period, door_settings.grace, door_settings.lead
        entry = {"door": door, "mode": door_settings.mode, "period": period, "grace": grace,
                 "lead": lead, "period_start": start,
                 "next_rotation_in": int(start + period - lead - now),
                 "grace_active": door in plan.graced,
                 "current": held.get(door) == plan.current[door]}
        entry["previous"] = (not entry["current"] and
                             held.get(door) == door_settings.sequence_at(start - period))
        entry["sequence"] = (held.get(door) or b"").decode("utf-8", "replace")
        if door_settings.single_use:
            burns = uses.get(door, {}).get("burns", [])
            entry["uses"] = use_count(uses, door_settings, start)
            entry["burns_last_minute"] = sum(1 for t in burns if now - t < BURST_SECONDS)
            # Recorded by burn_command's gate: one opening per use is a knock,
            # more are replays (or a client's retries) within the burn's window.
            openings = door_openings(settings["STATE_DIR"], uses, door, start)
            entry["openings"] = sum(openings.values())
            entry["uses_opened"] = len(openings)
        doors.append(entry)
    return doors, plan.old_block, b"".join(line.raw for line in plan.new_lines) == old_data


def door_status(config_path, environ, now):
    """The state of every rotator door at NOW, as a dict (see docs/OPERATIONS.md, Check and monitor):
    knockd.conf's report, with those of the instances' files in "instances"."""
    settings = server_settings(environ)
    reports = [knockd_status(path, environ, settings_for(path, settings), now)
               for path in knockd_files(config_path)]
    reports[0]["instances"] = reports[1:]
    return reports[0]


def knockd_status(config_path, environ, settings, now):
    """The state of the rotator doors of CONFIG_PATH and of its knockd.
    Without the secrets (a monitoring account), from the recorded fingerprints."""
    old_data = read_config(config_path)
    try:
        doors, old_block, file_current = planned_status(config_path, old_data, environ,
                                                        settings, now)
        source = "secrets"
    except RotatorError as exc:
        if exc.code != EXIT_ENVIRONMENT:
            raise
        doors, old_block, file_current = recorded_status(old_data, settings, now)
        source = "fingerprints"
    try:
        with open(os.path.join(settings["STATE_DIR"], "last-rotation")) as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        last = None
    enforced = engine.status(config_path, settings, old_data)
    report = {
        "config": config_path, "now": int(now), "checked_with": source,
        "next_rotation_in": min((door["next_rotation_in"] for door in doors), default=None),
        "grace_active": any(door["grace_active"] for door in doors),
        "grace_until": max((door["period_start"] + door["grace"] for door in doors
                            if door["grace_active"]), default=None),
        "grace_block_present": bool(old_block),
        "file_current": file_current,
        "knockd_active": enforced["knockd_active"], "last_rotation": last, "doors": doors,
    }
    report.update(enforced)
    return report


def status_state(report):
    """(state, reasons) of a door_status() report: the worst of its knockd's."""
    states = [knockd_state(report)] + [knockd_state(instance, instance["knockd"] + ": ")
                                       for instance in report["instances"]]
    worst = max(states, key=lambda state: STATUS_CODES[state[0]])[0]
    return worst, [reason for state in states for reason in state[1]]


def knockd_state(report, prefix=""):
    """(state, reasons) of one knockd's report; each reason starts with PREFIX."""
    critical, warning = [], []
    if not report["knockd_active"]:
        critical.append("knockd is not active")
    elif report.get("knockd_listening") is False:
        critical.append(report["knockd_listening_why"])
    # A file ahead of knockd hides behind a current file (one that is not
    # current is reported as such, and the next run rewrites and reloads it).
    hidden = report.get("file_current") is not False and all(door["current"]
                                                             for door in report["doors"])
    if report["knockd_active"] and report.get("knockd_loaded") is False and hidden:
        # A rotation writes the file, then reloads: not yet is not never.
        if report["now"] - report["file_written"] < STATUS_SLACK:
            warning.append("knockd has not re-read %s yet" % report["config"])
        else:
            critical.append("knockd runs with an older file than %s (a reload failed or "
                            "was cut short: the next run reloads it, or run "
                            "knockd_rotator_server.py)" % report["config"])
    for door in report["doors"]:
        if door["current"]:
            continue
        late = report["now"] - (door["period_start"] - door["lead"])
        if door["previous"] and late < STATUS_SLACK:
            warning.append("%s: rotation due" % door["door"])
        else:
            critical.append("%s does not hold the current sequence" % door["door"])
    for door in report["doors"]:
        if door.get("burns_last_minute", 0) >= BURST_BURNS:
            warning.append("%s opened %d times in %d s (a client in a loop, or a replay?)"
                           % (door["door"], door["burns_last_minute"], BURST_SECONDS))
        if door.get("openings", 0) > door.get("uses_opened", 0):
            warning.append("%s: %d openings of %d uses this period (a replay within a burn's "
                           "window, or a client that knocked twice)"
                           % (door["door"], door["openings"], door["uses_opened"]))
    if report.get("crowded"):
        warning.append(report["crowded"])
    for supply in report.get("one_time_sequences", []):
        unused, file = supply["unused"], supply["file"]
        if unused is None:
            critical.append("one_time_sequences file %s: unreadable (knockd exits at its next "
                            "reload)" % file)
        elif supply["kept"] and unused == 0:
            critical.append("one_time_sequences file %s: used up (its door opens for nobody "
                            "until you add lines)" % file)
        elif not supply["kept"] and unused < 2:
            critical.append("one_time_sequences file %s: %d unused and no keeper line yet "
                            "(knockd stops when it has used the last)" % (file, unused))
        elif unused < ONE_TIME_LOW:
            warning.append("one_time_sequences file %s: %d unused (its door opens for nobody "
                           "once they are used up)" % (file, unused))
    if report["grace_block_present"] != report["grace_active"]:
        warning.append("the grace block is %s" % ("left after the grace" if
                                                   report["grace_block_present"] else "missing"))
    critical, warning = [prefix + reason for reason in critical], \
        [prefix + reason for reason in warning]
    if critical:
        return "CRITICAL", critical + warning
    return ("WARNING", warning) if warning else ("OK", [])


def status(config_path, environ, now, as_json, show_sequences):
    """Print the state for monitoring; returns its Nagios exit code."""
    try:
        report = door_status(config_path, environ, now)
    except RotatorError as exc:
        report, state, reasons = None, "UNKNOWN", [str(exc)]
    else:
        state, reasons = status_state(report)
        reports = [report] + report["instances"]
        if not show_sequences:
            for door in (door for each in reports for door in each["doors"]):
                del door["sequence"]
    printed = printed_status(state, reasons, report, as_json)
    if printed is not None:
        return printed
    next_rotation = min((each["next_rotation_in"] for each in reports
                         if each["next_rotation_in"] is not None), default=None)
    summary = "; ".join(reasons) or "%d doors current" % sum(len(each["doors"])
                                                              for each in reports)
    print("KNOCKD_ROTATOR %s - %s; next rotation %s; knockd %s" % (
        state, summary, "none (no rotator door)" if next_rotation is None else
        "in %d s" % next_rotation,
        "active" if all(each["knockd_active"] for each in reports) else "NOT active"))
    last = max((each["last_rotation"] for each in reports if each["last_rotation"]),
               default=None)
    print("last rotation: %s" % (utc(last) if last is not None else "none recorded"))
    until = max((each["grace_until"] for each in reports if each["grace_active"]), default=None)
    print("grace: %s" % ("active until %s" % utc(until) if until else "not active"))
    for each in reports:
        print("%s on %s: %s, %d doors, %d during a grace window (add-client gives it %d at "
              "most)" % (each["knockd"], each["config"], "active" if each["knockd_active"]
                         else "NOT active", each["door_count"], each["doors_in_grace"],
                         each["doors_per_knockd"]))
        for door in each["doors"]:
            print("%s: %s%s%s" % (door["door"], "current" if door["current"] else
                                  "previous period's" if door["previous"] else "NOT current",
                                  "; single use, used %d times this period%s" % (
                                      door["uses"], ", %d openings of %d uses" % (
                                          door["openings"], door["uses_opened"])
                                      if door["openings"] > door["uses_opened"] else "")
                                  if "uses" in door else "",
                                  " " + door["sequence"] if show_sequences else ""))
    return STATUS_CODES[state]
