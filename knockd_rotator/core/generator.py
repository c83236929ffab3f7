"""The sequence generator and the door settings: the shared block, byte-identical in
knockd_rotator_client.py (docs/SPEC.md).
"""

import argparse
import hashlib
import hmac

from knockd_rotator.core.errors import EXIT_ENVIRONMENT, EXIT_USAGE


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
