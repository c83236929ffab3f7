#!/usr/bin/env python3
"""knockd-rotator server: keep the [*_ROTATOR] doors of knockd.conf current.

Every section of knockd.conf whose name ends with `_ROTATOR` gets, as its
`sequence`, the sequence of the current period (docs/SPEC.md), derived from the
same secret and settings the clients use.  Then knockd is made to load it.

Usage (as root, from knockd_rotator.timer or knockd_rotator-watch.service):
    knockd_rotator_server.py                 rotate /etc/knockd.conf now
    knockd_rotator_server.py --dry-run       show the diff, change nothing
    knockd_rotator_server.py --watch         rotate at every boundary and grace end
    knockd_rotator_server.py check           knockd's grammar and its silent traps
    knockd_rotator_server.py status --json   for monitoring (Nagios exit codes)
    knockd_rotator_server.py add-client alice --firewall iptables [--pin] [--totp]
    knockd_rotator_server.py list-clients    remove-client alice

Environment (from /etc/knockd_rotator.env, mode 0600, which every run reads
again over the environment it was started with):
    KNOCKD_ROTATOR_SECRET, _PIN, _MODE, _LENGTH, _PORT_MODULO, _PERIOD_MODULO,
    _GRACE, _ALGORITHM     as the client; each also per door, e.g.
                           KNOCKD_ROTATOR_SECRET_ALICE_SSH for [alice_ssh_ROTATOR]
    KNOCKD_ROTATOR_RELOAD_COMMAND   default: systemctl reload knockd
    KNOCKD_ROTATOR_CHECK_COMMAND    default: systemctl is-active --quiet knockd
    KNOCKD_ROTATOR_RECOVER_COMMAND  default: systemctl reload-or-restart knockd
    KNOCKD_ROTATOR_INSTANCE_RELOAD_COMMAND, _INSTANCE_CHECK_COMMAND,
    _INSTANCE_RECOVER_COMMAND, _INSTANCE_KILL_COMMAND
                                    the same for the further knockd, %i for the
                                    instance (knockd_rotator-knockd@%i)
    KNOCKD_ROTATOR_DOORS_PER_KNOCKD doors add-client gives one knockd (10); then
                                    it starts another, on knockd_rotator.d/N.conf
    KNOCKD_ROTATOR_TRIAL_KNOCKD     knockd run on a file in a new shape first
                                    (/usr/sbin/knockd; empty: no trial)
    KNOCKD_ROTATOR_LEAD             seconds before a boundary at which the doors get
                                    the next sequences (10; at most period - grace)
    KNOCKD_ROTATOR_CHECK_SECONDS    how long knockd must stay up after a reload (2)
    KNOCKD_ROTATOR_SERVER_INTERVAL  seconds between timer runs (3600)
    KNOCKD_ROTATOR_STATE_DIR        lock and pending run (/var/lib/knockd_rotator)
    KNOCKD_ROTATOR_ENV_FILE         that file (/etc/knockd_rotator.env); add-client
                                    writes the secrets of new clients into it

Safety:
  - Only the values of `sequence` lines of rotator doors change; every other
    byte of knockd.conf stays as it was.  The new file is checked against
    knockd 0.8's grammar before it is written, and a file in a shape knockd
    has not run is tried on a second knockd that hears nothing, so a file
    knockd would refuse (knockd exits on such a reload) is reported instead
    of loaded.  one_time_sequences files get a keeper line, so that knockd
    does not stop when they are used up.
  - The file is swapped atomically (temp file beside it, same mode and owner,
    fsync, rename, fsync of the folder): a crash leaves the old or the new file.
  - A lock serialises runs.  Nothing is written or reloaded when the file is
    already current.
  - knockd is reloaded (SIGHUP), never restarted: a restart kills the children
    that run stop_command after cmd_timeout, and leaves those ports open.
  - From KNOCKD_ROTATOR_LEAD seconds before a boundary (default 10) the doors
    hold the next period's sequences, and until KNOCKD_ROTATOR_GRACE seconds
    after it a generated block of sibling doors at the end of the file holds
    the sequences before those; the block is removed, byte-exactly, when the
    grace ends (docs/SPEC.md).  So a rotation of many knockd that ends
    seconds late still has every knockd ready at the boundary.
  - If knockd is not running after the reload, the previous file is put back
    and knockd is reloaded or started again; the run then fails.  If knockd
    was not running before (a first install: knockd refuses a door without a
    sequence), it is started with the new file instead of reloaded.
  - knockd.conf is the user's: add-client puts clients beyond
    DOORS_PER_KNOCKD into files the rotator owns, knockd_rotator.d/N.conf
    beside it, each read by a knockd of its own, so that no reload keeps a
    knockd deaf for long.  Every run rotates them all, each as knockd.conf.
  - The secret comes from the environment only and is never logged; only
    add-client prints one, once, for the client it makes.  add-client and
    remove-client change knockd.conf and the environment file under the same
    lock, each atomically, and leave both as they were when anything fails.
"""

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

VERSION = "0.1.0"

# Exit codes, listed in docs/OPERATIONS.md (Exit codes).
EXIT_OK = 0
EXIT_FAILED = 1         # knockd did not take the new file; the old one is back
EXIT_USAGE = 2          # bad command line
EXIT_ENVIRONMENT = 3    # a KNOCKD_ROTATOR_* variable is missing or invalid
EXIT_CONFIG = 4         # knockd.conf cannot be read, or knockd would refuse it
EXIT_BUSY = 6           # another run held the lock for too long
EXIT_RECOVERY = 7       # knockd is down and could not be brought back: act now

SCRIPT = os.path.abspath(__file__)
DEFAULT_CONFIG = "/etc/knockd.conf"
DEFAULT_COMMANDS = {
    "RELOAD_COMMAND": "systemctl reload knockd",
    "CHECK_COMMAND": "systemctl is-active --quiet knockd",
    # After a failed reload knockd may have exited: reload-or-restart starts it.
    "RECOVER_COMMAND": "systemctl reload-or-restart knockd",
    # A knockd that hangs after a reload (it never re-read the file) is ended
    # with this before the recover command starts it again.
    "KILL_COMMAND": "systemctl kill --signal=KILL knockd",
}
# The same for the further knockd that add-client starts (see "Several
# knockd"); %i is the instance's name.
INSTANCE_UNIT = "knockd_rotator-knockd@%i"
DEFAULT_INSTANCE_COMMANDS = {
    "INSTANCE_RELOAD_COMMAND": "systemctl reload " + INSTANCE_UNIT,
    "INSTANCE_CHECK_COMMAND": "systemctl is-active --quiet " + INSTANCE_UNIT,
    # enable: a knockd started for a new file must come back after a reboot.
    "INSTANCE_RECOVER_COMMAND": "systemctl enable --quiet %s && systemctl reload-or-restart %s"
                                % (INSTANCE_UNIT, INSTANCE_UNIT),
    "INSTANCE_KILL_COMMAND": "systemctl kill --signal=KILL " + INSTANCE_UNIT,
}
# add-client gives each knockd at most this many doors (grace siblings aside):
# while a rotation of 500 doors reloaded them two at a time on 2 CPUs, 10
# doors of 10 ports and their siblings kept each knockd deaf for 151 ms at
# most; 12 doors for up to 216 ms, 15 for 248 ms (bench/knockd_instances.py,
# docs/BENCHMARKS.md).
DEFAULT_DOORS_PER_KNOCKD = 10
# Seconds before a boundary at which the server already writes the next
# period's sequence, keeping the current one as the grace sibling (at most
# period - grace): a rotation of many knockd ends seconds after it starts
# (500 doors in 50 knockd: 4.5 to 5 s on 2 CPUs), and the last knockd must not
# still hold the old sequence once the boundary has passed.
DEFAULT_LEAD = 10
DEFAULT_STATE_DIR = "/var/lib/knockd_rotator"
DEFAULT_ENV_FILE = "/etc/knockd_rotator.env"
DEFAULT_CHECK_SECONDS = 2
# A check shorter than this can pass before knockd has even handled the
# SIGHUP (and died of a file it refuses): 0 passed 5 runs of 5 with knockd dead.
MIN_CHECK_SECONDS = 1
DEFAULT_SERVER_INTERVAL = 3600

COMMAND_TIMEOUT = 30     # seconds a reload, check or recover command may take
CHECK_POLL = 0.05        # seconds between two runs of the check command
# After knockd has re-read its file, this long alive is enough: a file it
# refuses makes it exit at once.
RELOAD_SETTLE = 0.2
LOCK_TIMEOUT = 60        # seconds to wait for another run to finish
# A boundary this much after the next timer run is still taken by a boundary
# run: the timer may fire a little late.
TIMER_SLACK = 60
# A failed event (a reload knockd refused, a busy lock) is tried again at the
# doors' next event, or this many seconds later if that comes first.
RETRY_SECONDS = 60
# Temp files are `.knockd.conf.XXXX.knockd_rotator.tmp` beside the file; a
# killed run may leave one, which the next run removes.
TEMP_SUFFIX = ".knockd_rotator.tmp"
# RFC 4226 asks for at least 128 bits; add-client makes 160, as RFC 4226 advises.
TOTP_MIN_KEY_BYTES = 16
TOTP_NEW_KEY_BYTES = 20


# BEGIN SHARED GENERATOR
# This block is byte-identical in knockd_rotator_client.py and
# knockd_rotator_server.py (tests/test_shared_block.py compares them): the two
# files are deployed apart, so each carries its own copy.  It holds what both
# need: the error type, the settings, the generator, and the command line's
# error and prefix handling.  It is pure: no clock, no environment, no I/O;
# callers pass the time and the variables in.
# docs/SPEC.md specifies the algorithm byte by byte.

ROTATOR_SUFFIX = "_ROTATOR"
ALGORITHM_TAG = b"knockd-rotator/1"
MIN_PORT = 2000        # below this live well-known services a scan hits first
MAX_PORT = 65535
PORT_SPAN = MAX_PORT - MIN_PORT + 1   # 63536 equally likely ports
MAX_LENGTH = 32        # knockd 0.8 takes at most 32 ports in a sequence
# knockd only sees the ports of its doors, so a port scan run upwards twice
# (or downwards) hits them in every rotation of their sorted order: of the
# L!-2 orders the generator draws, 2(L-1) open.  Length 6: 1 in 72 per
# period; 10: 1 in 200 000 (docs/SPEC.md, "Validation").
MIN_LENGTH = 10
# Secrets that a person makes up fall to a dictionary run against one sniffed
# knock; a random one of 128 bits does not.  Legacy doors keep the old
# floor (their clients are not ours to change), and the server warns.
MIN_SECRET_BITS = 128
LEGACY_MIN_SECRET_CHARS = 10
MAX_PERIOD = 366 * 86400   # a longer period is a static sequence in practice
# Seconds after a boundary during which the previous sequence still opens the
# door (docs/SPEC.md): covers clocks up to this far behind, and a knock sent
# as the period turns.  At most half the period, so a short period shrinks it.
DEFAULT_GRACE = 30
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_USE = 2 ** 32 - 1      # single use's counter goes into the key as u32be(use)
# Every whole number read (settings, options) is an optional `-` and at most
# this many ASCII digits (docs/SPEC.md, "Whole numbers"): any 64-bit value
# fits, and no text is long enough to make a conversion costly or fail.
NUMBER_DIGITS_MAX = 20
DOOR_NAME_MAX = 127        # bytes of UTF-8: knockd cuts section names here
# Code points no door name holds (docs/SPEC.md, "Door names"): a fixed list,
# not a Unicode database's categories, so every implementation and version
# decides alike.  C0 and C1 controls and DEL (knockd would not read such a
# line), the brackets of knockd's section headers, the line and paragraph
# separators (an editor breaks the header there), and the surrogates that
# stand for bytes that are not UTF-8.
DOOR_NAME_REFUSED = ((0x00, 0x1F), (0x5B, 0x5B), (0x5D, 0x5D), (0x7F, 0x9F),
                     (0x2028, 0x2029), (0xD800, 0xDFFF))


class RotatorError(Exception):
    """An expected failure: printed as `error: WHAT (FIX)`, exits with CODE."""

    def __init__(self, what, fix, code):
        super().__init__(what)
        self.what, self.fix, self.code = what, fix, code

    def __str__(self):
        return ("error: %s (%s)" % (self.what, self.fix)).translate(ONE_LINE)


# What an error line quotes (an argument, a value) is shown escaped where it
# would break the line: an error is exactly one line.
ONE_LINE = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7F, 0xA0))}
ONE_LINE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def door_name(service):
    """The knockd section name for SERVICE: `_ROTATOR` is appended if missing."""
    return service if service.endswith(ROTATOR_SUFFIX) else service + ROTATOR_SUFFIX


def door_name_refused(door):
    """Whether DOOR breaks docs/SPEC.md's rule for door names: too long, or a
    code point of DOOR_NAME_REFUSED."""
    return (len(door.encode("utf-8", "surrogateescape")) > DOOR_NAME_MAX
            or any(low <= ord(character) <= high for character in door
                   for low, high in DOOR_NAME_REFUSED))


def parse_number(text):
    """TEXT as an int when it is a whole number of docs/SPEC.md's grammar: an
    optional `-`, then 1 to NUMBER_DIGITS_MAX ASCII digits.  Else None."""
    digits = text[1:] if text[:1] == "-" else text
    if 0 < len(digits) <= NUMBER_DIGITS_MAX and digits.isascii() and digits.isdigit():
        return int(text)
    return None


