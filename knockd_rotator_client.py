#!/usr/bin/env python3
"""knockd-rotator client: compute the current knock sequence and knock.

The server and every client derive the same sequence from a shared secret, the
door's name and the UNIX time floored to a period, so the sequence rotates with
no communication between them.  docs/SPEC.md specifies the algorithm.

Usage:
    export KNOCKD_ROTATOR_SECRET=...        # the secret the server uses
    knockd_rotator_client.py generate ssh   # print the sequence, knockd.conf form
    knockd_rotator_client.py knock myserver.example ssh --check 22

Environment (each may be given for one door, as KNOCKD_ROTATOR_<SETTING>_<NAME>
with NAME the door name upper-cased, e.g. KNOCKD_ROTATOR_SECRET_ALICE_SSH for
[alice_ssh_ROTATOR]; the door's own variable wins):
    KNOCKD_ROTATOR_SECRET         required, 128 random bits (22 base64 characters)
    KNOCKD_ROTATOR_PIN            the door's PIN, if it has one (or --pin asks)
    KNOCKD_ROTATOR_MODE           secret (default), or totp: the key of each
                                  30 s period is an authenticator app's code
                                  (--code) instead of the secret
    KNOCKD_ROTATOR_LENGTH         ports per sequence, 10-32 (default 10)
    KNOCKD_ROTATOR_PORT_MODULO    0: every knock is TCP; M > 0: TCP when
                                  port % M == 0, otherwise UDP (default 0)
    KNOCKD_ROTATOR_PERIOD_MODULO  rotation period in seconds (default 21600)
    KNOCKD_ROTATOR_ALGORITHM      knockd-rotator/1 (default), or legacy-v1 /
                                  legacy-v3 for servers of Knock Rotator 1.0.1
                                  and 2.0.0 / 3.0.0 (which also read SALT,
                                  PORTS and PROTO_MODULO as it did)
    KNOCKD_ROTATOR_GRACE          seconds after a boundary during which the
                                  server still takes the previous sequence
                                  (default 30, at most half the period)

Safety:
    The secret and the PIN are read from the environment or typed without
    echo: never from the command line, never printed.  A TCP knock is exactly
    one SYN (a non-blocking connect that is closed at once), so the kernel
    never retransmits it: knockd would take a repeated port as a wrong knock
    and reset the attempt.

This file is self-contained (Python 3.8+ standard library only) so that it can
be copied alone onto a laptop or a phone.
"""

import gettext
# argparse asks gettext to translate each message it builds, and each lookup
# searches the disk for catalogues and loads the locale module: 1.3 ms of a
# 27 ms start.  Python ships no catalogue for argparse; these are bound by
# argparse when it is imported, so they come first.
gettext.gettext = lambda message: message
gettext.ngettext = lambda singular, plural, count: singular if count == 1 else plural
import argparse  # noqa: E402
import hashlib
import hmac
import os
import sys
import time

VERSION = "0.1.0"

# Exit codes, listed in docs/OPERATIONS.md (Exit codes) and docs/SPEC.md.
EXIT_OK = 0
EXIT_FAILED = 1       # the job ran but did not succeed (the door did not open)
EXIT_USAGE = 2        # bad command line
EXIT_ENVIRONMENT = 3  # a KNOCKD_ROTATOR_* variable is missing or invalid
EXIT_NETWORK = 5      # the host cannot be resolved or a knock cannot be sent

# --check: a new connect attempt starts every CHECK_INTERVAL while the
# earlier ones are still pending, each given up after CHECK_CONNECT_TIMEOUT.
# knockd reads packets in 50 ms batches, so the firewall opens some tens of
# milliseconds after the last knock; an attempt made before that has its SYN
# dropped and would wait out the kernel's 1 s retransmission, but the next
# attempt, 15 ms later, gets through.
CHECK_INTERVAL = 0.015
CHECK_CONNECT_TIMEOUT = 1.0
CHECK_MAX_PENDING = 64

# When the port stays shut: a retry about RETRY_AFTER seconds after a knock,
# at most RETRIES of them (each re-planned from the clock at that moment).
RETRY_AFTER = 1.0
RETRIES = 12

# Single-use doors: how many counters past the remembered one --check tries
# (another device, or a lost state file, may have used some).
LOOK_AHEAD = 10


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
                   "USES_FILE", "LEAD", "ENGINE")


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


# ---------------------------------------------------------------- knocking
#
# Knocking imports _socket, the C module under socket: importing socket.py
# (its enums, selectors) would cost about 3 ms, a tenth of the client's
# start-up, for nothing the C module lacks.

