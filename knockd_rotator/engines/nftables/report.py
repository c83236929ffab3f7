"""check and status under the nftables engine.

check: the doors file, every door's settings, and `nft -c` of the table a
load would make now.  status: whether the table is there, whether every door
holds a sequence now and how far ahead, and the openings the kernel counted,
from the table and the last load's record (no secret needed).
"""

import os
import sys

from knockd_rotator.core.errors import EXIT_CONFIG, EXIT_OK, printed_status, STATUS_CODES
from knockd_rotator.core.files import read_config, utc
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.settings import (
    server_settings, settings_reader, settings_warnings, with_env_file)
from knockd_rotator.core.uses import read_uses
from knockd_rotator.engines.nftables import kernel, load, ruleset
from knockd_rotator.engines.nftables.doors import parse_doors



def knockd_running():
    """Whether a knockd runs in this network namespace: under this engine it
    opens none of its doors, and its own doors (start_command) open ports
    beside the table's.  One in another namespace hears none of our packets."""
    here = os.stat("/proc/self/ns/net").st_ino
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/comm" % pid, "rb") as handle:
                if handle.read().strip() == b"knockd" \
                        and os.stat("/proc/%s/ns/net" % pid).st_ino == here:
                    return True
        except OSError:
            continue
    return False


def check(doors_path, environ, now):
    """Check the doors file and the table a load would make; 0 or 4."""
    settings = server_settings(environ)
    environ = with_env_file(environ, settings["ENV_FILE"])
    doors = parse_doors(read_config(doors_path), doors_path)
    settings_of = settings_reader(environ)
    warnings = settings_warnings(environ, {door.name: settings_of(door.name) for door in doors})
    if knockd_running():
        warnings.append("knockd runs, but KNOCKD_ROTATOR_ENGINE=nftables: the table matches "
                        "the knocks, and knockd's own doors open ports beside it (systemctl "
                        "disable --now knockd, once the doors file holds every door)")
    for warning in warnings:
        print("warning: " + warning, file=sys.stderr)
    record = load.read_record(settings["STATE_DIR"])
    _, planned = load.plan_doors(doors, settings_of, read_uses(settings["STATE_DIR"]), record,
                                 now, settings)
    try:
        whole, _ = ruleset.render(planned, now)
        kernel.apply(whole, check=True)
    except (ValueError, RuntimeError) as exc:
        raise RotatorError("%s: %s" % (doors_path, " ".join(str(exc).split())),
                           "see docs/NFTABLES.md; nft -c needs root", EXIT_CONFIG) from None
    except FileNotFoundError:
        raise RotatorError("nft is not installed", "apt-get install nftables",
                           EXIT_CONFIG) from None
    print("%s: %d doors; nft -c accepts the table they make" % (doors_path, len(doors)))
    return EXIT_OK


def door_report(name, entry, now, opens):
    """One door's part of the status, from the record's ENTRY."""
    windows = entry.get("windows", [])
    holding = [w for w in windows if w[2] <= now < w[3]]
    until = max((w[3] for w in windows), default=None)
    report = {"door": name, "guard": entry.get("guard"), "period": entry.get("period", 0),
              "holds_now": bool(holding),
              "held_until": until, "held_for": None if until is None else int(until - now),
              "opens": opens.get(entry.get("number"))}
    uses = sorted({w[1] for w in holding if w[1] is not None})
    if uses:
        report["next_uses"] = uses
    return report


def door_status(doors_path, environ, now):
    """The status report of the table and the doors of DOORS_PATH."""
    settings = server_settings(environ)
    doors = parse_doors(read_config(doors_path), doors_path)
    record = load.read_record(settings["STATE_DIR"])
    try:
        table = kernel.table_state()
    except (OSError, RuntimeError) as exc:
        raise RotatorError("cannot read the table: %s" % " ".join(str(exc).split())[:300],
                           "run as root, with nftables installed", EXIT_CONFIG) from None
    recorded = record["doors"]
    opens = table.opens if table else {}
    return {"now": int(now), "doors_file": doors_path, "table": "inet " + ruleset.TABLE,
            "table_present": table is not None, "loaded": record["loaded"],
            "kernel_windows": table.cohorts if table else [],
            "open_sources": table.sources if table else 0,
            "unloaded_doors": [door.name for door in doors if door.name not in recorded],
            "doors": [door_report(door.name, recorded[door.name], now, opens)
                      for door in doors if door.name in recorded]}


def status_state(report):
    """(state, reasons) of a door_status() REPORT."""
    critical, warning = [], []
    if not report["table_present"]:
        critical.append("the table %s is not loaded: the guarded ports are not guarded (run "
                        "knockd_rotator_server.py)" % report["table"])
    now = report["now"]
    for door in report["doors"]:
        spans = [(start, end) for start, end in report["kernel_windows"] if start <= now < end]
        if not door["holds_now"] or (report["table_present"] and not spans):
            critical.append("%s holds no sequence now: it opens for nobody" % door["door"])
        elif door["held_for"] < door["period"]:
            warning.append("%s holds sequences for %d s only (is the server running?)"
                           % (door["door"], door["held_for"]))
    for name in report["unloaded_doors"]:
        warning.append("%s is in %s but not in the table yet (run knockd_rotator_server.py)"
                       % (name, report["doors_file"]))
    if critical:
        return "CRITICAL", critical + warning
    return ("WARNING", warning) if warning else ("OK", [])


def status(doors_path, environ, now, as_json):
    """Print the state for monitoring; returns its Nagios exit code."""
    try:
        report = door_status(doors_path, environ, now)
        state, reasons = status_state(report)
    except RotatorError as exc:
        report, state, reasons = None, "UNKNOWN", [str(exc)]
    printed = printed_status(state, reasons, report, as_json)
    if printed is not None:
        return printed
    print("KNOCKD_ROTATOR %s - %s; table %s %s" % (
        state, "; ".join(reasons) or "%d doors hold their sequences" % len(report["doors"]),
        report["table"], "loaded" if report["table_present"] else "NOT loaded"))
    print("last load: %s" % (utc(report["loaded"]) if report["loaded"] else "none recorded"))
    for door in report["doors"]:
        sys.stdout.write("%s: guards tcp %s; %s; sequences held until %s%s%s\n" % (
            door["door"], ",".join(map(str, door["guard"] or ())),
            "holds one now" if door["holds_now"] else "holds NONE now",
            utc(door["held_until"]) if door["held_until"] else "-",
            "" if door["opens"] is None else "; opened %d times" % door["opens"],
            "; single use, next uses %s" % ",".join(map(str, door["next_uses"]))
            if "next_uses" in door else ""))
    return STATUS_CODES[state]