def period_start(now, period, offset=0):
    """Start of the period holding NOW, moved by OFFSET whole periods."""
    return (int(now // period) + offset) * period


def _field(data):
    return len(data).to_bytes(4, "big") + data


def _is_monotonic(ports):
    pairs = list(zip(ports, ports[1:]))
    return all(a < b for a, b in pairs) or all(a > b for a, b in pairs)


def check_start(start):
    """Every algorithm's period start is a signed 64-bit number (docs/SPEC.md, step 1)."""
    if not INT64_MIN <= start <= INT64_MAX:
        raise RotatorError("period start %d is out of range" % start,
                           "use a smaller --offset", EXIT_USAGE)


def generate_sequence(secret, door, start, length, port_modulo):
    """The knock sequence of DOOR for the period starting at START.

    SECRET is bytes; DOOR is the full section name (with `_ROTATOR`).
    Returns a list of (port, "tcp" | "udp").
    """
    check_start(start)
    prefix = (_field(ALGORITHM_TAG)
              + _field(door.encode("utf-8", "surrogateescape"))
              + start.to_bytes(8, "big", signed=True))
    ports = []
    counter = 0
    while True:
        block = hmac.new(secret, prefix + counter.to_bytes(4, "big"),
                         hashlib.sha256).digest()
        counter += 1
        for i in range(0, len(block), 2):
            value = int.from_bytes(block[i:i + 2], "big")
            # Rejection sampling: 65536 is not a multiple of PORT_SPAN, and a
            # modulo would make the low ports more likely than the others.
            if value >= PORT_SPAN:
                continue
            port = MIN_PORT + value
            if port in ports:
                continue
            ports.append(port)
            if len(ports) < length:
                continue
            # An ascending (or descending) port scan opens a monotonic door,
            # since knockd never sees the ports between its knocks.
            if length >= 3 and _is_monotonic(ports):
                ports = []
                continue
            return with_protocols(ports, port_modulo)


def with_protocols(ports, port_modulo):
    """(port, "tcp" | "udp") pairs: TCP when PORT_MODULO is 0 or divides the port."""
    return [(p, "tcp" if port_modulo == 0 or p % port_modulo == 0 else "udp") for p in ports]


def legacy_draws(secret, door, start, length, count):
    """Knock Rotator's draws, each 0..COUNT-1: the first 8 hex digits of a
    plain SHA-256 of the period start, door, secret and index, modulo COUNT."""
    check_start(start)
    for index in range(1, length + 1):
        text = b"%d" % start + door.encode("utf-8", "surrogateescape") + secret + b"%d" % index
        yield int(hashlib.sha256(text).hexdigest()[:8], 16) % count


def legacy_v1_sequence(secret, door, start, length, port_modulo):
    """The sequence of Knock Rotator v1.0.1 and 2.0.0, for
    KNOCKD_ROTATOR_ALGORITHM=legacy-v1.

    Kept only so that their clients go on working: a plain SHA-256 of the
    secret next to public text, a modulo bias, repeats and scan order are
    possible.
    """
    return with_protocols([MIN_PORT + draw for draw in
                           legacy_draws(secret, door, start, length, PORT_SPAN)], port_modulo)


# Knock Rotator 3.0.0 draws from the list KNOCKD_ROTATOR_PORTS, by default
# 2000-65536: 63 537 ports, the last of which no packet can carry.
LEGACY_V3_PORTS = "2000-65536"


def legacy_v3_sequence(secret, door, start, length, port_modulo, ranges):
    """The sequence of Knock Rotator 3.0.0 (legacy-v3): v1's draws over the
    sorted port list RANGES [(low, high)].  A period that draws a port above
    65535 (3.0.0's own client stops there) takes the knockd-rotator/1
    sequence of the same secret instead."""
    ports = []
    for draw in legacy_draws(secret, door, start, length,
                             sum(high - low + 1 for low, high in ranges)):
        for low, high in ranges:
            if draw <= high - low:
                ports.append(low + draw)
                break
            draw -= high - low + 1
    if max(ports) > MAX_PORT:
        return generate_sequence(secret, door, start, length, port_modulo)
    return with_protocols(ports, port_modulo)


def legacy_port_ranges(variable, text):
    """KNOCKD_ROTATOR_PORTS of legacy-v3: `LOW-HIGH` ranges and single ports,
    comma-separated (spaces and tabs around each allowed), none twice, at
    least 2 -> sorted [(low, high)]."""
    ranges = []
    for part in text.split(","):
        low, dash, high = part.strip(" \t").partition("-")
        bounds = (parse_number(low), parse_number(high if dash else low))
        if None in bounds:
            ranges = []           # the check below refuses it
            break
        ranges.append(bounds)
    ranges.sort()
    if (not ranges or not all(1 <= low <= high <= MAX_PORT + 1 for low, high in ranges)
            or any(later[0] <= earlier[1] for earlier, later in zip(ranges, ranges[1:]))
            or sum(high - low + 1 for low, high in ranges) < 2):
        raise RotatorError("%s is %r" % (variable, text[:40]),
                           "give ports and ranges of ports, comma-separated, none twice, at "
                           "least 2, as Knock Rotator 3.0.0 took them: 2000-65536",
                           EXIT_ENVIRONMENT)
    return ranges


# KNOCKD_ROTATOR_ALGORITHM: the name of each generator.
ALGORITHMS = {"knockd-rotator/1": generate_sequence, "legacy-v1": legacy_v1_sequence,
              "legacy-v3": legacy_v3_sequence}


def format_sequence(sequence, separator=","):
    """`port:proto` items: knockd.conf form, or the C `knock` form with " "."""
    return separator.join("%d:%s" % knock for knock in sequence)


# ---- settings: KNOCKD_ROTATOR_<SETTING>, or KNOCKD_ROTATOR_<SETTING>_<NAME>
# for the one door whose settings name is NAME (see settings_name).
DOOR_SETTINGS = ("SECRET", "PIN", "MODE", "LENGTH", "PORT_MODULO", "PERIOD_MODULO",
                 "GRACE", "ALGORITHM", "SINGLE_USE")
# Knock Rotator's own names, read for legacy doors only: SALT (v1.0.1's
# secret), PORTS and PROTO_MODULO (3.0.0's port list and port modulo).
LEGACY_SETTINGS = ("SALT", "PORTS", "PROTO_MODULO")
# (the algorithms that read each, what a knockd-rotator/1 door reads instead)
LEGACY_READERS = {"SALT": (("legacy-v1", "legacy-v3"), "KNOCKD_ROTATOR_SECRET"),
                  "PORTS": (("legacy-v3",), "no port list: its ports are 2000-65535"),
                  "PROTO_MODULO": (("legacy-v3",), "KNOCKD_ROTATOR_PORT_MODULO")}
# The settings of the one script or the other that are not per door: an
# environment file may serve both.
SCRIPT_SETTINGS = ("RELOAD_COMMAND", "CHECK_COMMAND", "RECOVER_COMMAND", "KILL_COMMAND",
                   "INSTANCE_RELOAD_COMMAND", "INSTANCE_CHECK_COMMAND",
                   "INSTANCE_RECOVER_COMMAND", "INSTANCE_KILL_COMMAND", "DOORS_PER_KNOCKD",
                   "TRIAL_KNOCKD", "CHECK_SECONDS", "SERVER_INTERVAL", "STATE_DIR", "ENV_FILE",
                   "USES_FILE", "LEAD")


def unread_variables(environ, algorithms):
    """A warning for each KNOCKD_ROTATOR_* variable of ENVIRON that nothing
    reads: a typo, or one of Knock Rotator's names (LEGACY_SETTINGS) that no
    door's algorithm (of the set ALGORITHMS) reads.  Ignored in silence, they
    would leave a migration to guess why its clients do not match."""
    warnings = []
    read = SCRIPT_SETTINGS + DOOR_SETTINGS
    one_door = tuple(known + "_" for known in DOOR_SETTINGS)    # each client has its own
    for variable in sorted(environ):
        if not variable.startswith("KNOCKD_ROTATOR_"):
            continue
        setting = variable[len("KNOCKD_ROTATOR_"):]
        if setting in read or setting.startswith(one_door):
            continue
        base = [known for known in LEGACY_SETTINGS
                if setting == known or setting.startswith(known + "_")]
        if not base:
            warnings.append("%s is no setting of knockd-rotator (a typo?); it is ignored"
                            % variable)
            continue
        readers, instead = LEGACY_READERS[base[0]]
        if not set(readers) & set(algorithms):
            warnings.append("%s is read only by %s doors (KNOCKD_ROTATOR_ALGORITHM); "
                            "knockd-rotator/1 reads %s" % (variable, " and ".join(readers),
                                                           instead))
    return warnings


MODES = ("secret", "totp")
TOTP_PERIOD = 30          # RFC 6238's default, the one every authenticator app uses
TOTP_DIGITS = 6
# PBKDF2 rounds that mix a PIN or a TOTP code into the key: an eavesdropper who
# also has the secret must pay them for every PIN guessed against a sequence
# seen on the wire (docs/SPEC.md, step 0).
PIN_ITERATIONS = 20000
PIN_TAG = b"knockd-rotator/1 "


# settings_name's mapping of ASCII: letters upper-cased, digits kept, others `_`.
NAME_CHARACTERS = {code: chr(code).upper() if chr(code).isalnum() else "_"
                   for code in range(128)}


def settings_name(door):
    """NAME in KNOCKD_ROTATOR_<SETTING>_<NAME>: the door name without _ROTATOR,
    ASCII letters upper-cased, every other character but digits made `_`."""
    base = door[:-len(ROTATOR_SUFFIX)] if door.endswith(ROTATOR_SUFFIX) else door
    # Each non-ASCII character becomes one `?`, which the table makes `_`.
    return base.encode("ascii", "replace").decode("ascii").translate(NAME_CHARACTERS)


def own_variable(setting, door, name=None):
    """KNOCKD_ROTATOR_<SETTING>_<NAME>: DOOR's own variable for SETTING.
    NAME, if given, is settings_name(DOOR), computed once by the caller."""
    return "KNOCKD_ROTATOR_%s_%s" % (setting, settings_name(door) if name is None else name)


def door_variable(environ, setting, door, name=None):
    """(the variable in force for DOOR's SETTING, its text or None): the door's own first."""
    own = own_variable(setting, door, name)
    general = "KNOCKD_ROTATOR_" + setting
    name = own if own in environ else general
    return name, environ.get(name)


def whole_number(environ, variable, low, high, default):
    """ENVIRON[VARIABLE]: DEFAULT when unset, else a whole number LOW..HIGH."""
    if variable not in environ:
        return default
    text = environ[variable]
    number = parse_number(text)
    if number is None or not low <= number <= high:
        raise RotatorError("%s must be a whole number from %d to %d, not %r"
                           % (variable, low, high, text[:40]),
                           "fix it in the environment or the environment file",
                           EXIT_ENVIRONMENT)
    return number


class DoorSettings:
    """The settings in force for one door (see read_settings)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def scan_odds(length):
    """N: one period in N opens a door of LENGTH distinct ports, in no scan
    order, to a port scan run twice upwards and twice downwards."""
    if length < 3:
        return 1                  # every order of 1 or 2 ports is a scan's
    orders = 1
    for count in range(2, length + 1):
        orders *= count
    return max(1, round((orders - 2) / (2 * (length - 1))))


def read_settings(environ, door, default_mode="secret"):
    """DOOR's settings from ENVIRON: each KNOCKD_ROTATOR_<SETTING>_<NAME> in
    force over KNOCKD_ROTATOR_<SETTING>.  The secret is not checked here:
    secret_bytes() does it, for the modes that need it."""
    def number(setting, low, high, default):
        return whole_number(environ, door_variable(environ, setting, door, name)[0],
                            low, high, default)

    name = settings_name(door)
    mode_variable, mode = door_variable(environ, "MODE", door, name)
    mode = mode or default_mode
    if mode not in MODES:
        raise RotatorError("%s is %r" % (mode_variable, mode[:40]),
                           "use one of: %s" % ", ".join(MODES), EXIT_ENVIRONMENT)
    algorithm_variable, algorithm = door_variable(environ, "ALGORITHM", door, name)
    algorithm = algorithm or "knockd-rotator/1"
    if algorithm not in ALGORITHMS:
        raise RotatorError("%s is %r" % (algorithm_variable, algorithm[:40]),
                           "use one of: %s" % ", ".join(ALGORITHMS), EXIT_ENVIRONMENT)
    pin = (door_variable(environ, "PIN", door, name)[1] or "").encode("utf-8",
                                                                     "surrogateescape")
    single_use = number("SINGLE_USE", 0, 1, 0)
    if algorithm != "knockd-rotator/1" and (pin or mode != "secret" or single_use):
        raise RotatorError("door %s: %s has no PIN, no totp mode and no single use"
                           % (door, algorithm), "use knockd-rotator/1 for this door",
                           EXIT_ENVIRONMENT)
    if mode == "totp":
        # An authenticator app's codes change every 30 s: so does the sequence.
        period = whole_number(environ, own_variable("PERIOD_MODULO", door, name),
                              TOTP_PERIOD, TOTP_PERIOD, TOTP_PERIOD)
    else:
        period = number("PERIOD_MODULO", 1, MAX_PERIOD, 21600)
    length = number("LENGTH", 1, MAX_LENGTH, 10)
    if length < MIN_LENGTH and algorithm == "knockd-rotator/1":
        raise RotatorError("%s is %d: a port scan run twice opens a door of %d ports in 1 "
                           "period out of %d" % (door_variable(environ, "LENGTH", door, name)[0],
                                                 length, length, scan_odds(length)),
                           "use %d or more on the server and every client" % MIN_LENGTH,
                           EXIT_ENVIRONMENT)
    secret_variable, secret = door_variable(environ, "SECRET", door, name)
    generate = ALGORITHMS[algorithm]
    modulo = "PORT_MODULO"
    if algorithm != "knockd-rotator/1":
        salt_variable, salt = door_variable(environ, "SALT", door, name)
        if secret is None and salt is not None:
            secret_variable, secret = salt_variable, salt
        if algorithm == "legacy-v3":
            ports_variable, ports = door_variable(environ, "PORTS", door, name)
            ranges = legacy_port_ranges(ports_variable, ports or LEGACY_V3_PORTS)

            def generate(key, door, start, length, port_modulo):
                return legacy_v3_sequence(key, door, start, length, port_modulo, ranges)
            if door_variable(environ, "PROTO_MODULO", door, name)[1] is not None:
                modulo = "PROTO_MODULO"
    return DoorSettings(
        door=door, mode=mode, pin=pin, period=period, algorithm=algorithm, generate=generate,
        secret_variable=secret_variable, secret=secret, single_use=bool(single_use),
        length=length,
        port_modulo=number(modulo, 0, MAX_PORT, 0),
        # The grace is at most half the period, so a short period shrinks it.
        grace=number("GRACE", 0, period // 2, min(DEFAULT_GRACE, period // 2)))


def secret_bits(secret):
    """What SECRET could hold at most: the length of its shortest repeating
    unit (written twice, it holds no more than once) times the bits of a
    character of the smallest usual alphabet (decimal, hex, base32, lowercase
    letters, base64) that has every character of it; nothing with fewer than
    6 different characters.  A passphrase a person made up passes all the same."""
    if len(set(secret)) < 6:
        return 0
    unit = (secret + secret).find(secret, 1)
    for alphabet, bits in (("0123456789", 3.32), ("0123456789abcdefABCDEF", 4),
                           ("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=", 5),
                           ("abcdefghijklmnopqrstuvwxyz", 4.7)):
        if all(character in alphabet for character in secret):
            return int(unit * bits)
    return 6 * unit


def secret_bytes(settings):
    """The door's secret as bytes; an error naming both variables when it is
    missing, or too short to resist guessing."""
    secret, variable = settings.secret or "", settings.secret_variable
    if settings.algorithm == "knockd-rotator/1":
        strong = secret_bits(secret) >= MIN_SECRET_BITS
        floor = "%d bits (22 random base64 characters, 32 hex digits)" % MIN_SECRET_BITS
    else:
        strong = len(secret) >= LEGACY_MIN_SECRET_CHARS
        floor = "%d characters" % LEGACY_MIN_SECRET_CHARS
    if strong:
        return secret.encode("utf-8", "surrogateescape")
    what = ("neither %s nor KNOCKD_ROTATOR_SECRET is set" % own_variable("SECRET", settings.door)
            if settings.secret is None else "%s is empty" % variable if not secret
            else "%s holds less than %s" % (variable, floor))
    raise RotatorError(what, "set it to the secret the server uses for [%s]" % settings.door
                       if not secret else "give the server and its clients a new one: python3 "
                       "-c 'import secrets; print(secrets.token_urlsafe(32))'", EXIT_ENVIRONMENT)


USE_TAG = b"knockd-rotator/1 use"


def use_key(key, use):
    """The key of a door's USE-th sequence in a period (docs/SPEC.md, single
    use).  Use 0 is the door key itself: a door that never opened, and every
    door without single use, keeps the sequences of before."""
    if use == 0:
        return key
    return hmac.new(key, USE_TAG + use.to_bytes(4, "big"), hashlib.sha256).digest()


def door_key(settings, material):
    """The HMAC key of the door's sequences (docs/SPEC.md, step 0).

    MATERIAL is the secret's bytes, or in totp mode the code's ASCII digits.
    With no PIN in secret mode the key is the secret itself.
    """
    if settings.mode == "secret" and not settings.pin:
        return material
    salt = (_field(PIN_TAG + settings.mode.encode()) + _field(settings.door.encode(
        "utf-8", "surrogateescape")) + _field(material))
    return hashlib.pbkdf2_hmac("sha256", settings.pin, salt, PIN_ITERATIONS)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line, exit code 2."""

    def error(self, message):
        raise RotatorError(message, "see %s --help" % self.prog, EXIT_USAGE)


def bounded_number(text, low, high, what):
    """TEXT, a command line's whole number from LOW to HIGH, for argparse."""
    number = parse_number(text)
    if number is None or not low <= number <= high:
        raise argparse.ArgumentTypeError("%r is not %s from %d to %d"
                                         % (text[:40], what, low, high))
    return number


def port_number(text):
    return bounded_number(text, 1, MAX_PORT, "a port")


def resolve_command(word, commands):
    """The command that WORD names exactly or is a unique prefix of."""
    matches = [c for c in commands if c == word] or [c for c in commands if c.startswith(word)]
    if len(matches) == 1:
        return matches[0]
    kind = "ambiguous" if matches else "unknown"
    raise RotatorError("%s command %r" % (kind, word),
                       "choose one of: %s" % ", ".join(matches or commands), EXIT_USAGE)
# END SHARED GENERATOR


# ---------------------------------------------------------------- knockd.conf grammar
#
# knockd 0.8 reads its file with fgets() and trims C isspace() characters.  A
# line is blank, a whole-line `#` comment, a `[section]` header, or a
# `key = value` directive (key: text before the first `=`, trimmed,
# upper-cased).  There are no inline comments.  Only `[options]` (exactly) is
# global; every other section is a door.  Anything knockd does not know is
# fatal: it exits, also on a reload.

SPACE = b" \t\n\r\v\f"
LINE_MAX = 4094          # fgets(PATH_MAX) splits longer lines in two
OPTION_KEYS = {"LOGFILE", "PIDFILE", "INTERFACE"}
DOOR_KEYS = {"TARGET", "SEQUENCE", "ONE_TIME_SEQUENCES", "SEQ_TIMEOUT", "TIMEOUT",
             "START_COMMAND", "COMMAND", "START_COMMAND_6", "STOP_COMMAND",
             "STOP_COMMAND_6", "CMD_TIMEOUT", "TCPFLAGS"}
TCP_FLAGS = {prefix + flag for flag in ("FIN", "SYN", "RST", "PSH", "ACK", "URG")
             for prefix in ("", "!")}


class Line:
    """One line of knockd.conf as knockd sees it, with its raw bytes kept."""

    __slots__ = ("number", "raw", "kind", "section", "key", "value", "span")

    def __init__(self, number, raw, kind, section, key=None, value=None, span=None):
        self.number = number      # 1-based, as in knockd's messages
        self.raw = raw            # the bytes, line terminator included
        self.kind = kind          # "blank", "comment", "section" or "directive"
        self.section = section    # section name (bytes) in force, or None
        self.key = key            # directive key, upper-cased str
        self.value = value        # trimmed value bytes; None when there is no `=`
        self.span = span          # (start, end) of the value within raw

    @property
    def is_sequence(self):
        """A `sequence = ...` line (one without `=` is knockd's syntax error)."""
        return self.kind == "directive" and self.key == "SEQUENCE" and self.value is not None


def is_rotator(section):
    """Whether SECTION (bytes, or None before the first header) is a rotator door."""
    return section is not None and section.endswith(ROTATOR_SUFFIX.encode())


def parse_config(data):
    """Split knockd.conf DATA (bytes) into Lines.  Never fails: see config_errors."""
    lines = []
    section = None
    pieces = data.split(b"\n")
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        if last and not piece:
            break
        raw = piece if last else piece + b"\n"
        visible = piece.split(b"\0", 1)[0]      # C strings end at a NUL
        text = visible.strip(SPACE)
        number = index + 1
        if not text:
            lines.append(Line(number, raw, "blank", section))
        elif text[:1] == b"#":
            lines.append(Line(number, raw, "comment", section))
        elif text[:1] == b"[" and text[-1:] == b"]":
            section = text[1:-1]
            lines.append(Line(number, raw, "section", section))
        else:
            key, equals, _ = text.partition(b"=")
            key = key.strip(SPACE).upper().decode("ascii", "replace")
            if not equals:
                lines.append(Line(number, raw, "directive", section, key))
                continue
            start = visible.index(b"=") + 1
            while start < len(visible) and visible[start] in SPACE:
                start += 1
            end = len(visible.rstrip(SPACE))
            end = max(start, end)
            lines.append(Line(number, raw, "directive", section, key,
                              visible[start:end], (start, end)))
    return lines


def c_atoi(text):
    """C atoi(): leading space, a sign, digits; anything after is ignored."""
    text = text.lstrip(SPACE)
    sign = -1 if text[:1] == b"-" else 1
    if text[:1] in (b"-", b"+"):
        text = text[1:]
    digits = len(text) - len(text.lstrip(b"0123456789"))
    return sign * int(text[:digits] or b"0")


def sequence_errors(value):
    """What knockd 0.8 refuses in a `sequence` value."""
    items = value.split(b",")
    if len(items) > MAX_LENGTH:
        return ["%d ports in the sequence, knockd takes at most %d" % (len(items), MAX_LENGTH)]
    errors = []
    for item in items:
        parts = item.split(b":")
        if c_atoi(parts[0]) > MAX_PORT:
            errors.append("port %r is above %d" % (parts[0].decode("utf-8", "replace"), MAX_PORT))
        if len(parts) > 1 and parts[1].strip(SPACE).upper() not in (b"TCP", b"UDP"):
            errors.append("protocol %r is neither tcp nor udp"
                          % parts[1].decode("utf-8", "replace"))
    return errors


def config_errors(lines):
    """Everything that makes knockd 0.8 refuse the file: (line, what, fix) tuples."""
    errors = []
    door = None              # header Line of the door in force
    has_sequence = {}        # door header Line number -> whether it has one

    def error(line, what, fix):
        errors.append((line.number, what, fix))

    for line in lines:
        if len(line.raw.rstrip(b"\n")) > LINE_MAX:
            error(line, "line longer than %d bytes, which knockd reads as two" % LINE_MAX,
                  "shorten it")
        if line.kind == "section":
            door = line if line.section and line.section != b"options" else None
            if door:
                has_sequence[line.number] = False
            elif not line.section:
                error(line, "empty section name []", "name the section")
            continue
        if line.kind != "directive":
            continue
        name = (line.section or b"").decode("utf-8", "replace")
        if line.section is None:
            error(line, "directive before the first section", "move it into a section")
        elif line.value is None:
            if line.key != "USESYSLOG":
                error(line, "%r has no '='" % line.key.lower(), "write key = value")
        elif door is None:
            if line.key not in OPTION_KEYS:
                error(line, "unknown key %r in [options]" % line.key.lower(),
                      "[options] takes logfile, pidfile, interface, usesyslog")
        elif line.key not in DOOR_KEYS:
            error(line, "unknown key %r in door [%s]" % (line.key.lower(), name),
                  "knockd refuses unknown keys; see man knockd")
        else:
            if line.key in ("SEQUENCE", "ONE_TIME_SEQUENCES"):
                has_sequence[door.number] = True
            if line.key == "SEQUENCE":
                for problem in sequence_errors(line.value):
                    error(line, problem, "fix the sequence of [%s]" % name)
            if line.key == "TCPFLAGS":
                for flag in line.value.upper().split(b","):
                    if flag.decode("ascii", "replace") in TCP_FLAGS:
                        continue
                    text = flag.decode("utf-8", "replace")
                    if flag.strip(SPACE).decode("ascii", "replace") in TCP_FLAGS:
                        error(line, "space around tcp flag %r, which knockd refuses" % text,
                              "write the flags comma-separated without spaces: syn,ack")
                    else:
                        error(line, "tcp flag %r is not known" % text,
                              "flags are fin, syn, rst, psh, ack, urg, each may start "
                              "with !, comma-separated without spaces")
    for line in lines:
        if line.kind == "section" and has_sequence.get(line.number) is False:
            error(line, "door [%s] has no sequence" % line.section.decode("utf-8", "replace"),
                  "add a sequence line")
    return errors


def trap_errors(lines):
    """What knockd 0.8 takes in silence but never means what it says:
    (line, what, fix) tuples.  A rotation refuses these too."""
    errors = []
    first_header = {}        # section name -> line number of its first header
    for line in lines:
        name = (line.section or b"").decode("utf-8", "replace")
        if line.kind == "section" and line.section:
            if line.section.lower() == b"options" and line.section != b"options":
                errors.append((line.number, "[%s] is a door to knockd, not its options" % name,
                               "write [options] in lower case"))
            elif line.section in first_header:
                errors.append((line.number, "section [%s] again (first on line %d): knockd "
                               "runs both as separate doors" % (name, first_header[line.section]),
                               "merge the two, or rename one"))
            first_header.setdefault(line.section, line.number)
        if line.kind != "directive" or line.value is None or line.section in (None, b"options"):
            continue
        if b"#" in line.value and not line.key.endswith(("COMMAND", "COMMAND_6")):
            errors.append((line.number, "'#' in the value of %s: knockd has no comments after "
                           "a value and reads it as part of it" % line.key.lower(),
                           "put the comment on a line of its own"))
        if line.key != "SEQUENCE":
            continue
        for item in line.value.split(b","):
            port = item.split(b":")[0].strip(SPACE)
            text = port.decode("utf-8", "replace")
            if any(space in port for space in SPACE):
                errors.append((line.number, "sequence item %r has a space: knockd reads it as "
                               "the one port %d" % (text, c_atoi(port)),
                               "separate the ports with commas"))
            elif not (port.isdigit() or port[:1] == b"-" and port[1:].isdigit()):
                errors.append((line.number, "port %r is not a number: knockd reads it as port "
                               "%d" % (text, c_atoi(port) % 65536), "write the port number"))
    return errors


def trap_warnings(lines):
    """What works but is likely a mistake: (line, what, fix) tuples."""
    warnings = []
    for index, line in enumerate(lines):
        if line.kind != "section" or line.section in (None, b"", b"options"):
            continue
        name = line.section.decode("utf-8", "replace")
        body = section_body(lines, index)
        keys = {l.key for l in body if l.kind == "directive"}
        if "STOP_COMMAND" not in keys:
            warnings.append((line.number, "door [%s] has no stop_command: what it opens stays "
                             "open" % name, "add cmd_timeout and a stop_command that undoes "
                             "the start_command"))
        sequence = [l for l in body if l.is_sequence]
        if sequence and not is_rotator(line.section):
            ports = [c_atoi(item.split(b":")[0]) for item in sequence[-1].value.split(b",")]
            if len(ports) >= 2 and _is_monotonic(ports):
                warnings.append((sequence[-1].number, "the static sequence of [%s] is in "
                                 "%s order: a port scan opens it" % (
                                     name, "ascending" if ports[0] < ports[1] else "descending"),
                                 "put its ports out of order, or make it a rotator door"))
    return warnings


def ipv6_warnings(lines):
    """Rotator doors whose start_command takes %IP% but that have no
    start_command_6: (line, what, fix) tuples.  knockd 0.8 listens on IPv6
    unless started with -4, and then runs start_command with an IPv6 %IP%
    (`iptables -s ::1` fails: IPv6 clients are locked out).  `check` cannot
    see knockd's flags, so it warns either way: with -4 the service must be
    closed on IPv6 all the same.  A door whose start_command has no %IP%
    opens the same thing for either family: not reported."""
    warnings = []
    for index, line in enumerate(lines):
        if line.kind != "section" or not is_rotator(line.section):
            continue
        keys = {l.key: l.value for l in section_body(lines, index) if l.kind == "directive"}
        if b"%IP%" in keys.get("START_COMMAND", b"") and "START_COMMAND_6" not in keys:
            warnings.append((line.number, "rotator door [%s] has no start_command_6: an IPv6 "
                             "knock runs start_command with an IPv6 %%IP%%, which an IPv4 "
                             "firewall command refuses" % line.section.decode("utf-8", "replace"),
                             "add start_command_6 and stop_command_6 (docs/DOORS.md), and close "
                             "the service on IPv6: ip6tables -A INPUT -p tcp --dport PORT -j "
                             "DROP, or tcp dport PORT drop in an inet table"))
    return warnings


# knockd compiles one capture filter for all its doors, and hears nothing
# while it does so at a reload: measured from SIGHUP until a knock opens
# again, 10 doors 51 ms, 100 doors 0.49 s, 200 doors 2.1 s, 500 doors 12.4 s
# (4.8 GB), and 1000 doors make knockd exit.  During a grace window every
# rotator door has a sibling.  Above this many, a warning.
CROWDED_DOORS = 100


def door_load(lines):
    """(doors, doors during a grace window) that knockd compiles for LINES."""
    user_lines, _ = split_grace_block(lines)
    sections = [line.section for line in user_lines
                if line.kind == "section" and line.section != b"options"]
    return len(sections), len(sections) + sum(1 for section in sections if is_rotator(section))


def crowded_knockd(lines):
    """A warning when knockd would hold more than CROWDED_DOORS doors (with
    the grace siblings), else None."""
    doors, peak = door_load(lines)
    if peak <= CROWDED_DOORS:
        return None
    return ("knockd holds %d doors, %d during a grace window: it hears nothing for about "
            "0.5 s (100 doors) to 2 s (200) at each reload, and exits at about 1000 (move "
            "clients to knockd of their own: docs/SCALE.md)" % (doors, peak))


# knockd 0.8 disables a door when it has used the last line of its
# one_time_sequences file, and exits at the next reload: it refuses a used-up
# file.  One door running dry would shut every door, the rotator's too.  So
# each rotation makes the last live line of every such file a keeper: a
# random sequence nobody knows, under KEEPER_MARK.  Once the user's lines are
# used up knockd waits on the keeper and takes reloads; the door opens for nobody
# until lines are added.  A keeper that lines were added after is struck out
# as knockd strikes a used line (one '#' over its first byte, in place: knockd
# holds the file open and writes into it, so it is never replaced), and a new
# keeper is appended.  A keeper has as many ports as the line before it: when
# knockd 0.8 moves on to a longer line, it stops hearing other doors (seen
# with 3 then 4 ports).
KEEPER_MARK = (b"# knockd_rotator keeper: the next line is a sequence nobody knows, so that "
               b"knockd does not stop when the lines above are used up (add new lines at the "
               b"end: the next rotation moves this)")


class OneTimeFile:
    """What matters in a one_time_sequences file's DATA: .unused (the user's
    unused lines), .keepers (offsets of live keepers), .kept (a single keeper
    is the last live line), .last_ports (ports of the last used or unused
    line of the user's), .longer (1-based line numbers of unused lines longer
    than the live line before them)."""

    def __init__(self, data):
        self.data = data
        self.unused, self.keepers, self.longer, self.last_ports = 0, [], [], None
        keeper_last, live_ports, marked, offset = False, None, False, 0
        for number, raw in enumerate(data.split(b"\n"), 1):   # knockd reads with fgets
            text = raw.strip(SPACE)
            ports = text.count(b",") + 1
            if text[:1] not in (b"", b"#"):
                if marked:
                    self.keepers.append(offset)
                else:
                    self.unused += 1
                    self.last_ports = ports
                    if live_ports is not None and ports > live_ports:
                        self.longer.append(number)
                    live_ports = ports
                keeper_last = marked
            elif text[1:2].isdigit() and not marked:      # a line knockd has used
                self.last_ports = ports
            marked = text == KEEPER_MARK
            offset += len(raw) + 1
        self.kept = keeper_last and len(self.keepers) == 1


def one_time_supplies(lines):
    """(line, path, OneTimeFile or the OSError that reading it gave) for
    each one_time_sequences file of LINES."""
    supplies = []
    for line in lines:
        if (line.kind == "directive" and line.value and line.key == "ONE_TIME_SEQUENCES"
                and line.section != b"options"):
            path = line.value.decode("utf-8", "surrogateescape")
            try:
                with open(path, "rb") as handle:
                    supplies.append((line, path, OneTimeFile(handle.read())))
            except OSError as exc:
                supplies.append((line, path, exc))
    return supplies


def keep_one_time_sequences(lines):
    """Give every one_time_sequences file of LINES a keeper as its last live
    line (see KEEPER_MARK).  Returns whether a keeper knockd may be waiting
    on was struck out: knockd must then re-read the file to reach the lines
    after it.  Raises RotatorError when a file cannot be written."""
    import secrets
    draw, struck = secrets.SystemRandom(), False
    for line, path, supply in one_time_supplies(lines):
        if isinstance(supply, OSError) or supply.kept:
            continue
        length = min(supply.last_ports or MIN_LENGTH, MAX_LENGTH)
        while True:    # distinct ports, in an order a scan up or down does not walk
            keeper = draw.sample(range(MIN_PORT, MAX_PORT + 1), length)
            if length < 3 or not _is_monotonic(keeper):
                break
        try:
            with open(path, "r+b") as handle:
                data = handle.read()
                for offset in OneTimeFile(data).keepers:
                    handle.seek(offset)
                    handle.write(b"#")
                handle.seek(0, os.SEEK_END)
                handle.write((b"\n" if data and not data.endswith(b"\n") else b"")
                             + KEEPER_MARK + b"\n" + format_sequence(
                                 [(port, "tcp") for port in keeper]).encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise RotatorError("cannot add a keeper line to the one_time_sequences file %s "
                               "(line %d): %s" % (path, line.number, exc.strerror),
                               "make it writable for root, or remove the door",
                               EXIT_CONFIG) from None
        struck = struck or bool(supply.keepers)
        log("%s: %s a keeper line (knockd 0.8 stops when the lines are used up)"
            % (path, "moved" if supply.keepers else "added"))
    return struck


def file_errors(lines):
    """What knockd needs on disk besides knockd.conf and refuses, or dies of,
    when it is not there: (line, what, fix) tuples.  A reload of such a file
    kills knockd, and no grammar can see it.  A one_time_sequences file that
    a rotation can give a keeper is not among them."""
    errors = []
    for line, path, supply in one_time_supplies(lines):
        if isinstance(supply, OSError):
            errors.append((line.number, "one_time_sequences file %s: %s; knockd refuses "
                           "the whole file and exits" % (path, supply.strerror),
                           "create it, one sequence a line, or remove the line"))
        elif not supply.kept and not os.access(path, os.W_OK):
            errors.append((line.number, "one_time_sequences file %s cannot be given a keeper "
                           "line (not writable): knockd 0.8 stops when its lines are used up"
                           % path, "make it writable for root"))
    for line in lines:
        if line.kind != "directive" or not line.value:
            continue
        path = line.value.decode("utf-8", "surrogateescape")
        if line.section == b"options" and line.key in ("LOGFILE", "PIDFILE"):
            folder = os.path.dirname(path) or "."
            if not os.path.isdir(folder):
                errors.append((line.number, "the folder of %s %s does not exist: knockd "
                               "cannot start" % (line.key.lower(), path),
                               "create %s, or change the path" % folder))
    return errors


def rotator_doors(lines):
    """Names (str) of the rotator doors, in file order, each once."""
    names = {}        # a dict keeps file order and finds duplicates in O(1)
    for line in lines:
        if line.kind == "section" and is_rotator(line.section):
            names[line.section.decode("utf-8", "surrogateescape")] = True
    return list(names)


def rotator_errors(lines):
    """What this tool refuses in a rotator door: (line, what, fix) tuples."""
    errors = []
    first_door = {}          # settings name -> the first door that has it
    for line in lines:
        if not is_rotator(line.section):
            continue
        name = line.section.decode("utf-8", "replace")
        if line.kind == "section":
            variables = settings_name(line.section.decode("utf-8", "surrogateescape"))
            other = first_door.setdefault(variables, name)
            if other != name:
                errors.append((line.number, "doors [%s] and [%s] would both take their "
                               "settings from KNOCKD_ROTATOR_*_%s" % (other, name, variables),
                               "rename one: their names differ only in characters other "
                               "than letters and digits"))
        if line.kind == "section" and len(line.section) > DOOR_NAME_MAX:
            errors.append((line.number, "door name [%s...] is longer than %d bytes, which "
                           "knockd cuts" % (name[:20], DOOR_NAME_MAX), "shorten it"))
        elif line.kind == "section" and door_name_refused(line.section.decode(
                "utf-8", "surrogateescape")):
            errors.append((line.number, "door name %r holds a control character, a bracket, "
                           "a line separator or bytes that are not UTF-8, which no client "
                           "takes (docs/SPEC.md)" % name, "rename the door"))
        if line.kind == "directive" and line.key == "ONE_TIME_SEQUENCES":
            errors.append((line.number, "rotator door [%s] has one_time_sequences" % name,
                           "remove it: a rotator door's sequence comes from the secret"))
    return errors


def rewrite_config(lines, sequences):
    """The Lines of the file with each rotator door's sequence from SEQUENCES.

    SEQUENCES maps door names to sequence values (bytes); only those values
    change.  A door without a sequence line gets one right after its header,
    indented like the door's first directive.  Every line keeps its number in
    the user's file (an inserted line has its header's), so that errors found
    in the result point at lines the user can find.
    """
    out = []          # (line number in the user's file, raw bytes)
    for index, line in enumerate(lines):
        new = sequences.get((line.section or b"").decode("utf-8", "surrogateescape"))
        if new is not None and line.is_sequence:
            start, end = line.span
            out.append((line.number, line.raw[:start] + new + line.raw[end:]))
            continue
        # A rotator header whose section has no sequence line gets one inserted.
        body = section_body(lines, index) if new is not None and line.kind == "section" else None
        if body is None or any(l.is_sequence for l in body):
            out.append((line.number, line.raw))
            continue
        header = line.raw if line.raw.endswith(b"\n") else line.raw + b"\n"
        first = next((l.raw for l in body if l.kind == "directive"), b"")
        indent = first[:len(first) - len(first.lstrip(b" \t"))]
        newline = b"\r\n" if header.endswith(b"\r\n") else b"\n"
        out.append((line.number, header))
        out.append((line.number, indent + b"sequence = " + new + newline))
    return numbered_lines(out)


def numbered_lines(numbered_raws):
    """Parse (number, raw line) pairs as one file; each Line keeps its number."""
    lines = parse_config(b"".join(raw for _, raw in numbered_raws))
    for line, (number, _) in zip(lines, numbered_raws):
        line.number = number
    return lines


def with_lines_appended(lines, raws):
    """LINES followed by RAWS, after a newline if the last line has none.  The
    new lines carry the number of the last old line, after which they come:
    the diff needs numbers that never go down."""
    numbered = [(line.number, line.raw) for line in lines]
    if numbered and not numbered[-1][1].endswith(b"\n"):
        numbered[-1] = (numbered[-1][0], numbered[-1][1] + b"\n")
    last = numbered[-1][0] if numbered else 1
    return numbered_lines(numbered + [(last, raw) for raw in raws])


def section_body(lines, header_index):
    """The Lines after the header at HEADER_INDEX, up to the next header."""
    end = header_index + 1
    while end < len(lines) and lines[end].kind != "section":
        end += 1
    return lines[header_index + 1:end]


def unified_diff(old_lines, new_lines, path, context=3):
    """A unified diff of a rewrite, in linear time.

    difflib is quadratic on files of many alike sections; a rewrite needs no
    search, since every new Line carries the number of the old line it
    replaces or follows (inserted lines carry the number of the line before
    them); an old line whose number no new Line carries was removed.
    """
    replacements = {}     # old line number -> the raw lines that replace it
    for line in new_lines:
        replacements.setdefault(line.number, []).append(line.raw)
    new_number = {}       # old line number -> number of its first line in the result
    position = 1
    for line in old_lines:
        new_number[line.number] = position
        position += len(replacements.get(line.number, ()))
    changed = [line.number for line in old_lines
               if replacements.get(line.number) != [line.raw]]
    def text(raw):
        decoded = raw.decode("utf-8", "replace")
        return decoded if decoded.endswith("\n") else decoded + "\n\\ No newline at end of file\n"
    out = ["--- %s\n" % path, "+++ %s (rotated)\n" % path]
    index = 0
    while index < len(changed):
        first = last = changed[index]
        while index + 1 < len(changed) and changed[index + 1] - last <= 2 * context:
            index += 1
            last = changed[index]
        index += 1
        start, end = max(1, first - context), min(len(old_lines), last + context)
        body, new_count = [], 0
        for number in range(start, end + 1):
            old_raw, new_raws = old_lines[number - 1].raw, replacements.get(number, [])
            if new_raws and new_raws[0] == old_raw:     # kept, maybe with lines after it
                body.append(" " + text(old_raw))
                body.extend("+" + text(raw) for raw in new_raws[1:])
            else:
                body.append("-" + text(old_raw))
                body.extend("+" + text(raw) for raw in new_raws)
            new_count += len(new_raws)
        out.append("@@ -%d,%d +%d,%d @@\n" % (start, end - start + 1, new_number[start],
                                               new_count))
        out.extend(body)
    return out


def door_sequences(lines):
    """Current sequence value (bytes) of each rotator door: the last one wins."""
    current = {}
    for line in lines:
        if line.is_sequence and is_rotator(line.section):
            current[line.section.decode("utf-8", "surrogateescape")] = line.value
    return current


# ---------------------------------------------------------------- the grace block
#
# For GRACE seconds after a boundary the previous sequence still opens each
# rotator door: a block at the end of the file holds, for each rotator
# section, a sibling `[NAME_GRACE]` with the same directives and the previous
# sequence (knockd opens both doors).  The block is the server's own: it is
# rewritten whole or removed, and whatever the user wrote before or after it
# stays as it was.  When the user's last line had no newline, the block's
# first line says so, and removing the block takes that newline away again.

GRACE_BEGIN = b"# BEGIN knockd_rotator grace block"
GRACE_END = b"# END knockd_rotator grace block"
GRACE_SUFFIX = "_GRACE"
ADDED_NEWLINE = b"; a newline was added before it"


def split_grace_block(lines):
    """(the user's Lines, the grace block's Lines) of a parsed file."""
    begin = next((index for index, line in enumerate(lines)
                  if line.kind == "comment" and line.raw.startswith(GRACE_BEGIN)), None)
    if begin is None:
        return lines, []
    end = next((index for index in range(begin + 1, len(lines))
                if lines[index].raw.rstrip(b"\r\n") == GRACE_END), None)
    if end is None:
        raise RotatorError("line %d begins a grace block that has no end line %r"
                           % (lines[begin].number, GRACE_END.decode()),
                           "delete the block from line %d on: the server writes it anew"
                           % lines[begin].number, EXIT_CONFIG)
    before, block, after = lines[:begin], lines[begin:end + 1], lines[end + 1:]
    numbered = [(line.number, line.raw) for line in before + after]
    if ADDED_NEWLINE in block[0].raw and before and not after:
        number, raw = numbered[len(before) - 1]
        numbered[len(before) - 1] = (number, raw[:-1])
    # Parsed anew: lines after the block belonged to its last section.
    return numbered_lines(numbered), block


def with_burn_named(raw, door, burner, use):
    """RAW, a start_command line of DOOR, whose `burn DOOR` burns as BURNER
    (DOOR or its sibling) and, given USE (period start, counter), names that
    use, as does the opening record the shell gate keeps (burn_command).
    (Functions, not templates: a door name may hold a backslash.)"""
    burn = re.compile(rb"(\bburn\s+)" + re.escape(door) + rb"(\s+--use\s+\d+:\d+)?(?=$|[\s;&|)])")
    if use is None:
        return burn.sub(lambda match: match.group(1) + burner + (match.group(2) or b""), raw)
    tag = b"%d:%d" % use
    raw = burn.sub(lambda match: match.group(1) + burner + b" --use " + tag, raw)
    record = re.compile(rb"(/" + BURNING.encode() + rb"/" + re.escape(door) + rb")\.\d+\.\d+")
    return record.sub(lambda match: match.group(1) + b".%d.%d" % use, raw)


def ungated_burn(door):
    """A start_command value that begins with DOOR's burn as add-client wrote
    it before the gate (burn_command): KNOCKD_ROTATOR_* assignments, the
    script, --config FILE, burn DOOR, ` & `."""
    word = rb"(?:'[^']*'|[^\s'\"`$\\;&|<>(){}]+)"
    return re.compile(rb"(?:KNOCKD_ROTATOR_[A-Z0-9_]+=" + word + rb" )*" + word + rb" --config "
                      + word + rb" burn " + re.escape(door) + rb"(?: --use \d+:\d+)? & ")


def with_burns_named(lines, uses, burning=None):
    """LINES whose single-use doors' burns name the use (period start,
    counter) that USES gives each door: the one whose sequence it holds.
    Given BURNING (STATE_DIR/BURNING), a burn that add-client wrote without
    the gate gets it: one Python process per opening is what a replay flood
    costs without it."""
    out = []
    for line in lines:
        door = (line.section or b"").decode("utf-8", "surrogateescape")
        raw = line.raw
        if door in uses and line.kind == "directive" \
                and line.key in ("START_COMMAND", "START_COMMAND_6"):
            start = line.span[0]
            if burning and b"/%s/%s." % (BURNING.encode(), line.section) not in raw \
                    and ungated_burn(line.section).match(raw, start):
                raw = raw[:start] + burn_gate(burning, door).encode(
                    "utf-8", "surrogateescape") + b" " + raw[start:]
            raw = with_burn_named(raw, line.section, line.section, uses[door])
        out.append((line.number, raw))
    return numbered_lines(out)


def grace_block(lines, previous, until, previous_uses=None):
    """Raw bytes of the block giving each rotator section of LINES that is in
    PREVIOUS (door name -> bytes) a sibling with that sequence, until UNTIL.
    PREVIOUS_USES: (period start, counter) of each single-use door's sequence
    in PREVIOUS, which its sibling's burn names."""
    newline = b"\r\n" if lines and lines[0].raw.endswith(b"\r\n") else b"\n"
    out = [GRACE_BEGIN + b": generated, do not edit; removed at %d (%s)"
           % (until, utc(until).encode()) + newline]
    for index, line in enumerate(lines):
        if line.kind != "section" or not is_rotator(line.section):
            continue
        name = line.section.decode("utf-8", "surrogateescape")
        if name not in previous:
            continue        # a door with another period, not in its grace now
        out.append(b"[" + line.section + GRACE_SUFFIX.encode() + b"]" + newline)
        # A single-use sibling burns the previous period's counter, not the door's.
        sibling = line.section + GRACE_SUFFIX.encode()
        use = (previous_uses or {}).get(name)
        directives = [with_burn_named(l.raw, line.section, sibling, use)
                      if l.key in ("START_COMMAND", "START_COMMAND_6") else l.raw
                      for l in section_body(lines, index)
                      if l.kind == "directive" and not l.is_sequence]
        for raw in directives:
            out.append(raw if raw.endswith(b"\n") else raw + newline)
        first = directives[0] if directives else b""
        indent = first[:len(first) - len(first.lstrip(b" \t"))]
        out.append(indent + b"sequence = " + previous[name] + newline)
    out.append(GRACE_END + newline)
    return out


def with_grace_block(lines, previous, until, previous_uses=None):
    """The Lines of the user's LINES followed by a grace block (see above)."""
    block = grace_block(lines, previous, until, previous_uses)
    if not lines[-1].raw.endswith(b"\n"):
        block[0] = block[0].rstrip(b"\r\n") + ADDED_NEWLINE + b"\n"
    return with_lines_appended(lines, block)


# ---------------------------------------------------------------- settings

def server_settings(environ):
    """The server's own KNOCKD_ROTATOR_* settings, checked.  The environment
    file counts too: a run that knockd starts (`burn`) has no other."""
    env_file = environ.get("KNOCKD_ROTATOR_ENV_FILE") or DEFAULT_ENV_FILE
    environ = with_env_file(environ, env_file)
    settings = {}
    for name, default in DEFAULT_COMMANDS.items():
        value = environ.get("KNOCKD_ROTATOR_" + name, default)
        if not value.strip():
            raise RotatorError("KNOCKD_ROTATOR_%s is empty" % name,
                               "unset it for the default %r, or give a shell command"
                               % default, EXIT_ENVIRONMENT)
        settings[name] = value
    settings["CHECK_SECONDS"] = whole_number(environ, "KNOCKD_ROTATOR_CHECK_SECONDS",
                                             MIN_CHECK_SECONDS, 600, DEFAULT_CHECK_SECONDS)
    settings["SERVER_INTERVAL"] = whole_number(environ, "KNOCKD_ROTATOR_SERVER_INTERVAL",
                                               60, 7 * 86400, DEFAULT_SERVER_INTERVAL)
    settings["TRIAL_KNOCKD"] = environ.get("KNOCKD_ROTATOR_TRIAL_KNOCKD", DEFAULT_TRIAL_KNOCKD)
    settings["STATE_DIR"] = environ.get("KNOCKD_ROTATOR_STATE_DIR") or DEFAULT_STATE_DIR
    settings["ENV_FILE"] = env_file
    for name, default in DEFAULT_INSTANCE_COMMANDS.items():
        value = environ.get("KNOCKD_ROTATOR_" + name, default)
        if "%i" not in value:
            raise RotatorError("KNOCKD_ROTATOR_%s has no %%i" % name,
                               "write %%i where the instance's name goes, as in the default "
                               "%r" % default, EXIT_ENVIRONMENT)
        settings[name] = value
    settings["DOORS_PER_KNOCKD"] = whole_number(environ, "KNOCKD_ROTATOR_DOORS_PER_KNOCKD", 0,
                                                1000, DEFAULT_DOORS_PER_KNOCKD)
    settings["INSTANCE"], settings["UNIT"] = None, "knockd"
    return settings


# ---------------------------------------------------------------- I/O

def log(message):
    print("knockd_rotator: " + message, file=sys.stderr, flush=True)


def read_config(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise RotatorError("cannot read %s: %s" % (path, exc.strerror),
                           "check the path given with --config", EXIT_CONFIG) from None


def replace_file(path, data, create=False):
    """Swap PATH's content for DATA atomically, keeping its mode and owner.
    With CREATE, a missing PATH is made root-only (0600), just as atomically."""
    try:
        _replace_file(path, data, create)
    except OSError as exc:
        raise RotatorError("cannot write %s: %s" % (path, exc.strerror or exc),
                           "run as root, with write access to its folder; nothing was "
                           "changed", EXIT_CONFIG) from None


def _replace_file(path, data, create):
    try:
        status = os.stat(path)
        mode, uid, gid = status.st_mode & 0o7777, status.st_uid, status.st_gid
    except FileNotFoundError:
        if not create:
            raise
        mode, uid, gid = 0o600, os.geteuid(), os.getegid()
    folder = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                             suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            # Only when it differs: the units' seccomp filter (~@privileged)
            # refuses fchown() even when it would change nothing.
            made = os.fstat(handle.fileno())
            if (made.st_uid, made.st_gid) != (uid, gid):
                os.fchown(handle.fileno(), uid, gid)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    folder_descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_descriptor)
    finally:
        os.close(folder_descriptor)


def remove_stale_temporaries(path):
    """Temp files a killed run left beside PATH (called under the lock)."""
    folder = os.path.dirname(path) or "."
    prefix = "." + os.path.basename(path) + "."
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))