def address_literal(host):
    """HOST as bytes when it is an IPv4 or IPv6 address, else HOST itself:
    getaddrinfo sends a str through the idna codec, whose import costs about
    1 ms, and an address needs no encoding."""
    import _socket as socket
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return host.encode("ascii")
        except (OSError, ValueError):
            pass
    return host


def resolve_host(host, family):
    """One address for HOST: (family, sockaddr with port 0)."""
    import _socket as socket
    try:
        infos = socket.getaddrinfo(address_literal(host), 0, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RotatorError("cannot resolve host %r: %s" % (host, getattr(exc, "strerror", exc)),
                           "check the name, or give an IPv4 or IPv6 address",
                           EXIT_NETWORK) from None
    return infos[0][0], infos[0][4]


def with_port(sockaddr, port):
    return (sockaddr[0], port) + tuple(sockaddr[2:])


def send_knocks(family, sockaddr, sequence, delay):
    """One SYN per TCP knock, one datagram per UDP knock, in order."""
    import errno
    import _socket as socket
    # A refused or pending connect is the normal fate of a knock.
    harmless = {0, errno.EINPROGRESS, errno.EAGAIN, errno.ECONNREFUSED}
    for index, (port, protocol) in enumerate(sequence):
        if index and delay:
            time.sleep(delay)
        address = with_port(sockaddr, port)
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        try:
            if protocol == "tcp":
                # Non-blocking, then closed at once: the kernel sends one
                # SYN and never a retransmission.
                sock.setblocking(False)
                error = sock.connect_ex(address)
            else:
                sock.sendto(b"\0", address)
                error = 0
        except OSError as exc:
            error = exc.errno
        finally:
            sock.close()
        if error not in harmless:
            raise RotatorError("cannot knock on %s port %d/%s: %s"
                               % (sockaddr[0], port, protocol, os.strerror(error)),
                               "check the route to the host and the local firewall",
                               EXIT_NETWORK)


def wait_for_port(family, sockaddr, port, timeout):
    """Seconds until PORT accepts a TCP connection, or None after TIMEOUT.
    Attempts overlap (see CHECK_INTERVAL): the first that connects wins."""
    import select
    import _socket as socket
    started = time.monotonic()
    deadline = started + timeout
    pending = {}                  # socket -> when it gives up
    next_attempt = started
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_attempt and len(pending) < CHECK_MAX_PENDING:
                attempt = socket.socket(family, socket.SOCK_STREAM)
                attempt.setblocking(False)
                attempt.connect_ex(with_port(sockaddr, port))
                pending[attempt] = now + CHECK_CONNECT_TIMEOUT
                next_attempt = now + CHECK_INTERVAL
            for attempt in [a for a, give_up in pending.items() if give_up <= now]:
                attempt.close()
                del pending[attempt]
            wait = max(0.0, min(next_attempt, deadline) - time.monotonic())
            done = select.select([], list(pending), [], wait)[1]
            for attempt in done:
                if attempt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return time.monotonic() - started
                attempt.close()            # refused or unreachable: the next one may do
                del pending[attempt]
    finally:
        for attempt in pending:
            attempt.close()


def retry_plan(now, period, grace, use, single_use):
    """What to knock with when the port stayed shut, at NOW by the client's
    clock: [(period offset, use)], in order, bounded.

    Within GRACE seconds after a boundary, first the previous period's
    sequence: the server's clock may be behind, or the code typed may be the
    previous period's.  Then the current sequence again: knockd drops the
    knocks in progress when it reloads, and misses about one knock in 800 in
    part.  A single-use door then tries use 0 (the server lost its state,
    or was set up anew), walks its use counter forward (another device may
    have used it), and below the remembered one.  Never the next period's:
    it stays valid for a whole period, and one spoiled knock just before a
    boundary would make the client reveal it to whoever spoiled it."""
    plan = [(0, use)]
    if now - period_start(now, period) < grace:
        plan.insert(0, (-1, 0))
    if single_use:
        plan += [(0, 0)] * (use > 0)
        plan += [(0, use + ahead) for ahead in range(1, LOOK_AHEAD + 1)
                 if use + ahead <= MAX_USE]
        # Only the first RETRIES can be tried: a huge counter must not make a huge list.
        plan += [(0, below) for below in range(1, min(use, RETRIES + 1))]
    return plan[:RETRIES]


# ---------------------------------------------------------------- single use
#
# A single-use door takes each sequence once (docs/SPEC.md, single use).  The
# client remembers, per door, the next use counter of the current period in a
# file of its own (0600): not a secret, but nobody else's business.

def uses_file(environ):
    explicit = environ.get("KNOCKD_ROTATOR_USES_FILE")
    if explicit:
        return explicit
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                         ".local", "state")
    return os.path.join(base, "knockd_rotator", "uses.json")


def remembered_use(path, door, start):
    """The use counter to knock DOOR's period from START with: what PATH
    remembers, or 0.  A damaged file is worth no error (docs/SPEC.md): the
    counters are not secret, and the look-ahead finds the server's."""
    import json
    try:
        with open(path, "rb") as handle:
            entry = json.loads(handle.read()).get(door, {})
        remembered = entry["next"] if entry.get("start") == start else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return 0
    whole = isinstance(remembered, int) and not isinstance(remembered, bool)
    return remembered if whole and 0 <= remembered <= MAX_USE else 0


def remember_use(path, door, start, next_use):
    """Write the next use of DOOR atomically; a failure only costs a look-ahead."""
    import json
    try:
        with open(path) as handle:
            uses = json.load(handle)
        if not isinstance(uses, dict):
            uses = {}
    except (OSError, ValueError, RecursionError):
        uses = {}
    uses[door] = {"start": start, "next": next_use}
    folder = os.path.dirname(path) or "."
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(uses, handle, sort_keys=True)
        os.replace(temporary, path)
    except OSError as exc:
        print("warning: cannot remember the use counter in %s: %s" % (path, exc.strerror),
              file=sys.stderr)


# ---------------------------------------------------------------- CLI

def offset_number(text):
    number = parse_number(text)
    if number is None:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text[:40])
    return number