def trust_state_dir(state_dir):
    """Make STATE_DIR if missing; refuse one that another user could have
    prepared.  Root writes its lock, its pending pid and the last good
    knockd.conf there: under a world-writable parent, a local user's folder
    (or a symlink named `lock` in it) would make root create files of that
    user's choosing, or hold the lock and stop every rotation."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    status = os.lstat(state_dir)
    import stat
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() \
            or status.st_mode & 0o022:
        raise RotatorError("the state folder %s is %s" % (
            state_dir, "not a folder" if not stat.S_ISDIR(status.st_mode) else
            "owned by uid %d" % status.st_uid if status.st_uid != os.geteuid() else
            "writable by others (mode %04o)" % (status.st_mode & 0o7777)),
                           "remove it, or set KNOCKD_ROTATOR_STATE_DIR to a folder of root's "
                           "own, mode 0700", EXIT_ENVIRONMENT)


def take_lock(state_dir, name="lock"):
    """An exclusive lock on STATE_DIR/NAME, held until the handle is closed."""
    try:
        trust_state_dir(state_dir)
        descriptor = os.open(os.path.join(state_dir, name),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(descriptor, "a")
    except OSError as exc:
        raise RotatorError("cannot open the lock in %s: %s" % (state_dir, exc.strerror),
                           "run as root, or set KNOCKD_ROTATOR_STATE_DIR",
                           EXIT_ENVIRONMENT) from None
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RotatorError("another knockd_rotator_server run has held %s/%s for "
                                   "%d s" % (state_dir, name, LOCK_TIMEOUT),
                                   "see what it waits for: fuser -v %s/%s" % (state_dir, name),
                                   EXIT_BUSY) from None
            time.sleep(0.05)


def without_secrets(environ):
    """ENVIRON less every secret and PIN, and every SALT (a legacy door's
    secret): the reload, check, recover and kill commands, and a knockd one
    of them starts, need none."""
    return {name: value for name, value in environ.items()
            if not name.startswith(("KNOCKD_ROTATOR_SECRET", "KNOCKD_ROTATOR_PIN",
                                    "KNOCKD_ROTATOR_SALT"))}


def run_command(command):
    """Run a shell command line: (success, last line of its output)."""
    try:
        result = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL,
                                env=without_secrets(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, "timed out after %d s" % COMMAND_TIMEOUT
    output = result.stdout.decode("utf-8", "replace").strip().splitlines()
    detail = "exit %d%s" % (result.returncode, ": " + output[-1] if output else "")
    return result.returncode == 0, detail


def knockd_stays_up(settings, opens=None, slot=None, started=None):
    """Poll the check command for CHECK_SECONDS: (all passed, detail of a failure).
    With OPENS (a FileOpens), evidence ends it sooner: knockd (re-)read the
    file and still runs RELOAD_SETTLE seconds later; with STARTED (the path
    of the file a knockd was just started on), it must listen by then too
    (knockd_started).  A burn must not hold the lock for whole seconds: the
    next opening's burn waits for it, and its replay window with it.  SLOT (a
    ReloadSlot) goes back once knockd has re-read the file and compiled its
    filter."""
    deadline = time.monotonic() + settings["CHECK_SECONDS"]
    evidence = None       # when knockd was seen to read its file
    while True:
        ok, detail = run_command(settings["CHECK_COMMAND"])
        if not ok:
            return False, "check command failed (%s)" % detail
        now = time.monotonic()
        if slot is not None and evidence is not None:
            slot.release_when_compiled()
        if now >= deadline or evidence is not None and now - evidence >= RELOAD_SETTLE and (
                started is None or knockd_started(started)):
            return True, ""
        if evidence is None and opens is not None:
            # An open wakes this wait at once.
            if opens.seen(True, wait=CHECK_POLL):
                evidence = time.monotonic()
        elif evidence is not None and now - evidence < RELOAD_SETTLE:
            # The last check comes as the settling ends, not up to a poll later.
            time.sleep(min(CHECK_POLL, evidence + RELOAD_SETTLE - now))
        else:
            time.sleep(CHECK_POLL)


# knockd compiles its capture filter inside its SIGHUP handler, on one CPU,
# and hears nothing meanwhile.  Reloads that share a CPU stay deaf longer (500
# doors on 2 CPUs: 2 at a time, 173 ms at worst; 4, 273 ms), so a reload takes
# one of these slots, and gives it back once knockd has re-read its file and
# is no longer running on a CPU.  rotate_all's threads wait in parallel for
# everything else (the check, the settle, the state files).
RELOAD_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 1)


class ReloadSlot:
    """One of RELOAD_SLOTS, for the reload of the knockd that reads PATH."""

    def __init__(self, path):
        self.path = path
        RELOAD_SLOTS.acquire()
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            RELOAD_SLOTS.release()

    def release_when_compiled(self):
        """Release, unless the knockd reading PATH is still running on a CPU
        (a knockd this process cannot see counts as done)."""
        if self.held and compiled(knockd_processes(self.path)):
            self.release()


def knockd_runs(settings):
    return run_command(settings["CHECK_COMMAND"])[0]


# The file each knockd process reads, by (pid, start time), for one run:
# with 50 knockd, finding each one's file again (its arguments, its folder,
# the real path) made every look at /proc cost 4.6 ms instead of 1.1 ms, and
# a reload looks several times.  rotate_all() starts afresh.
KNOCKD_CONFIGS = {}


def knockd_config(entry):
    """The real path of the file knockd process ENTRY (a /proc name) reads:
    its -c, else /etc/knockd.conf."""
    with open("/proc/%s/cmdline" % entry, "rb") as handle:
        argv = handle.read().split(b"\0")
    config = "/etc/knockd.conf"
    for index, word in enumerate(argv[:-1]):      # the last one given wins
        if word in (b"-c", b"--config"):
            config = os.fsdecode(argv[index + 1])
    if not os.path.isabs(config):
        # Only root reads another user's cwd: a monitoring account finds
        # the knockd of an absolute -c (as the units give) without it.
        config = os.path.join(os.readlink("/proc/%s/cwd" % entry), config)
    return os.path.realpath(config)


def knockd_processes(config_path):
    """{pid: (parent pid, state, CPU clock ticks used)} of the knockd
    processes that read CONFIG_PATH, as far as /proc shows them."""
    wanted = os.path.realpath(config_path)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if proc_file("/proc/%s/comm" % entry) != b"knockd\n":
                continue
            # stat(5) after the name: state, ppid, ... utime and stime
            # (fields 14, 15), ... start time (22).
            fields = proc_file("/proc/%s/stat" % entry).rsplit(b")", 1)[1].split()
            known = (entry, fields[19])
            if known not in KNOCKD_CONFIGS:
                KNOCKD_CONFIGS[known] = knockd_config(entry)
        except OSError:
            continue                               # gone meanwhile, or not ours to read
        if KNOCKD_CONFIGS[known] == wanted:
            found[int(entry)] = (int(fields[1]), fields[0].decode(),
                                 int(fields[11]) + int(fields[12]))
    return found


def proc_file(path):
    """The bytes of a small /proc file (without the cost of a Python file object)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(descriptor, 4096)
    finally:
        os.close(descriptor)


def compiled(found):
    """Whether no knockd of FOUND (knockd_processes) runs on a CPU: its
    filter is compiled (a knockd this process cannot see counts as done)."""
    return all(found[pid][1] != "R" for pid in main_knockd(found))


def main_knockd(found):
    """The pids of FOUND (knockd_processes) that are no other one's child:
    knockd's children wait to run a stop_command and hear nothing."""
    return [pid for pid, (parent, _, _) in found.items() if parent not in found]


def knockd_listening(config_path, found=None):
    """(True, ""), (False, why) or (None, why) for the knockd that reads
    CONFIG_PATH: a process can be active for systemd and hear nothing,
    stopped or without its packet capture socket.  None when no such
    process is to be seen here (another PID namespace): then CHECK_COMMAND
    alone speaks for knockd.  FOUND: knockd_processes(CONFIG_PATH), if at hand."""
    found = knockd_processes(config_path) if found is None else found
    main = main_knockd(found)
    if not main:
        return None, "no knockd process reading %s is visible" % config_path
    unseen = None
    for pid in main:
        if found[pid][1] in "TtZX":
            return False, "knockd (pid %d) is stopped" % pid
        try:
            sockets = {os.readlink("/proc/%d/fd/%s" % (pid, fd))
                       for fd in os.listdir("/proc/%d/fd" % pid)}
            with open("/proc/%d/net/packet" % pid) as handle:
                captures = {"socket:[%s]" % row.split()[-1] for row in handle.readlines()[1:]}
        except OSError:
            unseen = pid           # gone meanwhile, or its descriptors are root's to see
            continue
        if not sockets & captures:
            return False, "knockd (pid %d) has no packet capture open: it hears no knock" % pid
    if unseen is not None:
        return None, ("knockd (pid %d) runs, but its descriptors are not to be seen here: "
                      "status as root checks its packet capture" % unseen)
    return True, ""


# knockd reloads inside its SIGHUP handler, compiling one capture filter for
# all its doors (2.5 s for 200 doors of 10 ports), and a SIGHUP that comes
# meanwhile waits for the one before: a knockd that has not re-read its file
# yet but keeps using CPU is busy, not hung (hung, it used none).  It is given
# this long, as long as it keeps using CPU, before it is taken for hung.
BUSY_PATIENCE = 30
BUSY_LOOK = 0.5          # seconds between two looks at its CPU time


def rereads_while_busy(config_path, opens):
    """Wait while the knockd reading CONFIG_PATH keeps using CPU, at most
    BUSY_PATIENCE seconds, for OPENS (a FileOpens) to see it re-read the
    file: whether it did."""
    def used():
        found = knockd_processes(config_path)
        main = main_knockd(found)
        return sum(found[pid][2] for pid in main) if main else None
    deadline, before = time.monotonic() + BUSY_PATIENCE, used()
    while before is not None and time.monotonic() < deadline:
        time.sleep(BUSY_LOOK)
        if opens.seen(True):
            return True
        now = used()
        if now is None or now <= before:
            return False
        before = now
    return opens.seen(True)


# knockd 0.8 leaks about 80 to 290 bytes per door at every reload while it
# listens on IPv6 (its IPv6 filter string is never freed): 100 single-use
# doors opened 100 times a day each grow it by 0.3 to 1 GB a year.  A restart frees it,
# and costs nothing but the knocks in progress while no child waits to run a
# stop_command.  So, past LEAK_BOUND of growth since the rotator first saw
# this knockd, a rotation restarts it at such a moment (knockd -4 does not
# leak: docs/SCALE.md).
LEAK_BOUND = 64 * 2**20
KNOCKD_SIZE = "knockd-size"      # state: "PID RSS" of knockd when first seen
IDLE_LOOK = 0.1          # seconds knockd must use no CPU to be at rest


def resident_bytes(pid):
    with open("/proc/%d/status" % pid) as handle:
        for row in handle:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    raise OSError("no VmRSS")


def restart_when_grown(config_path, settings):
    """Restart the knockd reading CONFIG_PATH when it has grown by more than
    LEAK_BOUND since it was first seen and no child of it waits to run a
    stop_command: a line for the log, or None."""
    found = knockd_processes(config_path)
    main = main_knockd(found)
    if len(main) != 1:
        return None
    pid, path = main[0], os.path.join(settings["STATE_DIR"], KNOCKD_SIZE)
    try:
        size = resident_bytes(pid)
    except OSError:
        return None
    try:
        with open(path) as handle:
            seen_pid, seen_size = (int(word) for word in handle.read().split())
    except (OSError, ValueError):
        seen_pid, seen_size = None, None
    if seen_pid == pid and (size - seen_size <= LEAK_BOUND
                            or any(parent == pid for parent, _, _ in found.values())):
        return None
    # Sizes that count are those of a knockd at rest (SIZE was, if it used
    # no CPU since): while it compiles a filter it is smaller, then bigger.
    time.sleep(IDLE_LOOK)
    again = knockd_processes(config_path).get(pid)
    if again is None or again[1:] != ("S", found[pid][2]):
        return None
    if seen_pid != pid:
        keep_state(path, b"%d %d\n" % (pid, size))
        return None
    killed, detail = run_command(settings["KILL_COMMAND"])
    if killed:
        killed, detail = start_knockd(config_path, settings)
    if not killed:
        raise RotatorError("knockd had grown by %d MB and was to be restarted, which failed (%s)"
                           % ((size - seen_size) >> 20, detail),
                           "start knockd now: systemctl start %s" % settings["UNIT"],
                           EXIT_RECOVERY)
    return ("knockd had grown by %d MB since it was first seen (knockd 0.8 leaks at every "
            "reload with IPv6): restarted it, with no stop_command pending"
            % ((size - seen_size) >> 20))


# Before knockd re-reads a file it has not run in this shape (doors added or
# removed, a user's edit: anything but the rotator's sequences), the file is
# tried on knockd itself: knockd 0.8 exits on a reload of a file it refuses,
# and only knockd knows everything it refuses (a capture filter it cannot
# compile, an option this checker does not model).  The trial knockd runs on
# a copy, in a network namespace of its own where no knock can reach it, on
# its loopback: with its own log and pid file, without syslog, and without
# the file's interface (the host's are not there; the interface is the one
# thing not tried).  It passes once it says it listens.
DEFAULT_TRIAL_KNOCKD = "/usr/sbin/knockd"
# knockd compiles its filter before it listens: 2 s for 500 doors of 3 ports,
# 2.5 s for 200 of 10.  Longer, and every reload would leave knockd that long deaf.
TRIAL_SECONDS = 30
# The trial's folder in STATE_DIR: TRIAL_PREFIX, then the pid and start time
# (process_start) of the run it belongs to, so that the next run can remove
# it when that run was killed.
TRIAL_PREFIX = "trial-"
TRIAL_OPTIONS = {"LOGFILE": b"logfile", "PIDFILE": b"pidfile", "INTERFACE": None,
                 "USESYSLOG": None}


def file_shape(lines):
    """LINES without what the rotator writes: a file knockd ran in this
    shape takes any sequences the rotator gives it."""
    return b"".join(line.raw for line in with_placeholders(split_grace_block(lines)[0]))


def trial_copy(lines, folder):
    """LINES for the trial knockd, line numbers kept (knockd's messages cite
    them).  Its one_time_sequences files are copies, as a rotation leaves
    them (kept), since knockd writes into the files it is given."""
    copy, supplies = [], {line.number: supply for line, _, supply in one_time_supplies(lines)}
    for line in lines:
        supply = supplies.get(line.number)
        if line.section == b"options" and line.kind == "directive" \
                and line.key in TRIAL_OPTIONS:
            name = TRIAL_OPTIONS[line.key]
            copy.append(b"%s = %s\n" % (name, os.fsencode(os.path.join(folder, name.decode())))
                        if name else b"#\n")
        elif supply is not None and not isinstance(supply, OSError):
            path = os.path.join(folder, "one-time-%d" % line.number)
            with open(path, "wb") as handle:
                handle.write(supply.data if supply.kept else b"%s\n%s\n%s\n" % (
                    supply.data, KEEPER_MARK, PLACEHOLDER_SEQUENCE))
            copy.append(b"one_time_sequences = %s\n" % os.fsencode(path))
        else:
            copy.append(line.raw if line.raw.endswith(b"\n") else line.raw + b"\n")
    return b"".join(copy)


def knockd_trial(lines, settings):
    """Start knockd on a copy of LINES where it hears nobody: (what knockd
    said when it refused them, or None; why the trial could not be made, or
    None).  No trial without a knockd program (KNOCKD_ROTATOR_TRIAL_KNOCKD
    empty, or knockd not installed)."""
    program = settings["TRIAL_KNOCKD"]
    if not program or not os.path.exists(program):
        return None, None
    try:
        trust_state_dir(settings["STATE_DIR"])
        folder = tempfile.mkdtemp(prefix="%s%d-%d-" % (TRIAL_PREFIX, os.getpid(),
                                                         process_start(os.getpid())),
                                  dir=settings["STATE_DIR"])
    except RotatorError as exc:
        return None, exc.what
    except OSError as exc:
        return None, "no folder for it in %s: %s" % (settings["STATE_DIR"], exc.strerror)
    try:
        path = os.path.join(folder, "knockd.conf")
        with open(path, "wb") as handle:
            handle.write(trial_copy(lines, folder))
        command = [program, "-v", "-i", "lo", "-c", path]
        if any(name != "lo" for _, name in socket.if_nameindex()):
            # Other interfaces are to be seen (unlike in the units' private
            # network namespace, PrivateNetwork=): a namespace of its own.
            command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"',
                       "knockd_rotator-trial"] + command
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=without_secrets(os.environ))
        except OSError as exc:
            return None, "%s: %s" % (command[0], exc.strerror)
        try:
            said, deadline = b"", time.monotonic() + TRIAL_SECONDS
            while b"listening on" not in said:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
                    return ("it did not listen within %g s (a reload would leave it that "
                            "long deaf, or longer: too many doors?)" % TRIAL_SECONDS), None
                piece = os.read(process.stdout.fileno(), 4096)
                if not piece:
                    break
                said += piece
        finally:
            process.kill()
            errors = process.communicate()[1].decode("utf-8", "replace").strip().splitlines()
        if b"listening on" in said:
            return None, None
        last = errors[-1] if errors else "exit %d" % process.returncode
        if "Operation not permitted" in last or "ermission denied" in last:
            return None, last
        return last, None
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_trials(state_dir):
    """The trial folders of runs that were killed during a trial (called
    under the lock), each with a file of the sequences that were new, and the
    trial knockd that went on reading it."""
    import shutil
    for name in os.listdir(state_dir):
        owner = re.match(re.escape(TRIAL_PREFIX) + r"([0-9]+)-([0-9]+)-", name)
        if owner and process_start(int(owner.group(1))) != int(owner.group(2)):
            folder = os.path.join(state_dir, name)
            for pid in knockd_processes(os.path.join(folder, "knockd.conf")):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)


IN_OPEN = 0x20     # inotify(7): the watched file was opened