def positive_seconds(text):
    """Decimal seconds as docs/SPEC.md writes them: digits, then `.` and digits
    if need be; nothing float() takes besides (`1e3`, `inf`, `+5`, ` 5`)."""
    whole, point, fraction = text.partition(".")
    value = 0.0
    if parse_number(whole) is not None and whole[:1] != "-" and (
            not point or (parse_number(fraction) is not None and fraction[:1] != "-")):
        value = float(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("%r is not a number of seconds from 0 to 86400"
                                         % text[:40])
    return value


def use_number(text):
    return bounded_number(text, 0, MAX_USE, "a use counter")


def delay_ms(text):
    return bounded_number(text, 0, 60000, "milliseconds")


COMMANDS = ("generate", "knock")

EPILOG = """\
examples:
  export KNOCKD_ROTATOR_SECRET=...   (the server's secret; never on a command line)
  %(prog)s generate ssh                  12345:tcp,23456:tcp,...
  %(prog)s gen ssh --offset -1           the previous period's sequence
  knock myserver $(%(prog)s gen ssh --format knock)
  %(prog)s knock myserver ssh --check 22
  %(prog)s knock myserver alice_ssh --pin --check 22     asks for the PIN
  %(prog)s knock myserver alice_ssh --code 123456 --check 22
                                         totp mode: the authenticator app's code

Every setting can be given for one door: KNOCKD_ROTATOR_SECRET_ALICE_SSH is the
secret of [alice_ssh_ROTATOR] (and _PIN_, _MODE_, _LENGTH_, ... likewise).
Commands may be shortened to a unique prefix (gen, kn).
exit codes: 0 ok, 1 door did not open, 2 bad command line,
            3 bad KNOCKD_ROTATOR_* variable, 5 host unresolvable or unreachable
"""


def terminal_columns():
    """shutil.get_terminal_size().columns, without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def build_parser():
    # argparse makes a formatter at every add_argument, to check the metavar,
    # and without a width each one imports shutil, with bz2 and lzma: about
    # 2 ms of every run.  The width is argparse's own default.
    width = terminal_columns() - 2

    def formatter(prog):
        return argparse.RawDescriptionHelpFormatter(prog, width=width)

    parser = Parser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False,
                    description="Compute the current knockd-rotator sequence and knock.",
                    epilog=EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    # A prog of its own spares add_subparsers a help formatter, whose import
    # of shutil (and with it bz2 and lzma) would cost every run a few ms.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", prog=parser.prog)
    commands.required = True

    def door_arguments(sub):
        sub.add_argument("service", metavar="SERVICE",
                         help="door name; _ROTATOR is appended when missing")
        sub.add_argument("--offset", type=offset_number, default=0, metavar="N",
                         help="periods to move: -1 is the previous sequence (default 0)")
        sub.add_argument("--pin", action="store_true",
                         help="ask for the door's PIN (typed without echo; one line of "
                              "standard input when it is not a terminal)")
        sub.add_argument("--code", metavar="CODE",
                         help="totp mode: the 6-digit code of the authenticator app, "
                              "or - to type it")
        sub.add_argument("--use", type=use_number, metavar="N",
                         help="single-use doors: the use counter to knock with (default: "
                              "the one this client remembers, see KNOCKD_ROTATOR_USES_FILE)")

    generate = commands.add_parser(
        "generate", allow_abbrev=False, help="print the current sequence",
        description="Print the current sequence of a door.",
        epilog="examples:\n  generate ssh\n  generate ssh --format knock\n"
               "  generate ssh --format json --offset -1\n\n"
               "knockd's C client takes the ports as separate arguments:\n"
               "  knock HOST $(knockd_rotator_client.py generate ssh --format knock)\n"
               "Knock Rotator's `knock HOST $(... generate ssh)` now sends ONE knock:\n"
               "the default form is knockd.conf's, a single comma-separated word.",
        formatter_class=formatter)
    door_arguments(generate)
    generate.add_argument("--format", choices=("knockd", "knock", "json"), default="knockd",
                          help="knockd: knockd.conf form (default); knock: arguments "
                               "for knockd's C knock client; json: with the period")

    knock = commands.add_parser(
        "knock", allow_abbrev=False, help="send the current sequence to a host",
        description="Send the current sequence of a door to HOST, in order.",
        epilog="examples:\n  knock myserver ssh\n  knock myserver ssh --check 22\n"
               "  knock 2001:db8::1 ssh -6 --delay 50",
        formatter_class=formatter)
    knock.add_argument("host", metavar="HOST", help="name or IPv4/IPv6 address")
    door_arguments(knock)
    knock.add_argument("--delay", type=delay_ms, default=0, metavar="MS",
                       help="milliseconds between knocks (default 0)")
    family = knock.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=4, help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=6, help="IPv6 only")
    knock.add_argument("--check", type=port_number, metavar="PORT",
                       help="then wait until PORT accepts a TCP connection, and knock again "
                            "(about once a second) while it does not")
    knock.add_argument("--check-timeout", type=positive_seconds, default=10.0, metavar="S",
                       help="how long --check waits (default 10)")
    return parser


# Options whose value may be negative.  `knock` has the options -4 and -6, so
# argparse takes any `-1` there for an option: such values are glued to their
# option (`--offset=-1`) before parsing.
NUMERIC_OPTIONS = ("--offset", "--check-timeout", "--delay", "--use")


def prepare_argv(argv):
    """ARGV with the command word expanded from a prefix and negative values glued."""
    argv = list(argv)
    for index, word in enumerate(argv):
        if not word.startswith("-"):
            argv[index] = resolve_command(word, COMMANDS)
            break
    prepared = []
    for word in argv:
        if prepared and prepared[-1] in NUMERIC_OPTIONS:
            prepared[-1] += "=" + word
        else:
            prepared.append(word)
    return prepared


def read_hidden(prompt):
    """A line typed without echo on the terminal, or read from a piped stdin."""
    if sys.stdin.isatty():
        import getpass
        return without_line_end(getpass.getpass(prompt))    # its LF is gone, not a CR
    return without_line_end(sys.stdin.readline())


def without_line_end(line):
    """LINE without one trailing LF, then one trailing CR (docs/SPEC.md): what
    precedes them is typed, a PIN may end in a CR of its own."""
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line


def totp_code(text):
    """The authenticator app's code: TOTP_DIGITS digits, spaces allowed."""
    code = text.replace(" ", "")
    if not (len(code) == TOTP_DIGITS and code.isascii() and code.isdigit()):
        raise RotatorError("the code must be the %d digits your authenticator app shows"
                           % TOTP_DIGITS, "type it again, e.g. --code 123456", EXIT_USAGE)
    return code.encode()


def door_settings(args, environ):
    """The door's settings, with the PIN prompted for and the code checked."""
    door = door_name(args.service)
    if not args.service or door_name_refused(door):
        raise RotatorError("%r is no knockd door name" % door[:40],
                           "give the service as in knockd.conf's [SERVICE_ROTATOR]: at most "
                           "%d bytes, no brackets, no control characters or line separators"
                           % DOOR_NAME_MAX, EXIT_USAGE)
    coded = args.code is not None
    settings = read_settings(environ, door, "totp" if coded else "secret")
    if coded and settings.mode != "totp":
        raise RotatorError("--code is for doors in totp mode, and %s is %r"
                           % (door_variable(environ, "MODE", door)[0], settings.mode),
                           "leave out --code, or set it to totp", EXIT_USAGE)
    if settings.mode == "totp" and not coded:
        raise RotatorError("door %s is in totp mode" % door,
                           "give the code of your authenticator app: --code 123456, "
                           "or --code - to type it", EXIT_USAGE)
    if args.pin and settings.algorithm != "knockd-rotator/1":
        raise RotatorError("door %s: %s has no PIN" % (door, settings.algorithm),
                           "leave out --pin, or use knockd-rotator/1 for this door", EXIT_USAGE)
    if args.pin:
        settings.pin = read_hidden("PIN for %s: " % door).encode("utf-8", "surrogateescape")
        if not settings.pin:
            raise RotatorError("the PIN is empty", "type the PIN of the door", EXIT_USAGE)
    if settings.mode == "totp":
        code = totp_code(args.code if args.code != "-" else read_hidden("code for %s: " % door))
        if args.code != "-":
            print("warning: a code on the command line is visible to every local user (ps) "
                  "for its 30 s; --code - asks for it", file=sys.stderr)
        settings.key = door_key(settings, code)
    else:
        settings.key = door_key(settings, secret_bytes(settings))
    return settings


def run(argv, environ, now):
    args = build_parser().parse_args(prepare_argv(argv))
    settings = door_settings(args, environ)
    door, period = settings.door, settings.period
    for warning in unread_variables(environ, {settings.algorithm}):
        print("warning: " + warning, file=sys.stderr)

    def sequence_at(start, use=0):
        return settings.generate(use_key(settings.key, use), door, start, settings.length,
                                 settings.port_modulo)

    start = period_start(now, period, args.offset)
    if args.use is not None and not settings.single_use:
        raise RotatorError("--use is for single-use doors, and %s is not one" % door,
                           "leave out --use, or set %s=1 as the server has it"
                           % own_variable("SINGLE_USE", door), EXIT_USAGE)
    uses_path = uses_file(environ)
    use = args.use if args.use is not None else (
        remembered_use(uses_path, door, start) if settings.single_use else 0)
    sequence = sequence_at(start, use)

    if args.command == "generate":
        if args.format == "json":
            import json
            print(json.dumps({"door": door, "sequence": format_sequence(sequence),
                              "ports": [{"port": p, "protocol": proto} for p, proto in sequence],
                              "period_start": start, "period_end": start + period}))
        else:
            print(format_sequence(sequence, "," if args.format == "knockd" else " "))
        return EXIT_OK

    import _socket as socket
    family = {None: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}[args.family]
    family, sockaddr = resolve_host(args.host, family)
    send_knocks(family, sockaddr, sequence, args.delay / 1000.0)
    if args.check is None:
        if settings.single_use:
            remember_use(uses_path, door, start, use + 1)
        return EXIT_OK
    deadline = time.monotonic() + args.check_timeout
    took = wait_for_port(family, sockaddr, args.check, min(RETRY_AFTER, args.check_timeout))
    if took is None:
        plan = retry_plan(time.time(), period, settings.grace, use, settings.single_use)
        for offset, candidate in plan:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # The period as it is now, not as it was when the client started.
            retry_start = period_start(time.time(), period, args.offset + offset)
            if offset:
                why = "with the previous period's sequence (just after a period boundary)"
            elif candidate == use:
                why = "with the same sequence (knockd drops a knock in progress when it reloads)"
            elif candidate == 0:
                why = "with use 0 (the server may have started its counters anew)"
            else:
                why = "with use %d (another device may have used the door)" % candidate
            print("port %d on %s did not open; knocking again %s"
                  % (args.check, args.host, why), file=sys.stderr)
            send_knocks(family, sockaddr, sequence_at(retry_start, candidate),
                        args.delay / 1000.0)
            took = wait_for_port(family, sockaddr, args.check, min(RETRY_AFTER, remaining))
            if took is not None:
                start, use = retry_start, candidate
                break
        else:
            took = wait_for_port(family, sockaddr, args.check,
                                 max(0.0, deadline - time.monotonic()))
    if took is not None and settings.single_use:
        remember_use(uses_path, door, start, use + 1)
    if took is None:
        raise RotatorError("port %d on %s did not open within %g s"
                           % (args.check, args.host, args.check_timeout),
                           "compare the clock, the secret, the PIN and the KNOCKD_ROTATOR_* "
                           "settings with the server's", EXIT_FAILED)
    print("port %d on %s open after %.2f s" % (args.check, args.host, took))
    return EXIT_OK


def main():
    try:
        return run(sys.argv[1:], os.environ, time.time())
    except RotatorError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