class FileOpens:
    """Whether any process opened PATH since (inotify IN_OPEN on its inode,
    whatever mount namespace the opener is in): after a SIGHUP, the evidence
    that knockd re-read its file.  Where inotify is not to be had, it claims
    every open it cannot see, and the process check alone decides."""

    def __init__(self, path):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.descriptor = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.descriptor >= 0 and libc.inotify_add_watch(
                self.descriptor, os.fsencode(path), IN_OPEN) < 0:
            os.close(self.descriptor)
            self.descriptor = -1

    def seen(self, evidence_only=False, wait=0):
        """True once PATH was opened, waiting WAIT seconds at most for it;
        where inotify is missing, True unless EVIDENCE_ONLY (nothing was
        seen, so nothing proves it)."""
        if self.descriptor < 0:
            time.sleep(wait)
            return not evidence_only
        return bool(select.select([self.descriptor], [], [], wait)[0])

    def close(self):
        if self.descriptor >= 0:
            os.close(self.descriptor)


def knockd_started(config_path):
    """True once the knockd reading CONFIG_PATH has its packet capture open
    (knockd opens it after it has taken its file) and has compiled its
    filter (it no longer runs on a CPU)."""
    found = knockd_processes(config_path)
    return knockd_listening(config_path, found)[0] is True and compiled(found)


def start_knockd(path, settings):
    """Start knockd with the file on disk at PATH: (stays up, detail of a failure).
    A knockd that read the file, lives RELOAD_SETTLE seconds on and listens
    has taken it (a new knockd for a new client need not wait CHECK_SECONDS)."""
    opens = FileOpens(path)
    try:
        ok, detail = run_command(settings["RECOVER_COMMAND"])
        if not ok:
            return False, "recover command failed (%s)" % detail
        return knockd_stays_up(settings, opens, started=path)
    finally:
        opens.close()


def load_into_knockd(path, new_data, fallback, was_running, settings):
    """Make knockd run with NEW_DATA, which is at PATH already.

    Decide on the evidence.  A knockd that dies after a reload was not
    necessarily killed by the new file: knockd 0.8 frees its doors inside its
    SIGHUP handler and crashes when a door's first port is flooded.  Putting
    the previous file back then would hand an attacker a veto over every
    rotation and revocation.  So a dead knockd is started with the new file
    first (which passed the grammar and file checks); only when knockd
    refuses to start with it does FALLBACK() (the last file knockd ran with,
    at the current sequences) go back.  Returns a warning to log, or None."""
    state_dir = settings["STATE_DIR"]
    if was_running:
        opens, hung, slot = FileOpens(path), False, ReloadSlot(path)
        try:
            ok, detail = run_command(settings["RELOAD_COMMAND"])
            if not ok:
                detail = "reload command failed (%s)" % detail
            else:
                ok, detail = knockd_stays_up(settings, opens, slot)
                if ok and not opens.seen() and rereads_while_busy(path, opens):
                    ok, detail = knockd_stays_up(settings, opens)   # and lives on
                hung = ok and not opens.seen()
        finally:
            slot.release()
            opens.close()
        if ok and not hung:
            remember_good(state_dir, new_data)
            remember_loaded(state_dir, new_data)
            return None
        if hung:
            # Alive, but deaf: knockd 0.8 can deadlock in its SIGHUP handler
            # under a flood, and a check of the process cannot see it.
            detail = ("knockd did not re-read the file within %d s of the reload, nor while "
                      "it kept using CPU (at most %d s): it hangs"
                      % (settings["CHECK_SECONDS"], BUSY_PATIENCE))
            killed, kill_detail = run_command(settings["KILL_COMMAND"])
            if not killed:
                raise RotatorError("%s, and the kill command failed (%s)" % (detail, kill_detail),
                                   "kill knockd and start it now: systemctl kill --signal=KILL "
                                   "{0}; systemctl start {0}".format(settings["UNIT"]),
                                   EXIT_RECOVERY)
        elif knockd_runs(settings):
            # knockd lives, with the old doors in memory: the file must match
            # their shape.  Its sequences may be the current ones, which knockd
            # has not loaded: the record of what it loaded makes the next run
            # reload it.
            put_back(path, fallback(), detail, settings)
            raise RotatorError("knockd did not take the new %s (%s); the last file it ran "
                               "with is back, at the current sequences, and knockd runs "
                               "with the older one it had: the next run reloads it"
                               % (path, detail),
                               "check KNOCKD_ROTATOR_RELOAD_COMMAND and _CHECK_COMMAND; "
                               "journalctl -u %s" % settings["UNIT"], EXIT_FAILED)
        why = ("knockd hung after the reload and was killed (%s)" if hung
               else "knockd died after the reload (%s)") % detail
    else:
        # First install: knockd refuses to start while a door has no sequence.
        why = "knockd was not running"
        log("knockd is not running: starting it with the new file")
    ok, detail = start_knockd(path, settings)
    if ok:
        remember_good(state_dir, new_data)
        remember_loaded(state_dir, new_data)
        return (("%s; it runs with the new file: knockd 0.8 can crash or hang while it reloads "
                 "under a flood of knocks, see journalctl -u %s" % (why, settings["UNIT"]))
                if was_running else None)
    good = fallback()
    put_back(path, good, "%s and refused to start with the new file (%s)"
             % (why, detail), settings)
    recovered, recover_detail = start_knockd(path, settings)
    if not recovered:
        raise RotatorError("%s, and it starts neither with the new %s (%s) nor with the "
                           "last file it ran with, now back in place (%s)"
                           % (why, path, detail, recover_detail),
                           "start knockd now: systemctl start {0}; journalctl -u {0}"
                           .format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(state_dir, good)
    raise RotatorError("%s and refused to start with the new %s (%s); the last file it ran "
                       "with is back and knockd runs with it" % (why, path, detail),
                       "knockd_rotator_server.py check; journalctl -u %s" % settings["UNIT"],
                       EXIT_FAILED)


def put_back(path, data, detail, settings):
    try:
        replace_file(path, data)
    except RotatorError as exc:
        raise RotatorError("%s, and putting the last good %s back failed: %s"
                           % (detail, path, exc.what),
                           "restore it by hand and reload knockd now", EXIT_RECOVERY) from None


# The last knockd.conf that knockd ran with, kept (0600) to roll back to.
LAST_GOOD = "last-good"


def keep_state(path, data):
    """Make the state file PATH hold DATA; most runs change nothing, and write nothing."""
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return
    except OSError:
        pass
    replace_file(path, data, create=True)


def remember_good(state_dir, data):
    keep_state(os.path.join(state_dir, LAST_GOOD), data)


# What knockd has in memory is not what the file holds when a reload failed
# with knockd alive, or the run died between the write and the SIGHUP: the
# file is current, yet knockd opens for the old sequences until something
# changes.  So the SHA-256 of the bytes knockd was seen to (re)read is kept,
# written only on that evidence, and a file ahead of it is loaded again.  It
# holds no sequence, so `status` without the secret may read it.
LOADED = "loaded"


def file_digest(data):
    return hashlib.sha256(data).hexdigest()


def remember_loaded(state_dir, data):
    keep_state(os.path.join(state_dir, LOADED), file_digest(data).encode() + b"\n")


def loaded_digest(state_dir):
    """The SHA-256 of the file knockd last re-read, or None when unknown."""
    try:
        with open(os.path.join(state_dir, LOADED), "rb") as handle:
            return handle.read().decode("ascii", "replace").strip() or None
    except OSError:
        return None


def last_good(state_dir):
    try:
        with open(os.path.join(state_dir, LAST_GOOD), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def readable_by_others(path, what="the secret"):
    """A warning when PATH (holding WHAT) is readable by others, else None.
    knockd.conf holds the live sequences: Debian ships it 0644, and a local
    user who reads it can open the doors from another address."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return ("warning: %s is mode %04o: others can read %s (%s)"
                % (path, mode & 0o7777, what, private_fix(path)))
    return None


def private_fix(path):
    """The command that leaves PATH to its owner.  With an ACL (a group mode
    of r is then the ACL's mask, e.g. after `setfacl -m u:nagios:r`), chmod
    alone would only mask its entries until the next chmod g+r."""
    try:
        acl = "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        acl = False
    return ("setfacl -b %s; " % path if acl else "") + "chmod 600 %s" % path


def warn_if_readable_by_others(config_path, env_file):
    """Log what others can read: CONFIG_PATH, and ENV_FILE unless None."""
    for warning in (env_file and readable_by_others(env_file),
                    readable_by_others(config_path, "the live sequences")):
        if warning:
            log(warning)


# ---------------------------------------------------------------- boundary runs
#
# The timer runs knockd_rotator.service every SERVER_INTERVAL.  When the next
# event (a period boundary, or the end of a grace) comes before the next timer
# run, the service's run (`--schedule`) leaves one detached process
# (`--at EVENT`) that sleeps until that second and runs again; it then
# schedules the event after it.  The unit's KillMode=process lets it outlive
# the oneshot, inside the unit's cgroup and sandbox, where `systemctl kill` and
# the watch find it.  Only the unit's runs schedule: a run by hand (or
# add-client) would leave an unsandboxed process in the admin's session that
# nothing stops, holding the caller's terminal or pipe; it says what comes
# next instead.  The child inherits the environment, so the secret never
# travels on a command line.  STATE_DIR/pending holds its pid and start time:
# at most one is pending.  A failed scheduled run schedules a retry
# (RETRY_SECONDS).

def process_start(pid):
    """PID's start time (clock ticks after boot, field 22 of /proc/PID/stat),
    or None when there is no such process.  With the pid it names one process
    for good: a local user who cycles pids until one of his takes over a
    recorded pid gets that pid with a later start."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read()
        # The command name (field 2) is in parentheses and may hold any byte.
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pending_boundary_pid(state_dir):
    """(pid, boundary) of the pending boundary run, or (None, None)."""
    try:
        with open(os.path.join(state_dir, "pending")) as handle:
            pid, start = (int(field) for field in handle.read().split())
        if process_start(pid) == start:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                arguments = handle.read().split(b"\0")
            return pid, int(arguments[arguments.index(b"--at") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return None, None


def schedule_boundary_run(config_path, boundary, now, settings, verbose):
    if boundary is None or boundary > now + settings["SERVER_INTERVAL"] + TIMER_SLACK:
        return
    state_dir = settings["STATE_DIR"]
    pid, pending = pending_boundary_pid(state_dir)
    if pid == os.getpid():
        pid = None           # this is the boundary run itself, about to end
    if pid and pending == boundary:
        if verbose:
            log("the run for %s is already pending (pid %d)" % (utc(boundary), pid))
        return
    if pid:
        os.kill(pid, signal.SIGTERM)
    command = [sys.executable, SCRIPT, "--config",
               os.path.abspath(config_path), "--at", str(boundary)]
    if verbose:
        command.append("--verbose")
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    # Not waited for, the child keeps its /proc entry even if it has ended.
    replace_file(os.path.join(state_dir, "pending"),
                 b"%d %d\n" % (child.pid, process_start(child.pid)), create=True)
    log("next run at %s (boundary run, pid %d)" % (utc(boundary), child.pid))


def end_pending_boundary_run(state_dir):
    """Stop the timer's pending boundary run: the watch rotates instead.
    systemd's Conflicts= does not reach it, since its oneshot has ended."""
    pid, pending = pending_boundary_pid(state_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
        log("ended the timer's boundary run for %s (pid %d)" % (utc(pending), pid))


def retry_moment(config_path, environ, settings, now):
    """When to try a failed event again: the doors' next event, at the latest
    RETRY_SECONDS from NOW."""
    return int(min([next_event(now, *timing) for timing in
                    door_timings(config_path, environ, settings)] + [now + RETRY_SECONDS]))


def schedule_retry(config_path, environ, now, verbose):
    """After a failed scheduled run: a boundary run for retry_moment()."""
    try:
        settings = server_settings(environ)
        moment = retry_moment(config_path, environ, settings, now)
        with take_lock(settings["STATE_DIR"]):
            schedule_boundary_run(config_path, moment, now, settings, verbose)
    except RotatorError as exc:
        log("no retry scheduled: %s" % exc.what)


def tell_next_event(config_path, event, now, settings):
    """What a run by hand says instead of scheduling a boundary run."""
    if event is None or event > now + settings["SERVER_INTERVAL"] + TIMER_SLACK:
        return
    pid, pending = pending_boundary_pid(settings["STATE_DIR"])
    if pid and pending <= event:
        log("next event at %s: the timer's boundary run (pid %d) rotates then"
            % (utc(event), pid))
    else:
        log("next event at %s, before the timer's next run: the watch rotates then; in timer "
            "mode, `systemctl start knockd_rotator.service` schedules it" % utc(event))


def derive_keys(config_path, environ, moment):
    """Plan every file's rotation at MOMENT now, for its keys: a boundary run
    that sleeps until MOMENT then finds each PIN door's key (a PBKDF2) in
    KEY_CACHE, in memory only, and its rotation only computes sequences.
    Whatever fails here, the run at MOMENT meets and reports."""
    try:
        settings = server_settings(environ)
        settings_of = settings_reader(with_env_file(environ, settings["ENV_FILE"]))
        for path in knockd_files(config_path):
            plan_rotation(path, read_config(path), moment, settings_of)
    except RotatorError:
        pass


def sleep_until(moment):
    """Sleep until the wall clock reaches MOMENT, following clock changes."""
    while True:
        remaining = moment - time.time()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 30))


# ---------------------------------------------------------------- single use
#
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


def use_count(uses, settings, start):
    """The use counter of SETTINGS's door in the period from START (0: unused)."""
    if not uses or not settings.single_use:
        return 0
    return uses.get(settings.door, {}).get("counts", {}).get(str(start), 0)


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


def reopen_gate(config_path, environ, door, use):
    """After a burn of USE that failed: let the next opening of it start a
    burn again.  The gate lets only the first opening through, and a use
    that was never counted would open the door for the rest of its period."""
    base = door[:-len(GRACE_SUFFIX)] if door.endswith(GRACE_SUFFIX) else door
    try:
        folder = os.path.join(settings_for(config_path, server_settings(environ))["STATE_DIR"],
                              BURNING)
        os.rmdir(os.path.join(folder, "%s.%d.%d.burn" % ((base,) + use)))
    except (RotatorError, OSError):
        pass       # no gate to reopen


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


# ---------------------------------------------------------------- the rotation

def utc(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc) \
        .strftime("%Y-%m-%d %H:%M:%S UTC")


class Plan:
    """What a rotation at one moment makes of one knockd.conf."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def hotp(key, counter):
    """RFC 4226 HOTP with HMAC-SHA1: the TOTP_DIGITS-digit code of COUNTER, as text."""
    digest = hmac.new(key, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = int.from_bytes(digest[offset:offset + 4], "big") & 0x7FFFFFFF
    return "%0*d" % (TOTP_DIGITS, value % 10 ** TOTP_DIGITS)


def totp_secret(settings):
    """A totp door's key, from the base32 text an authenticator app stores."""
    import base64
    import binascii
    text = (settings.secret or "").replace(" ", "").upper()
    try:
        key = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < TOTP_MIN_KEY_BYTES:
        what = ("neither %s nor KNOCKD_ROTATOR_SECRET is set"
                % own_variable("SECRET", settings.door) if settings.secret is None else
                "%s is not a base32 TOTP secret of at least %d bits"
                % (settings.secret_variable, 8 * TOTP_MIN_KEY_BYTES))
        raise RotatorError("door %s is in totp mode and %s" % (settings.door, what),
                           "enrol it with add-client --totp, which makes one", EXIT_ENVIRONMENT)
    return key


# A PIN door's key costs a PBKDF2 (PIN_ITERATIONS rounds, about 3 ms): the
# watch keeps each one in memory, never on disk, so that a rotation of 1000
# PIN doors does not pay 1000 of them every time; a boundary run derives
# them before it sleeps (derive_keys).  Bounded: totp doors add a key per
# period.
KEY_CACHE = {}
KEY_CACHE_MAX = 20000


def cached_door_key(settings, material):
    index = (settings.door, settings.mode, settings.pin, material)
    if index not in KEY_CACHE:
        if len(KEY_CACHE) >= KEY_CACHE_MAX:
            KEY_CACHE.clear()
        KEY_CACHE[index] = door_key(settings, material)
    return KEY_CACHE[index]


def with_sequences(settings):
    """SETTINGS with .sequence_at(period start) -> the door's sequence value (bytes)."""
    if settings.mode == "totp":
        key = totp_secret(settings)

        def key_at(start):
            return cached_door_key(settings, hotp(key, start // TOTP_PERIOD).encode())
    else:
        secret_key = cached_door_key(settings, secret_bytes(settings))

        def key_at(start):
            return secret_key
    settings.sequence_at = lambda start, use=0: format_sequence(settings.generate(
        use_key(key_at(start), use), settings.door, start, settings.length,
        settings.port_modulo)).encode()
    return settings


def rotation_settings(environ, door):
    """read_settings() with the server's .lead: from LEAD seconds before its
    boundary a door holds the next period's sequence, its current one in the
    grace sibling (see door_start)."""
    settings = read_settings(environ, door)
    settings.lead = min(whole_number(environ, "KNOCKD_ROTATOR_LEAD", 0, MAX_PERIOD,
                                     DEFAULT_LEAD), settings.period - settings.grace)
    return settings


def settings_reader(environ):
    """A function door -> its settings with sequences (see with_sequences), each read once."""
    known = {}

    def settings_of(door):
        if door not in known:
            known[door] = with_sequences(rotation_settings(environ, door))
        return known[door]
    return settings_of


def door_start(now, settings):
    """The start of the period whose sequence the door of SETTINGS holds at NOW:
    the next period's from SETTINGS.lead seconds before its boundary."""
    return period_start(now + settings.lead, settings.period)


def next_event(now, period, grace, lead):
    """When the server next changes the file: the grace end, or the next lead's start."""
    start = period_start(now + lead, period)
    return start + grace if now < start + grace else start + period - lead


def plan_rotation(config_path, old_data, now, settings_of, edit=None, uses=None, burning=None):
    """The rotation of CONFIG_PATH's OLD_DATA for the moment NOW (pure: no I/O).

    SETTINGS_OF(door) gives a door's settings: .period, .grace and
    .sequence_at(period start, use).  EDIT, if given, changes the user's Lines
    first (add-client, remove-client).  USES (see use_count) gives a single-use
    door's use counter of a period; BURNING (its STATE_DIR/BURNING) gates the
    burns that add-client wrote ungated (with_burns_named).  The result's
    errors (line, what, fix) are those of the new file: knockd's grammar, the
    rotator's rules and the silent traps; a rotation refuses any of them.
    """
    old_lines = parse_config(old_data)
    user_lines, old_block = split_grace_block(old_lines)
    if edit:
        user_lines = edit(user_lines)
    doors = rotator_doors(user_lines)
    settings = {door: settings_of(door) for door in doors}
    starts = {door: door_start(now, settings[door]) for door in doors}
    counters = {door: use_count(uses, settings[door], starts[door]) for door in doors}
    current = {door: settings[door].sequence_at(starts[door], counters[door]) for door in doors}
    new_lines = with_burns_named(rewrite_config(user_lines, current), {
        door: (starts[door], counters[door]) for door in doors if settings[door].single_use},
        burning)
    errors = config_errors(new_lines) + rotator_errors(new_lines) + trap_errors(new_lines)
    warnings = trap_warnings(new_lines)
    graced = [door for door in doors if now < starts[door] + settings[door].grace]
    if graced and not errors:
        previous_uses = {door: (starts[door] - settings[door].period, use_count(
            uses, settings[door], starts[door] - settings[door].period)) for door in graced}
        previous = {door: settings[door].sequence_at(*previous_uses[door]) for door in graced}
        until = max(starts[door] + settings[door].grace for door in graced)
        new_lines = with_grace_block(new_lines, previous, until, {
            door: use for door, use in previous_uses.items() if settings[door].single_use})
        errors = config_errors(new_lines)
    # None: no door, nothing to plan for.
    event = min((next_event(now, s.period, s.grace, s.lead) for s in settings.values()),
                default=None)
    return Plan(old_lines=old_lines, user_lines=user_lines, old_block=old_block, doors=doors,
                settings=settings, starts=starts, current=current, new_lines=new_lines,
                graced=graced, event=event, errors=errors, warnings=warnings)


# A run by hand and the timer's hourly run mostly find the files current, but
# learnt it by planning every door again: in a new process, which has no
# keys (they are never written), 1000 PIN doors cost 11 s of PBKDF2.  So each
# good rotation records, per knockd, what its file was planned from: the
# file's SHA-256, a PBKDF2 of every KNOCKD_ROTATOR_* value and of this script
# (PIN_ITERATIONS rounds: a PIN guessed against it costs what one guessed
# against a sequence seen on the wire costs), the single-use counters and the
# moments between which that plan holds (the plan changes only at an event).
# A run that finds all of them as recorded has nothing to change.
PLANNED = "planned"
PLANNED_BASIS = {}       # this process's "salt" (the first it met) and "script" (its SHA-256)
PLANNED_DIGESTS = {}     # (salt, inputs) -> digest, for the threads of one run
PLANNED_LOCK = threading.Lock()


def inputs_digest(environ, salt):
    """The PBKDF2 of ENVIRON's KNOCKD_ROTATOR_* values and this script, under SALT."""
    import json
    if "script" not in PLANNED_BASIS:
        try:
            with open(__file__, "rb") as handle:
                PLANNED_BASIS["script"] = hashlib.sha256(handle.read()).hexdigest()
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
    still holds at NOW for ENVIRON and USES, else None: plan it again."""
    import json
    if b"ONE_TIME_SEQUENCES" in data.upper():
        return None          # their keepers follow files that knockd uses up
    try:
        with open(os.path.join(state_dir, PLANNED), "rb") as handle:
            record = json.loads(handle.read())
        salt = bytes.fromhex(record["salt"])
        holds = (record["from"] <= now < record["until"]
                 and record["file"] == hashlib.sha256(data).hexdigest()
                 and record["file"] == loaded_digest(state_dir)
                 and record["uses"] == uses_digest(uses)
                 and record["inputs"] == inputs_digest(environ, salt))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not holds:
        return None
    PLANNED_BASIS.setdefault("salt", salt)
    return Plan(doors=list(record["starts"]), starts=record["starts"], event=record["until"])


def heal_knockd(config_path, settings, data):
    """A current file (DATA) does not prove knockd runs: start it if it does not."""
    if knockd_runs(settings):
        return
    why = "knockd is not running, although %s is current" % config_path
    log(why + ": starting it")
    ok, detail = start_knockd(config_path, settings)
    if not ok:
        raise RotatorError("%s, and starting it failed (%s)" % (why, detail),
                           "start knockd now: systemctl start {0}; "
                           "journalctl -u {0}".format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(settings["STATE_DIR"], data)


# A stopped knockd (SIGSTOP, a job-control stop, a debugger) is `active` and
# passes the check command, yet hears no knock; its children that wait to run
# a stop_command run it only once they go on.  SIGCONT to each of them loses
# nothing: knockd keeps its doors, the stop_commands run (late).  A knockd that
# stays stopped (a debugger holds it) is hung: ended and started again with
# the file on disk, which costs the pending stop_commands, as after a reload.
RESUME_PATIENCE = 1


def resume_stopped_knockd(config_path, settings, data):
    """Let the stopped knockd processes reading CONFIG_PATH (which holds
    DATA) go on: a warning to log, or None."""
    found = knockd_processes(config_path)
    stopped = [pid for pid, (_, state, _) in found.items() if state in "Tt"]
    if not stopped:
        return None
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    main = [pid for pid in main_knockd(found) if pid in stopped]
    deadline = time.monotonic() + RESUME_PATIENCE
    while True:
        again = knockd_processes(config_path)
        held = [pid for pid in main if pid in again and again[pid][1] in "Tt"]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(CHECK_POLL)
    if not held:
        return ("knockd (%s) was stopped, hearing no knock: sent it SIGCONT"
                % ", ".join("pid %d" % pid for pid in stopped))
    why = "knockd (pid %d) stays stopped after a SIGCONT (a debugger holds it?)" % held[0]
    killed, detail = run_command(settings["KILL_COMMAND"])
    if killed:
        killed, detail = start_knockd(config_path, settings)
    if not killed:
        raise RotatorError("%s, and ending it and starting it again failed (%s)" % (why, detail),
                           "kill knockd and start it now: systemctl kill --signal=KILL "
                           "{0}; systemctl start {0}".format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(settings["STATE_DIR"], data)
    return why + ": ended it and started it again with %s" % config_path


def rotate(config_path, environ, now, dry_run=False, verbose=False, change=None, burn=None,
           whole_run=True, burn_use=None):
    """Bring CONFIG_PATH (knockd.conf, or an instance's file) to the state of
    the moment NOW: every rotator door holds the sequence of its period
    holding NOW (of the next period from LEAD seconds before its start), and
    from then until GRACE seconds after the period's start the grace block
    holds its previous one.  Returns the Plan.  CHANGE (an EnvChange)
    also edits the doors and swaps the environment file with the config, or
    neither when anything fails.  BURN names a single-use door (or grace
    sibling) that has just opened, BURN_USE the use (period start, counter)
    it opened with: a use burnt already makes the run an ordinary one, which
    finds the file current.  WHOLE_RUN: also warn about what concerns
    every file (the environment file's mode, variables nothing reads);
    rotate_all asks it of the first file only."""
    config_path = os.path.realpath(config_path)
    settings = settings_for(config_path, server_settings(environ))
    warn_if_readable_by_others(config_path, settings["ENV_FILE"] if whole_run else None)
    original_environ = environ
    with contextlib.nullcontext() if dry_run else take_lock(settings["STATE_DIR"]):
        if not dry_run:
            remove_stale_temporaries(config_path)
            remove_stale_trials(settings["STATE_DIR"])
        old_data = read_config(config_path)
        resumed = not dry_run and resume_stopped_knockd(config_path, settings, old_data)
        if resumed:
            log("warning: " + resumed)
        if change:
            change.prepare(config_path, old_data)
        environ = change.environ if change else with_env_file(environ, settings["ENV_FILE"])
        settings_of = settings_reader(environ)
        uses = read_uses(settings["STATE_DIR"])
        if burn:
            burnt = with_burn(uses, burn, now, settings_of, burn_use)
            if burnt is uses:
                log("%s: use %d:%d is burnt already, or its period is over (a replay, or a "
                    "second opening of it): nothing to burn" % ((burn,) + burn_use))
                burn = None
            else:
                base = burn[:-len(GRACE_SUFFIX)] if burn.endswith(GRACE_SUFFIX) else burn
                door = settings_of(base)
                uses = with_openings_kept(settings["STATE_DIR"], burnt, base, burn_use,
                                          door_start(now, door) - door.period)
                # Counted before anything else may fail: a used sequence never
                # comes back, even if this reload does not happen.
                write_uses(settings["STATE_DIR"], uses)
        recorded = (None if dry_run or verbose or change or burn else
                    as_planned(settings["STATE_DIR"], old_data, environ, uses, now))
        if recorded:
            heal_knockd(config_path, settings, old_data)
            return recorded
        plan = plan_rotation(config_path, old_data, now, settings_of,
                             change.edit if change else None, uses,
                             os.path.join(settings["STATE_DIR"], BURNING))
        refuse_errors(config_path, plan.errors + file_errors(plan.new_lines))
        new_data = b"".join(line.raw for line in plan.new_lines)
        if not dry_run and any(found.single_use for found in plan.settings.values()):
            # Where burn_command's gate records openings; without it every
            # opening starts a burn.
            os.makedirs(os.path.join(settings["STATE_DIR"], BURNING), mode=0o700, exist_ok=True)
        # Before knockd.conf: a file that knockd re-reads must already be kept.
        struck = not dry_run and keep_one_time_sequences(plan.new_lines)
        if not plan.doors:
            log("%s has no door whose name ends with %s: nothing to rotate"
                % (config_path, ROTATOR_SUFFIX))
        for what, fix in weak_doors(plan.settings):
            log("warning: %s (%s)" % (what, fix))
        crowded = crowded_knockd(plan.new_lines)
        if crowded:
            log("warning: " + crowded)
        algorithms = {found.algorithm for found in plan.settings.values()}
        for warning in unread_variables(environ, algorithms) if whole_run else ():
            log("warning: " + warning)
        if dry_run or verbose:
            for number, what, fix in plan.warnings:
                log("warning: " + finding(config_path, number, what, fix))

        if dry_run:
            if new_data != old_data:
                sys.stdout.writelines(unified_diff(plan.old_lines, plan.new_lines, config_path))
            return plan
        loaded = loaded_digest(settings["STATE_DIR"]) == file_digest(new_data)
        if new_data == old_data and not struck and loaded:
            if verbose:
                log("%s is current" % config_path)
            heal_knockd(config_path, settings, new_data)
            remember_good(settings["STATE_DIR"], new_data)
            record_fingerprints(settings["STATE_DIR"], plan)
            record_planned(settings["STATE_DIR"], new_data, environ, uses, now, plan)
        else:
            if new_data == old_data and not struck:
                log("knockd was not seen to load the current %s (a reload failed, a run "
                    "ended before it, or no record yet): reloading it" % config_path)
            try_on_knockd(config_path, plan.new_lines, settings)
            old_sequences = door_sequences(plan.user_lines)
            was_running = knockd_runs(settings)
            # The file that makes the other one valid goes first: a door must
            # never be without its secret, even after a crash between the two.
            if change and change.adds:
                change.write()
            def fallback():
                """The last file knockd ran with, at this moment's sequences."""
                good = last_good(settings["STATE_DIR"])
                if good is None:
                    return old_data
                try:
                    # The environment before any change: a removed client's
                    # door that comes back must keep its own secret.
                    replan = plan_rotation(config_path, good, now, settings_reader(
                        with_env_file(original_environ, settings["ENV_FILE"])), uses=uses,
                        burning=os.path.join(settings["STATE_DIR"], BURNING))
                except RotatorError:
                    return good
                return good if replan.errors else b"".join(l.raw for l in replan.new_lines)

            try:
                replace_file(config_path, new_data)
                warning = load_into_knockd(config_path, new_data, fallback, was_running,
                                           settings)
            except RotatorError:
                if change and change.adds:
                    change.undo()
                raise
            if change and not change.adds:
                change.write()
            record_fingerprints(settings["STATE_DIR"], plan)
            record_planned(settings["STATE_DIR"], new_data, environ, uses, now, plan)
            if warning:
                log("warning: " + warning)
            # After a reload, not a start: knockd's first reload keeps the heap
            # of its filter (4.5 to 27.5 MB at 100 doors), which is no leak.
            restarted = was_running and not warning and restart_when_grown(config_path,
                                                                             settings)
            if restarted:
                log(restarted)
            replace_file(os.path.join(settings["STATE_DIR"], "last-rotation"), b"%d\n" % now,
                         create=True)
            for door in plan.doors:
                if old_sequences.get(door) != plan.current[door]:
                    log("%s: rotated to the period from %s" % (door, utc(plan.starts[door])))
            if plan.graced and not plan.old_block:
                until = max(plan.starts[door] + plan.settings[door].grace
                            for door in plan.graced)
                early = [door for door in plan.graced if now < plan.starts[door]]
                doors = "the doors" if plan.graced == plan.doors else ", ".join(plan.graced)
                if early:
                    log("lead: %s hold the sequences of the period from %s already; the "
                        "current ones open them until %s" % (
                            doors, utc(min(plan.starts[door] for door in early)), utc(until)))
                else:
                    log("grace: the previous sequences open %s until %s" % (doors, utc(until)))
            elif plan.old_block and not plan.graced:
                log("grace ended: the previous sequences no longer open the doors")
    return plan


def try_on_knockd(config_path, lines, settings):
    """Refuse LINES, before they are written, when knockd refuses them.
    Only a file in a shape knockd has not run is tried (see file_shape)."""
    good = last_good(settings["STATE_DIR"])
    if good is not None and file_shape(parse_config(good)) == file_shape(lines):
        return
    refusal, untried = knockd_trial(lines, settings)
    if untried:
        log("warning: the new %s was not tried on knockd first (%s)" % (config_path, untried))
    if refusal:
        raise RotatorError("knockd refuses the new %s: %s" % (config_path, refusal),
                           "the file and knockd are as they were; fix what knockd names",
                           EXIT_CONFIG)


def finding(config_path, number, what, fix):
    """One checker finding as printed: `PATH line N: WHAT (FIX)`."""
    return "%s line %d: %s (%s)" % (config_path, number, what, fix)


def refuse_errors(config_path, errors):
    """Print every (line, what, fix) of ERRORS and raise the last one."""
    if not errors:
        return
    errors = sorted(errors)
    for error in errors[:-1]:
        print("error: " + finding(config_path, *error), file=sys.stderr)
    number, what, fix = errors[-1]
    raise RotatorError("%s line %d: %s" % (config_path, number, what), fix, EXIT_CONFIG)


# ---------------------------------------------------------------- several knockd
#
# knockd compiles one capture filter for all its doors, at a cost that grows
# with the square of their number, and hears no knock meanwhile (docs/SCALE.md).  So add-client gives knockd.conf at most DOORS_PER_KNOCKD doors,
# and puts further clients into files of their own, knockd_rotator.d/N.conf
# beside knockd.conf, each read by a knockd of its own (the instance N of
# knockd_rotator-knockd@.service) and given as many doors at most.  These
# files are the rotator's; knockd.conf keeps its byte-exact rewrite.  A
# rotation brings every file to its moment and reloads only the knockd whose
# file changed, in threads that wait side by side, one compile per CPU at a
# time (RELOAD_SLOTS).  Each instance has its own state folder
# (STATE_DIR/knockd@N), so a burn of one of its doors waits for no other knockd.

INSTANCE_FOLDER = "knockd_rotator.d"
# 500 doors on 2 CPUs: one file per CPU at a time, 7.3 s; four, 4.6 s.
ROTATION_THREADS = 4 * (os.cpu_count() or 1)
INSTANCE_FILE = re.compile(r"[1-9][0-9]{0,5}\.conf")
CLIENTS_LOCK = "clients-lock"     # add-client and remove-client, across all knockd


def instance_folder(config_path):
    return os.path.join(os.path.dirname(os.path.realpath(config_path)), INSTANCE_FOLDER)


def settings_for(config_path, settings):
    """SETTINGS (server_settings) for the knockd that reads CONFIG_PATH: an
    instance's file gets the instance's commands and state folder."""
    folder, base = os.path.split(os.path.realpath(config_path))
    if os.path.basename(folder) != INSTANCE_FOLDER or not INSTANCE_FILE.fullmatch(base):
        return settings
    name = base[:-len(".conf")]
    settings = dict(settings, INSTANCE=name, UNIT=INSTANCE_UNIT.replace("%i", name),
                    STATE_DIR=os.path.join(settings["STATE_DIR"], "knockd@" + name))
    for command in DEFAULT_COMMANDS:
        settings[command] = settings["INSTANCE_" + command].replace("%i", name)
    return settings


def knockd_files(config_path):
    """CONFIG_PATH and the files of its instances, in the order of their numbers."""
    folder = instance_folder(config_path)
    try:
        names = [name for name in os.listdir(folder) if INSTANCE_FILE.fullmatch(name)]
    except FileNotFoundError:
        names = []
    except OSError as exc:
        read_config(config_path)         # the likelier cause, named first
        raise RotatorError("cannot list %s: %s" % (folder, exc.strerror),
                           "run as root", EXIT_CONFIG) from None
    names.sort(key=lambda name: int(name[:-len(".conf")]))
    return [os.path.realpath(config_path)] + [os.path.join(folder, name) for name in names]


def rotate_all(config_path, environ, now, dry_run=False, verbose=False, schedule=False):
    """rotate() knockd.conf and every instance's file; schedule a boundary run
    for the first next event when SCHEDULE.  A file that fails does not stop
    the others: each failure is printed, and the gravest one raised."""
    paths = knockd_files(config_path)
    KNOCKD_CONFIGS.clear()
    if dry_run or len(paths) == 1:
        plans = [rotate(path, environ, now, dry_run, verbose, whole_run=path == paths[0])
                 for path in paths]
    else:
        import concurrent.futures
        # RELOAD_SLOTS keeps the reloads to one per CPU; the threads wait.
        with concurrent.futures.ThreadPoolExecutor(ROTATION_THREADS) as pool:
            futures = [pool.submit(rotate, path, environ, now, verbose=verbose,
                                   whole_run=path == paths[0]) for path in paths]
        plans, failures = [], []
        for future in futures:
            try:
                plans.append(future.result())
            except RotatorError as exc:
                failures.append(exc)
        if failures:
            failures.sort(key=lambda exc: exc.code == EXIT_RECOVERY)
            for exc in failures[:-1]:
                print(exc, file=sys.stderr)
            raise failures[-1]
    # The lead exists so that every knockd holds the new sequences when the
    # period starts: say so when this run ended too late for that.
    prepared = min((plan.starts[door] for plan in plans for door in plan.doors
                    if plan.starts[door] > now), default=None)
    ended = time.time()
    if prepared is not None and not dry_run and ended > prepared:
        log("warning: the rotation of %d knockd files ended %.1f s after the period start at "
            "%s that it prepared: until then some knockd held the old sequences, and clients "
            "got in on their retry (raise KNOCKD_ROTATOR_LEAD, at most the period less the "
            "grace, or lengthen the period)" % (len(paths), ended - prepared, utc(prepared)))
    event = min((plan.event for plan in plans if plan.event is not None), default=None)
    if schedule:
        settings = server_settings(environ)
        with take_lock(settings["STATE_DIR"]):
            schedule_boundary_run(config_path, event, now, settings, verbose)
    return event


def instance_options(main_lines):
    """A new instance's file: the header and settings of knockd.conf's
    [options] (the same interface and log), less its pid file, which would be
    knockd.conf's knockd's.  No comment comes along: one may be a client's
    mark, which belongs to the door below it."""
    raws = [b"[options]\n"]
    for line in main_lines:
        if line.section == b"options" and line.kind == "directive" and line.key != "PIDFILE":
            raws.append(line.raw if line.raw.endswith(b"\n") else line.raw + b"\n")
    return b"".join(raws)


# add-client looks at every knockd's file, and parsing 50 files of 10 doors
# took 7 ms: the 501st client waited for what the 2nd did not.  It counts
# their header lines instead (0.7 ms), and parses only a file that has the
# new client's name in it.  Each pattern starts at a newline, which the
# regular expression engine finds fast; the data gets one in front.
HEADER_LINE = re.compile(rb"\n[ \t\r\v\f]*\[([^\n\0]*)\][ \t\r\v\f]*(?:\0[^\n]*)?(?=\n|\Z)")
GRACE_BLOCK = re.compile(rb"\n%s.*?\n%s\r*(?=\n|\Z)" % (re.escape(GRACE_BEGIN),
                                                       re.escape(GRACE_END)), re.DOTALL)


def door_count(data):
    """door_load(parse_config(DATA))[0] (the doors outside a grace window),
    from the header lines outside the grace block."""
    return sum(1 for section in HEADER_LINE.findall(GRACE_BLOCK.sub(b"", b"\n" + data, count=1))
               if section != b"options")


def place_client(data_of, settings):
    """The file a new client's door goes into: the one of the knockd with the
    fewest doors, if that is fewer than DOORS_PER_KNOCKD (0: knockd.conf
    always), else a new instance's file, made here (its knockd starts with
    the rotation).  DATA_OF maps knockd_files() to their bytes.  Returns
    (path, whether it was made)."""
    paths = list(data_of)
    limit = settings["DOORS_PER_KNOCKD"]
    if limit == 0:
        return paths[0], False
    counts = [door_count(data_of[path]) for path in paths]
    fewest = min(range(len(paths)), key=lambda index: counts[index])
    if counts[fewest] < limit:
        return paths[fewest], False
    taken = {int(os.path.basename(path)[:-len(".conf")]) for path in paths[1:]}
    number = min(set(range(1, len(taken) + 2)) - taken)
    path = os.path.join(instance_folder(paths[0]), "%d.conf" % number)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RotatorError("cannot make %s: %s" % (os.path.dirname(path), exc.strerror),
                           "run as root", EXIT_CONFIG) from None
    replace_file(path, instance_options(parse_config(data_of[paths[0]])), create=True)
    log("every knockd has %d doors: starting another one for %s" % (limit, path))
    return path, True


def client_file(config_path, name):
    """The file that holds client NAME's door, or None."""
    for path in knockd_files(config_path):
        if name in client_marks(split_grace_block(parse_config(read_config(path)))[0]):
            return path
    return None


# ---------------------------------------------------------------- --watch
#
# A long-running mode for short periods: one process that rotates at every
# boundary and grace end and sleeps in between; a change of knockd.conf or of
# the environment file wakes it within WATCH_LOOK.  Each rotation takes the lock
# and rolls back like a one-off run; a failed one is logged and tried again
# at the next event (at the latest RETRY_SECONDS later).  SIGTERM or
# SIGINT during a rotation lets it finish first.  Under systemd, its state is
# the unit's status line (sd_notify STATUS=), and WATCH_FAILURES failed events
# in a row end the process with the last error's exit code, so that the unit
# shows the failure (and Restart= tries again) instead of a green `active`.

WATCH_LOOK = 1        # seconds between two looks at the files' modification times
WATCH_FAILURES = 3


def stop_signals():
    """Make SIGTERM and SIGINT only note themselves and wake pause_until().
    Returns (the wake-up descriptor, the list of signals received)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    received = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, frame: received.append(signum))
    return read_end, received


def modification_times(paths):
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime_ns)
        except OSError:
            times.append(None)
    return times


def pause_until(moment, wakeup, received, changed):
    """Sleep until the wall clock reaches MOMENT, a stop signal comes, or CHANGED()."""
    while not received and not changed():
        remaining = moment - time.time()
        if remaining <= 0:
            return
        # A second at a time: to follow changes of the wall clock, and to see
        # a door that add-client (or an editor) added, which may need an
        # event sooner than MOMENT.
        select.select([wakeup], [], [], min(remaining, WATCH_LOOK))
        try:
            os.read(wakeup, 512)
        except BlockingIOError:
            pass


def door_timings(config_path, environ, settings):
    """{(period, grace, lead)} of the rotator doors of CONFIG_PATH and its
    instances' files; empty when unknown."""
    try:
        environ = with_env_file(environ, settings["ENV_FILE"])
        timings = set()
        for path in knockd_files(config_path):
            lines, _ = split_grace_block(parse_config(read_config(path)))
            timings |= {(door.period, door.grace, door.lead) for door in
                        (rotation_settings(environ, name) for name in rotator_doors(lines))}
        return timings
    except RotatorError:
        return set()


def notify_systemd(environ, state):
    """Send STATE (e.g. `STATUS=...`) to the service manager, if there is one."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket
    if address.startswith("@"):
        address = "\0" + address[1:]      # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(state.encode("utf-8", "replace"), address)
        except OSError:
            pass                          # the status line is a courtesy


def watch(config_path, environ, verbose):
    """Rotate at every event until a stop signal.  Returns an exit code."""
    settings = server_settings(environ)    # a bad setting ends the service now, not later
    wakeup, received = stop_signals()
    def files():
        return [settings["ENV_FILE"]] + knockd_files(config_path)
    end_pending_boundary_run(settings["STATE_DIR"])
    log("watching %s" % config_path)
    failures = 0
    while not received:
        now = time.time()
        # Read before the rotation: an edit made while it runs must wake us.
        seen = modification_times(files())
        try:
            # With no door, nothing is due: a change of the files wakes us.
            event = rotate_all(config_path, environ, now, verbose=verbose) or now + RETRY_SECONDS
            failures = 0
            notify_systemd(environ, "STATUS=rotated at %s; next event at %s"
                           % (utc(now), utc(event)))
        except RotatorError as exc:
            # The rollback rewrote the file: that must not wake us at once,
            # or a failing reload would be hammered in a loop.
            seen = modification_times(files())
            failures += 1
            if failures >= WATCH_FAILURES:
                log("%s; %d failed events in a row: exiting" % (exc, failures))
                notify_systemd(environ, "STATUS=FAILING: %s" % exc)
                return exc.code
            event = retry_moment(config_path, environ, settings, now)
            log("%s; trying again at %s" % (exc, utc(event)))
            notify_systemd(environ, "STATUS=FAILING (%d in a row): %s; trying again at %s"
                           % (failures, exc, utc(event)))
        pause_until(event, wakeup, received, lambda: modification_times(files()) != seen)
    log("stopped by signal %d" % received[0])
    return EXIT_OK


# ---------------------------------------------------------------- the environment file
#
# The server's settings live in ENV_FILE (the units' EnvironmentFile).  Every
# run reads it again over the environment it was started with, so that a
# long-running --watch sees the clients that add-client enrolled since.

def read_env_file(path):
    """ENV_FILE's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RotatorError("cannot read %s: %s" % (path, exc.strerror),
                           "run as root", EXIT_ENVIRONMENT) from None


def env_assignment(raw):
    """(name, value) of one line of a systemd EnvironmentFile, or None."""
    line = raw.decode("utf-8", "surrogateescape").strip()
    name, equals, value = line.partition("=")
    if not equals or line[:1] in ("#", ";"):
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return name.strip(), value


# A run reads the environment file several times (the settings, the
# rotation, an enrolment's change), and with 500 clients' secrets in it each
# parse took 1 ms: the last file parsed is kept, in memory as it was anyway.
LAST_ENV = {}


def env_values(data):
    data = data or b""
    last = LAST_ENV.get("parsed")
    if last is None or last[0] != data:
        values = {}
        for raw in data.splitlines():
            assignment = env_assignment(raw)
            if assignment:
                values[assignment[0]] = assignment[1]
        last = LAST_ENV["parsed"] = (data, values)
    return dict(last[1])


def with_env_file(environ, path):
    """ENVIRON with the assignments of the file at PATH over it (if readable)."""
    try:
        data = read_env_file(path)
    except RotatorError:
        return environ       # not root: only the environment the run was given
    return dict(environ, **env_values(data))


# ---------------------------------------------------------------- clients
#
# add-client gives one client a door of its own: a comment line naming the
# client, then `[NAME_SERVICE_ROTATOR]` with the firewall commands, appended
# to the user's part of knockd.conf; the client's secret (and mode, PIN) go
# into ENV_FILE as KNOCKD_ROTATOR_<SETTING>_<NAME>.  remove-client takes both
# away.  Each is one rotation (rotate(change=...)): under the lock, both files
# are checked, then swapped one after the other, each atomically: add-client
# writes ENV_FILE first, remove-client knockd.conf first, so that no door is
# ever without its secret.  When knockd does not take the new config, both
# are as they were.

CLIENT_MARK = b"# knockd_rotator client "
NAME_MAX = 32            # characters of a client or service name
FIREWALLS = {
    # --firewall: (program, start_command, stop_command, start_command_6,
    # stop_command_6); {program} is its path, {set} the list or set of the port,
    # {seconds} cmd_timeout.  Every hole expires by itself after cmd_timeout, so
    # that a knockd that dies (SIGKILL, a crash, a restart under systemd's
    # KillMode=mixed) and never runs stop_command leaves no port open:
    # iptables: the admin's `-m recent --rcheck --seconds N` rule accepts an
    # address written to the kernel's recent list; one list holds both families.
    "iptables": ("iptables", "echo +%IP% > /proc/net/xt_recent/{set}",
                 "echo -%IP% > /proc/net/xt_recent/{set}",
                 "echo +%IP% > /proc/net/xt_recent/{set}",
                 "echo -%IP% > /proc/net/xt_recent/{set}"),
    # nftables: elements with a timeout, in one set per family (a set holds
    # one address type) of the admin's `inet filter` table.
    "nftables": ("nft", "{program} add element inet filter {set} {{ %IP% timeout {seconds}s }}",
                 "{program} delete element inet filter {set} {{ %IP% }}",
                 "{program} add element inet filter {set}_6 {{ %IP% timeout {seconds}s }}",
                 "{program} delete element inet filter {set}_6 {{ %IP% }}"),
    # ufw has no rule that expires: only stop_command closes it.  `prepend`
    # (ufw 0.36), not `insert 1`, which fails for an IPv6 rule placed before
    # IPv4 ones, and on an empty ruleset.
    "ufw": ("ufw", "{program} prepend allow from %IP% to any port {port} proto tcp",
            "{program} delete allow from %IP% to any port {port} proto tcp",
            "{program} prepend allow from %IP% to any port {port} proto tcp",
            "{program} delete allow from %IP% to any port {port} proto tcp"),
}
FIREWALL_PACKAGES = {"iptables": "iptables", "nft": "nftables", "ufw": "ufw"}
# The door: a knock must be done within SEQ_TIMEOUT s; the client then has
# CMD_TIMEOUT s to connect before the stop_command closes the port again.
CLIENT_SEQ_TIMEOUT = 15
CLIENT_CMD_TIMEOUT = 30


def nft_set(port):
    """The nftables set (IPv4; + "_6" for IPv6) and the iptables recent list of PORT."""
    return "knockd_rotator_%d" % port


def firewall_rules(firewall, port, seconds):
    """The rules the admin adds once for a door of FIREWALL on PORT: they
    accept what the door lets in, for SECONDS, and drop the port otherwise,
    on IPv4 and IPv6."""
    name = nft_set(port)
    if firewall == "iptables":
        return ["%s -I INPUT -p tcp --dport %d -j DROP" % (program, port)
                for program in ("iptables", "ip6tables")] + [
            "%s -I INPUT -p tcp --dport %d -m recent --name %s --rcheck --seconds %d -j ACCEPT"
            % (program, port, name, seconds) for program in ("iptables", "ip6tables")]
    if firewall == "nftables":
        return ["nft add set inet filter %s '{ type ipv4_addr; flags timeout; }'" % name,
                "nft add set inet filter %s_6 '{ type ipv6_addr; flags timeout; }'" % name,
                "nft insert rule inet filter input tcp dport %d drop" % port,
                "nft insert rule inet filter input ip6 saddr @%s_6 tcp dport %d accept"
                % (name, port),
                "nft insert rule inet filter input ip saddr @%s tcp dport %d accept"
                % (name, port)]
    return []


def door_commands(firewall, program, port, seconds):
    """(start_command, stop_command, start_command_6, stop_command_6) of a
    FIREWALL door on PORT whose holes last SECONDS; PROGRAM is the path."""
    fields = dict(program=program, port=port, set=nft_set(port), seconds=seconds)
    return tuple(command.format(**fields) for command in FIREWALLS[firewall][1:])


def one_line(what, text, fix, code):
    """Refuse TEXT (named WHAT), bound for a line of knockd.conf: a line break
    in it would start lines of its own there (a start_command of whoever set
    it, which knockd runs at the next knock), and a character that is not
    printable (a control character, a byte that is not UTF-8) has no place."""
    if not text.isprintable():
        raise RotatorError("%s holds a line break or another character that is not "
                           "printable, and would go into knockd.conf" % what, fix, code)


def check_name(kind, text):
    """TEXT, when it is a valid client or service name."""
    if (0 < len(text) <= NAME_MAX and text.isascii() and text[0].isalnum()
            and all(c.isalnum() or c == "-" for c in text)):
        return text
    raise RotatorError("invalid %s name %r" % (kind, text[:40]),
                       "use 1 to %d letters, digits and '-', starting with a letter or digit"
                       % NAME_MAX, EXIT_USAGE)


def firewall_commands(firewall, port, environ):
    """(start_command, stop_command, start_command_6, stop_command_6) of a
    client door, with the program's full path."""
    import shutil
    program = FIREWALLS[firewall][0]
    path = shutil.which(program, path=environ.get("PATH", os.defpath))
    if not path:
        raise RotatorError("%s is not installed (no %s in PATH)" % (firewall, program),
                           "install it: apt install %s; or choose another --firewall"
                           % FIREWALL_PACKAGES[program], EXIT_ENVIRONMENT)
    one_line("the path of %s, %r," % (program, path), path,
             "give PATH folders without one", EXIT_ENVIRONMENT)
    rules = "; ".join(firewall_rules(firewall, port, CLIENT_CMD_TIMEOUT))
    if firewall == "nftables":
        # A door whose set is missing, or has no timeouts, opens nothing.
        for name in (nft_set(port), nft_set(port) + "_6"):
            listing = "%s list set inet filter %s" % (path, name)
            ok, detail = run_command(listing)
            what = "does not exist (%s)" % detail
            if ok and not run_command(listing + " | grep -qw timeout")[0]:
                ok, what = False, "has no flags timeout: its holes would not close themselves"
            if not ok:
                raise RotatorError(
                    "the nftables set inet filter %s %s" % (name, what),
                    "create both sets (with flags timeout) and the rules, in /etc/nftables.conf "
                    "too: " + rules, EXIT_ENVIRONMENT)
    elif firewall == "iptables" and not os.path.exists("/proc/net/xt_recent/" + nft_set(port)):
        # Only a warning: the list appears with the rule, which may come later
        # (at boot, from a saved ruleset); until then the door opens nothing.
        print("warning: there is no iptables recent list %s yet: the door opens nothing "
              "until you add the rules (once, and to your saved ruleset): %s"
              % (nft_set(port), rules), file=sys.stderr)
    return door_commands(firewall, path, port, CLIENT_CMD_TIMEOUT)


def client_marks(lines):
    """{client name: index of its comment line} in LINES."""
    marks = {}
    for index, line in enumerate(lines):
        if line.kind == "comment" and line.raw.startswith(CLIENT_MARK):
            name = line.raw[len(CLIENT_MARK):].split(b":", 1)[0]
            marks[name.decode("utf-8", "replace")] = index
    return marks


def client_door_lines(name, door, commands, newline):
    """The raw lines of a new client door (its sequence comes with the rotation)."""
    start_command, stop_command, start_command_6, stop_command_6 = commands
    return [line.encode() + newline for line in [
        "",
        "%s%s: added by add-client; remove-client %s removes this door"
        % (CLIENT_MARK.decode(), name, name),
        "[%s]" % door,
        "    seq_timeout     = %d" % CLIENT_SEQ_TIMEOUT,
        "    tcpflags        = syn",
        "    start_command   = %s" % start_command,
        "    start_command_6 = %s" % start_command_6,
        "    cmd_timeout     = %d" % CLIENT_CMD_TIMEOUT,
        "    stop_command    = %s" % stop_command,
        "    stop_command_6  = %s" % stop_command_6]]


def without_client_door(lines, name, marks):
    """LINES without client NAME's comment line and door (and the blank line before)."""
    first = marks[name]
    header = first + 1
    if header >= len(lines) or lines[header].kind != "section":
        raise RotatorError("the comment line %d of client %s is not followed by its door"
                           % (lines[first].number, name),
                           "remove the door by hand, then the comment line", EXIT_CONFIG)
    body = section_body(lines, header)
    last = header + max([i + 1 for i, line in enumerate(body) if line.kind == "directive"],
                        default=0)
    if first > 0 and lines[first - 1].kind == "blank":
        first -= 1
    kept = lines[:first] + lines[last + 1:]
    return numbered_lines([(line.number, line.raw) for line in kept])


class EnvChange:
    """The change of knockd.conf's doors and of ENV_FILE that a rotation makes
    for add-client or remove-client (see rotate()).  PREPARE(lines, values)
    checks the change against the user's Lines of knockd.conf and ENV_FILE's
    values, under the lock; it returns (edit of the Lines, assignments to
    append, names to remove)."""

    def __init__(self, env_path, environ, prepare, adds):
        self.env_path, self.base_environ, self.checker = env_path, environ, prepare
        self.adds = adds         # True for add-client, False for remove-client
        self.old_env = self.new_env = None
        self.edit = self.environ = None

    def prepare(self, config_path, old_data):
        self.old_env = read_env_file(self.env_path)
        warning = readable_by_others(self.env_path)
        if warning:
            raise RotatorError("%s is readable by others, and would hold a client's secret"
                               % self.env_path, private_fix(self.env_path),
                               EXIT_ENVIRONMENT)
        if self.adds and readable_by_others(config_path):
            raise RotatorError("%s is readable by others, and would hold the client's live "
                               "sequences" % config_path, private_fix(config_path),
                               EXIT_CONFIG)
        user_lines, _ = split_grace_block(parse_config(old_data))
        values = env_values(self.old_env)
        self.edit, assignments, removals = self.checker(user_lines, values)
        kept = (self.old_env or b"").splitlines(True)
        if removals:
            kept = [raw for raw in kept if (env_assignment(raw) or ("",))[0] not in removals]
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\n"
        kept += [("%s=%s\n" % pair).encode() for pair in assignments]
        self.new_env = b"".join(kept)
        merged = {**self.base_environ, **values, **dict(assignments)}
        self.environ = {name: value for name, value in merged.items() if name not in removals}

    def write(self):
        replace_file(self.env_path, self.new_env, create=True)

    def undo(self):
        if self.old_env is None:
            os.unlink(self.env_path)
        else:
            replace_file(self.env_path, self.old_env)


# Characters a PIN may have: safe unquoted in ENV_FILE, for systemd and a shell.
PIN_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:@+%/")
# A stolen secret (or, in totp mode, the public set of 10^6 codes) plus a
# sprayed PIN: docs/CLIENTS.md, "A PIN", has the arithmetic behind this minimum.
PIN_MIN_CHARS = 10


def read_hidden(prompt):
    """A line typed without echo on the terminal, or read from a piped stdin."""
    if sys.stdin.isatty():
        import getpass
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


def read_new_pin(door):
    pin = read_hidden("PIN for %s: " % door)
    if len(pin) < PIN_MIN_CHARS or not set(pin) <= PIN_CHARACTERS:
        raise RotatorError("the PIN must have at least %d characters, each a letter, a digit "
                           "or one of -_.,:@+%%/" % PIN_MIN_CHARS,
                           "choose another; longer is stronger (see docs/CLIENTS.md, A PIN)", EXIT_USAGE)
    if sys.stdin.isatty() and read_hidden("the same PIN again: ") != pin:
        raise RotatorError("the two PINs differ", "type the same PIN twice", EXIT_USAGE)
    return pin


def client_environment(environ, door):
    """{variable: value} a client of DOOR needs: the secret (not in totp mode:
    the app holds it), and each setting whose client default differs."""
    settings = read_settings(environ, door)
    if settings.mode == "totp":
        lines = {own_variable("MODE", door): "totp"}
    else:
        lines = {own_variable("SECRET", door): settings.secret}
    for setting, field in [("ALGORITHM", "algorithm"), ("LENGTH", "length"),
                           ("PORT_MODULO", "port_modulo"), ("PERIOD_MODULO", "period"),
                           ("GRACE", "grace"), ("SINGLE_USE", "single_use")]:
        value = getattr(settings, field)
        if getattr(read_settings(lines, door), field) != value:
            lines[own_variable(setting, door)] = str(int(value) if value is True else value)
    return lines


def qrencode_program(environ):
    import shutil
    return shutil.which("qrencode", path=environ.get("PATH", os.defpath))


def qrencode(text, environ, *options):
    """qrencode's image of TEXT (OPTIONS: its type), with the standard's quiet
    zone of 4 modules (strict decoders find nothing in less); None without
    qrencode."""
    program = qrencode_program(environ)
    if not program:
        return None
    # The text goes through stdin: a command line is visible to every user.
    result = subprocess.run([program, "-m", "4", "-o", "-"] + list(options),
                            input=text.encode(), env=without_secrets(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return result.stdout if result.returncode == 0 else None


def qr_code(text, environ):
    """TEXT drawn as a QR code for the terminal, or a line saying how to get one."""
    # ANSIUTF8 sets both colours (white modules on black), so the code is the
    # right way round whatever the terminal's theme: UTF8 draws the light
    # modules in the terminal's foreground, which inverts it on a light one.
    drawing = qrencode(text, environ, "-t", "ANSIUTF8")
    if drawing is not None:
        return drawing.decode("utf-8", "replace")
    return ("(no QR code: qrencode is not installed; apt install qrencode, then "
            "`qrencode -t ANSIUTF8 -m 4` draws the lines above from its standard input)\n")


def check_qr_png(path, environ):
    """Refuse, before anything changes, a --qr-png PATH that write_qr_png would."""
    if not os.path.basename(path):
        raise RotatorError("--qr-png %r names no file" % path,
                           "give the path of a new file, e.g. /root/alice.png", EXIT_USAGE)
    if os.path.lexists(path):
        raise RotatorError("--qr-png %s exists already" % path,
                           "choose a new path, or delete that file first", EXIT_USAGE)
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise RotatorError("--qr-png %s: there is no folder %s" % (path, folder),
                           "create it, or choose another path", EXIT_USAGE)
    if not qrencode_program(environ):
        raise RotatorError("--qr-png needs qrencode, which is not installed",
                           "apt install qrencode, or leave out --qr-png", EXIT_ENVIRONMENT)


def write_qr_png(path, text, environ, name):
    """TEXT's QR code into PATH, a new PNG file of mode 0600, once client NAME
    is enrolled: a failure here leaves the enrolment as it is."""
    # 8 pixels a module: big enough to scan off a screen.
    image = qrencode(text, environ, "-t", "PNG", "-s", "8")
    try:
        if image is None:
            raise OSError("qrencode failed")
        # O_EXCL and O_NOFOLLOW: never over a file, nor through a link, that
        # someone put there since check_qr_png.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(image)
        except OSError:
            os.unlink(path)
            raise
    except OSError as exc:
        raise RotatorError("client %s is enrolled (above), but --qr-png %s failed: %s"
                           % (name, path, exc.strerror or exc),
                           "scan the QR code above instead, or remove-client %s and enrol "
                           "it again" % name,
                           EXIT_USAGE if isinstance(exc, FileExistsError) else EXIT_ENVIRONMENT
                           ) from None


def otpauth_uri(door, host, secret):
    """The otpauth:// URI that authenticator apps read (Key Uri Format)."""
    from urllib.parse import quote
    # The label's one colon parts issuer and account: safe="" escapes every
    # other, as an IPv6 --host has, and a '/' that would end the path.
    return ("otpauth://totp/%s:%s?secret=%s&issuer=%s&algorithm=SHA1&digits=%d&period=%d"
            % (quote("knockd-rotator"), quote("%s@%s" % (door, host), safe=""), secret,
               quote("knockd-rotator"), TOTP_DIGITS, TOTP_PERIOD))


def burn_gate(folder, door):
    """The shell in front of DOOR's burn: it records the opening in FOLDER
    (STATE_DIR/BURNING) and lets only the first opening of a use through;
    the rotation names the use (0:0 here)."""
    import shlex
    record = os.path.join(folder, door + ".0.0")
    return "{ echo 2>/dev/null >>%s; mkdir %s 2>/dev/null || [ ! -d %s ]; } &&" % (
        shlex.quote(record), shlex.quote(record + ".burn"), shlex.quote(folder))


def burn_command(config_path, door, environ):
    """The start of a single-use door's start_command: `burn DOOR` in the
    background, so that the port opens without waiting for the reload.
    knockd's child has no KNOCKD_ROTATOR_* variable: the ones this run has
    (its settings, and the environment file's path) go along, but never a
    secret, a SALT or a PIN, which the burn reads from the environment file.
    A shell gate in front records each opening and starts the burn for the
    first opening of a use only (see single use); the rotation writes the
    use (0:0 here) as it writes the sequence.  Without the state folder's
    BURNING folder every opening burns, as before the gate."""
    import shlex
    settings = sorted((name, value) for name, value in without_secrets(environ).items()
                      if name.startswith("KNOCKD_ROTATOR_"))
    for name, value in settings:
        one_line(name, value, "unset it, or remove the character", EXIT_ENVIRONMENT)
    path = os.path.realpath(config_path)
    one_line("the path %r" % path, path, "give knockd.conf a path without one", EXIT_USAGE)
    folder = os.path.join(settings_for(path, server_settings(environ))["STATE_DIR"], BURNING)
    one_line("the state folder %r" % folder, folder,
             "set KNOCKD_ROTATOR_STATE_DIR to a path without one", EXIT_ENVIRONMENT)
    assignments = ["%s=%s" % (name, shlex.quote(value)) for name, value in settings]
    return " ".join([burn_gate(folder, door)] + assignments + [
        shlex.quote(SCRIPT), "--config", shlex.quote(path), "burn", door, "--use", "0:0", "& "])


def add_client(config_path, environ, now, args):
    """Enrol a client: a door of its own, a new secret, one rotation; then
    print what the client needs."""
    import secrets
    name = args.name
    door = "%s_%s%s" % (name, args.service, ROTATOR_SUFFIX)
    if args.totp and not args.pin:
        raise RotatorError("a totp door needs a PIN: without one, its keys are the same "
                           "10^6 in every period, and one address that sprays them opens it",
                           "add --pin", EXIT_USAGE)
    if args.qr_png is not None:
        check_qr_png(args.qr_png, environ)
    commands = firewall_commands(args.firewall, args.port, environ)
    if args.totp:
        import base64
        secret = base64.b32encode(secrets.token_bytes(TOTP_NEW_KEY_BYTES)).decode()
        assignments = [(own_variable("SECRET", door), secret),
                       (own_variable("MODE", door), "totp")]
    else:
        secret = secrets.token_urlsafe(32)
        assignments = [(own_variable("SECRET", door), secret)]
    if args.pin:
        assignments.append((own_variable("PIN", door), read_new_pin(door)))
    settings = server_settings(environ)
    env_path = settings["ENV_FILE"]
    if args.single_use:
        assignments.append((own_variable("SINGLE_USE", door), "1"))

    def enrolled(lines):
        if name in client_marks(lines) or door in rotator_doors(lines):
            raise RotatorError("client %s is enrolled already" % name,
                               "remove-client %s first, or choose another name" % name,
                               EXIT_USAGE)

    def prepare(lines, values):
        enrolled(lines)
        taken = sorted({own_variable(s, door) for s in DOOR_SETTINGS} & set(values))
        if taken:
            raise RotatorError("%s sets %s already" % (env_path, taken[0]),
                               "delete that line, or choose another name", EXIT_USAGE)
        newline = b"\r\n" if lines and lines[0].raw.endswith(b"\r\n") else b"\n"
        raws = client_door_lines(name, door, commands, newline)
        return (lambda user: with_lines_appended(user, raws)), assignments, ()

    # The lock keeps two enrolments from picking the same place, or from
    # rewriting the environment file at once from two knockd's rotations.
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        data_of = {path: read_config(path) for path in knockd_files(config_path)}
        for data in data_of.values():
            if name.encode("utf-8", "surrogateescape") in data:
                enrolled(split_grace_block(parse_config(data))[0])
        target, made = place_client(data_of, settings)
        change = EnvChange(env_path, environ, prepare, adds=True)
        try:
            if args.single_use:
                # An IPv6 knock burns the use as well.
                burn = burn_command(target, door, environ)
                commands = (burn + commands[0], commands[1], burn + commands[2], commands[3])
            plan = rotate(target, environ, now, change=change)
        except RotatorError:
            # A new knockd that never ran leaves nothing behind.
            if made and not knockd_runs(settings_for(target, settings)):
                os.unlink(target)
            raise
    tell_next_event(config_path, plan.event, now, settings)

    import socket
    host = args.host or socket.gethostname()
    service = door[:-len(ROTATOR_SUFFIX)]
    client_lines = "".join("%s=%s\n" % pair
                           for pair in client_environment(change.environ, door).items())
    print("Client %s enrolled: door [%s] in %s opens tcp port %d (%s).\n"
          % (name, door, target, args.port, args.firewall))
    if args.totp:
        scanned = otpauth_uri(door, host, secret)
        print("1. Add the key to the authenticator app: scan this QR code, or type the "
              "key %s\n   (%s)\n" % (secret, scanned))
        sys.stdout.write(qr_code(scanned, environ))
        print("\n2. Put these lines into the client's environment:\n\n" + client_lines)
        knock = "knockd_rotator_client.py knock %s %s --code - --check %d" % (
            host, service, args.port)
    else:
        print("Put these lines into the client's environment (a file that only its user "
              "can read), or scan the QR code below:\n\n" + client_lines)
        scanned = client_lines
        sys.stdout.write(qr_code(scanned, environ))
        knock = "knockd_rotator_client.py knock %s %s --check %d" % (host, service, args.port)
    if args.pin:
        knock += " --pin"
        print("\nThe PIN is in none of these: the client types it (--pin).")
    print("\nThen knock:  %s" % knock)
    if args.qr_png is not None:
        write_qr_png(args.qr_png, scanned, environ, name)
        print("\nThe QR code is in %s too (mode 0600): delete it once scanned." % args.qr_png)
    return EXIT_OK


def remove_client(config_path, environ, now, name):
    """Take a client's door and settings away, with one rotation."""

    def prepare(lines, values):
        marks = client_marks(lines)
        if name not in marks:
            raise RotatorError("no client %s in %s" % (name, config_path),
                               "list-clients shows the clients", EXIT_USAGE)
        header = lines[min(marks[name] + 1, len(lines) - 1)]
        door = (header.section or b"").decode("utf-8", "surrogateescape")
        removals = {own_variable(setting, door) for setting in DOOR_SETTINGS}
        return (lambda user: without_client_door(user, name, client_marks(user))), (), removals

    settings = server_settings(environ)
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        plan = rotate(client_file(config_path, name) or config_path, environ, now,
                      change=EnvChange(settings["ENV_FILE"], environ, prepare, adds=False))
    tell_next_event(config_path, plan.event, now, settings)
    print("client %s removed: its door and its settings are gone, and knockd has reloaded"
          % name)
    return EXIT_OK


def list_clients(config_path, environ):
    """Every rotator door with its client, settings and knockd, never a secret."""
    settings = server_settings(environ)
    environ = with_env_file(environ, settings["ENV_FILE"])
    rows = [("CLIENT", "DOOR", "MODE", "PIN", "SECRET", "PERIOD", "USES", "KNOCKD")]
    now = time.time()
    for path in knockd_files(config_path):
        knockd = settings_for(path, settings)
        lines, _ = split_grace_block(parse_config(read_config(path)))
        client_of = {}
        for name, index in client_marks(lines).items():
            if index + 1 < len(lines) and lines[index + 1].kind == "section":
                client_of[lines[index + 1].section.decode("utf-8", "surrogateescape")] = name
        uses = read_uses(knockd["STATE_DIR"])
        for door in rotator_doors(lines):
            variable, secret = door_variable(environ, "SECRET", door)
            source = ("missing" if secret is None else
                      "own" if variable == own_variable("SECRET", door) else "shared")
            try:
                found = rotation_settings(environ, door)
                mode, period = found.mode, found.period
                pin = "yes" if found.pin else "no"
                # Single use: the openings of the period its door holds.
                used = (str(use_count(uses, found, door_start(now, found)))
                        if found.single_use else "-")
            except RotatorError as exc:
                mode, pin, period, used = "error: " + exc.what, "?", "?", "?"
            rows.append((client_of.get(door, "-"), door, mode, pin, source, str(period), used,
                         knockd["UNIT"]))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))
    return EXIT_OK


# ---------------------------------------------------------------- check and status

# Any valid, non-monotonic sequence: `check` puts it into every rotator door,
# which the next rotation rewrites anyway, so a door without a sequence yet
# (knockd would refuse it) is not reported as an error.
PLACEHOLDER_SEQUENCE = b"2000:tcp,4000:tcp,3000:tcp"


def with_placeholders(user_lines):
    """USER_LINES with PLACEHOLDER_SEQUENCE in every rotator door."""
    return rewrite_config(user_lines, {door: PLACEHOLDER_SEQUENCE
                                       for door in rotator_doors(user_lines)})


def weak_doors(settings):
    """(what, fix) for each legacy door below the floors that
    knockd-rotator/1 enforces (MIN_SECRET_BITS, MIN_LENGTH); SETTINGS maps
    doors to their settings."""
    found = []
    for door, door_settings in sorted(settings.items()):
        if door_settings.algorithm == "knockd-rotator/1":
            continue
        weak = []
        if secret_bits(door_settings.secret or "") < MIN_SECRET_BITS:
            weak.append("a secret of less than %d bits, which a dictionary run against one "
                        "sniffed knock may find" % MIN_SECRET_BITS)
        if door_settings.length < MIN_LENGTH:
            weak.append("%d ports, which a port scan run twice opens in 1 period out of %d"
                        % (door_settings.length, scan_odds(door_settings.length)))
        if weak:
            found.append(("%s door [%s] has %s" % (door_settings.algorithm, door,
                                                    " and ".join(weak)),
                          "move its clients to knockd-rotator/1 with a new secret "
                          "(docs/MIGRATION.md)"))
    return found


def check(config_path, environ):
    """Report what knockd 0.8 refuses and the traps it passes over in silence,
    in knockd.conf and every instance's file."""
    settings = server_settings(environ)
    paths = knockd_files(config_path)
    return max(check_file(path, environ, settings_for(path, settings), path == paths[0])
               for path in paths)


def check_file(config_path, environ, settings, whole_run):
    """check() of one file; WHOLE_RUN: also what concerns every file."""
    lines = parse_config(read_config(config_path))
    user_lines, _ = split_grace_block(lines)
    doors = rotator_doors(user_lines)
    placed = with_placeholders(user_lines)
    errors = sorted(config_errors(placed) + rotator_errors(placed) + trap_errors(placed)
                    + file_errors(placed))
    warnings = trap_warnings(placed) + ipv6_warnings(placed)
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
    with_sequence = door_sequences(user_lines)
    unrotated = [(line.number, "rotator door [%s] has no sequence yet: knockd refuses to "
                  "start until a rotation writes one" % line.section.decode("utf-8", "replace"),
                  "run knockd_rotator_server.py once")
                 for line in user_lines if line.kind == "section" and is_rotator(line.section)
                 and line.section.decode("utf-8", "surrogateescape") not in with_sequence]
    warnings += unrotated
    environ = with_env_file(environ, settings["ENV_FILE"])
    settings_of = settings_reader(environ)
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
    for number, what, fix in errors:
        print("error: " + finding(config_path, number, what, fix), file=sys.stderr)
    refusal, untried = (None, None) if errors else knockd_trial(placed, settings)
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
    others = ["warning: %s (%s)" % weak for weak in weak_doors(door_settings)]
    others += ["warning: " + warning for warning in unread_variables(
        environ, {found.algorithm for found in door_settings.values()}) if whole_run]
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
STATUS_CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
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
    report = {
        "config": config_path, "now": int(now), "checked_with": source,
        "next_rotation_in": min((door["next_rotation_in"] for door in doors), default=None),
        "grace_active": any(door["grace_active"] for door in doors),
        "grace_until": max((door["period_start"] + door["grace"] for door in doors
                            if door["grace_active"]), default=None),
        "grace_block_present": bool(old_block),
        "file_current": file_current,
        "knockd_active": knockd_runs(settings), "last_rotation": last, "doors": doors,
    }
    report["knockd_listening"], report["knockd_listening_why"] = knockd_listening(config_path)
    loaded = loaded_digest(settings["STATE_DIR"])
    report["knockd_loaded"] = None if loaded is None else loaded == file_digest(old_data)
    report["file_written"] = int(os.stat(config_path).st_mtime)
    lines = parse_config(old_data)
    report["knockd"] = settings["UNIT"]
    report["door_count"], report["doors_in_grace"] = door_load(lines)
    report["doors_per_knockd"] = settings["DOORS_PER_KNOCKD"]
    report["crowded"] = crowded_knockd(lines)
    report["one_time_sequences"] = [
        {"file": path, "unused": None if isinstance(supply, OSError) else supply.unused,
         "kept": not isinstance(supply, OSError) and supply.kept}
        for _, path, supply in one_time_supplies(lines)]
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
    if as_json:
        import json
        print(json.dumps({"state": state, "reasons": reasons, "report": report}, indent=2))
        return STATUS_CODES[state]
    if report is None:
        print("KNOCKD_ROTATOR UNKNOWN - %s" % reasons[0])
        return STATUS_CODES[state]
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


# ---------------------------------------------------------------- CLI

EPILOG = """\
commands (a unique prefix is enough: ch, st, a, r, l, b):
  (none)         rotate: bring the doors to the current period and reload knockd
  check          check knockd.conf against knockd 0.8's grammar and its silent traps
  status         the state of every rotator door, for monitoring (exit 0 OK,
                 1 WARNING, 2 CRITICAL, 3 UNKNOWN)
  add-client     enrol a client: its own door and secret (optional PIN or TOTP)
  remove-client  remove a client's door and secret
  list-clients   the rotator doors and their clients, never a secret
  burn           move a single-use door on to its next sequence (start_command)
Every command but burn also covers the further knockd's files that add-client
makes in knockd_rotator.d/ beside knockd.conf (past KNOCKD_ROTATOR_DOORS_PER_KNOCKD).

examples:
  %(prog)s                          rotate /etc/knockd.conf, reload knockd
  %(prog)s --dry-run                print the diff a rotation would apply
  %(prog)s --watch                  rotate at every boundary until SIGTERM
  %(prog)s check --config /tmp/k.conf
  %(prog)s status --json
  %(prog)s add-client alice --firewall iptables --pin

exit codes: 0 ok, 1 knockd refused the reload (previous file restored),
            2 bad command line, 3 bad KNOCKD_ROTATOR_* variable,
            4 knockd.conf unreadable or refused by knockd's grammar,
            6 lock held by another run, 7 knockd down and recovery failed
"""

COMMANDS = ("check", "status", "add-client", "remove-client", "list-clients", "burn")
# Options that take a value: the word after them is not a command.
VALUE_OPTIONS = ("--config", "--at")


# --at's latest moment: beyond any real boundary, and far enough below
# datetime's year 9999 that utc() of a moment a period later stays within it.
AT_MAX = 2 ** 37


def boundary_moment(text):
    return bounded_number(text, 0, AT_MAX, "a UNIX time")


def build_parser():
    parser = Parser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False,
                    description="Rotate the sequences of the [*_ROTATOR] doors of knockd.conf "
                                "and make knockd load them.",
                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help="knockd's configuration (default %s)" % DEFAULT_CONFIG)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the unified diff; write, reload and schedule nothing")
    mode.add_argument("--watch", action="store_true",
                      help="keep running: rotate at every boundary and grace end, until "
                           "SIGTERM (for short periods; see knockd_rotator-watch.service)")
    mode.add_argument("--schedule", action="store_true",
                      help="also leave a boundary run for an event before the timer's next "
                           "run (knockd_rotator.service's own runs; by hand, rotate without it)")
    # A boundary run: sleep until this UNIX time, then rotate (see above).
    mode.add_argument("--at", type=boundary_moment, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="say more")
    commands = parser.add_subparsers(dest="command", metavar="[COMMAND]")

    def command(name, help_text, examples):
        sub = commands.add_parser(name, allow_abbrev=False, help=help_text,
                                  description=help_text + ".", epilog="examples:\n" + examples,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: a --config given before the command word stays in force.
        sub.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                         help="knockd's configuration (default %s)" % DEFAULT_CONFIG)
        return sub

    command("check", "Check knockd.conf against knockd 0.8's grammar and its silent traps",
            "  check\n  check --config /tmp/knockd.conf\n"
            "exit codes: 0 no errors (warnings are allowed), 4 errors, 2 bad command line")
    status_parser = command(
        "status", "Show whether every rotator door holds the current sequence",
        "  status\n  status --json\n  status --show-sequences\n"
        "exit codes (monitoring convention): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    status_parser.add_argument("--show-sequences", action="store_true",
                               help="include the sequences (hidden by default)")
    add = command(
        "add-client", "Enrol a client: a door of its own with a new secret, then print "
        "its set-up",
        "  add-client alice --firewall iptables\n"
        "  add-client bob --service https --port 443 --firewall nftables --pin\n"
        "  add-client carol --firewall ufw --totp --pin  (an authenticator app's codes)\n"
        "  add-client dave --firewall iptables --totp --pin --qr-png /root/dave.png\n"
        "                          (the QR code also as an image: too tall for 24 lines)\n"
        "The door is [NAME_SERVICE_ROTATOR]; the secret goes into the environment file\n"
        "(mode 0600) and is printed once, here, for the client.")
    add.add_argument("name", metavar="NAME", type=lambda text: check_name("client", text),
                     help="the client's name: letters, digits, '-'")
    add.add_argument("--service", default="ssh", type=lambda text: check_name("service", text),
                     help="what the door guards, part of its name (default ssh)")
    add.add_argument("--port", default=22, type=port_number,
                     help="the TCP port the door opens (default 22)")
    add.add_argument("--firewall", required=True, choices=sorted(FIREWALLS),
                     help="what opens the port: iptables; nftables (a set inet filter "
                          "knockd_rotator_PORT your ruleset accepts); ufw")
    add.add_argument("--pin", action="store_true",
                     help="ask for a PIN the client must type as well (no echo)")
    add.add_argument("--totp", action="store_true",
                     help="the client knocks with an authenticator app's 6-digit codes "
                          "instead of a stored secret (30 s periods)")
    add.add_argument("--host", metavar="HOST",
                     help="this server's name for the client (default: the host name)")
    add.add_argument("--qr-png", metavar="PATH",
                     help="also write the QR code into PATH, a new PNG image of mode 0600, "
                          "once the client is enrolled (PATH must not exist)")
    add.add_argument("--no-single-use", dest="single_use", action="store_false",
                     help="let a sequence open the door again until its period ends (by "
                          "default each opening burns it: see Single-use knocks)")
    remove = command("remove-client", "Remove a client's door and settings, then reload knockd",
                     "  remove-client alice")
    remove.add_argument("name", metavar="NAME", type=lambda text: check_name("client", text),
                        help="the client's name")
    command("list-clients", "List the rotator doors and their clients (never a secret)",
            "  list-clients")
    burn = command("burn", "Move a single-use door on to its next sequence (its start_command "
                   "runs this when it opens)",
                   "  start_command = /usr/local/sbin/knockd_rotator_server.py burn "
                   "ssh_ROTATOR & <what opens the port>\n"
                   "The door needs KNOCKD_ROTATOR_SINGLE_USE=1 (or _SINGLE_USE_<NAME>=1); its\n"
                   "grace sibling burns itself as DOOR_GRACE.")
    burn.add_argument("door", metavar="DOOR", help="the [*_ROTATOR] door that opened")
    burn.add_argument("--use", metavar="START:N",
                      help="the use that opened it, which the rotation writes into the "
                           "start_command (period start, counter): only its first opening "
                           "burns; without it every opening burns one more use")
    return parser


def prepare_argv(argv):
    """ARGV with the command word expanded from a unique prefix."""
    argv = list(argv)
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in VALUE_OPTIONS:
            index += 2
            continue
        if word == "--":
            break
        if not word.startswith("-"):
            argv[index] = resolve_command(word, COMMANDS)
            break
        index += 1
    return argv


def run(argv, environ):
    args = build_parser().parse_args(prepare_argv(argv))
    if args.command and (args.dry_run or args.watch or args.schedule or args.at is not None):
        raise RotatorError("%s does not take --dry-run, --watch or --schedule" % args.command,
                           "see %s --help" % os.path.basename(sys.argv[0]), EXIT_USAGE)
    if args.command == "check":
        return check(args.config, environ)
    if args.command == "status":
        return status(args.config, environ, time.time(), args.json, args.show_sequences)
    if args.command == "add-client":
        return add_client(args.config, environ, time.time(), args)
    if args.command == "remove-client":
        return remove_client(args.config, environ, time.time(), args.name)
    if args.command == "list-clients":
        return list_clients(args.config, environ)
    if args.command == "burn":
        # The door's start_command names its own file with --config.
        now = time.time()
        use = args.use and parse_use(args.use)
        try:
            plan = rotate(args.config, environ, now, burn=args.door, burn_use=use)
        except RotatorError:
            if use:
                reopen_gate(args.config, environ, args.door, use)
            raise
        tell_next_event(args.config, plan.event, now, server_settings(environ))
        return EXIT_OK
    if args.watch:
        return watch(args.config, environ, args.verbose)
    if args.at is not None:
        derive_keys(args.config, environ, args.at)
        sleep_until(args.at)
    scheduled = args.schedule or args.at is not None
    now = time.time()
    try:
        event = rotate_all(args.config, environ, now, args.dry_run, args.verbose, scheduled)
    except RotatorError:
        if scheduled:
            schedule_retry(args.config, environ, now, args.verbose)
        raise
    if not scheduled and not args.dry_run:
        tell_next_event(args.config, event, now, server_settings(environ))
    return EXIT_OK


def main():
    try:
        return run(sys.argv[1:], os.environ)
    except RotatorError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
