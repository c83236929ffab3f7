"""The server's settings: KNOCKD_ROTATOR_* from the environment and the environment file, each
door's settings with its sequences and keys.
"""

import hashlib
import hmac

from knockd_rotator.core.errors import EXIT_ENVIRONMENT
from knockd_rotator.core.generator import (
    door_key, format_sequence, MAX_PERIOD, MIN_LENGTH, MIN_SECRET_BITS, own_variable,
    read_settings, RotatorError, scan_odds, secret_bits, secret_bytes, TOTP_DIGITS,
    TOTP_PERIOD, unread_variables, use_key, whole_number)


DEFAULT_CONFIG = "/etc/knockd.conf"
# What enforces the doors (engines/): knockd reads knockd.conf; nftables has
# the kernel match the knocks, from the doors file (engines/nftables/doors.py).
ENGINES = ("knockd", "nftables")
DEFAULT_COMMANDS = {
    "RELOAD_COMMAND": "systemctl reload knockd",
    "CHECK_COMMAND": "systemctl is-active --quiet knockd",
    # After a failed reload knockd may have exited: reload-or-restart starts it.
    "RECOVER_COMMAND": "systemctl reload-or-restart knockd",
    # A knockd that hangs after a reload (it never re-read the file) is ended
    # with this before the recover command starts it again.
    "KILL_COMMAND": "systemctl kill --signal=KILL knockd",
}
# The same for the further knockd that add-client starts (see
# engines/knockd/instances.py); %i is the instance's name.
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

# RFC 4226 asks for at least 128 bits; add-client makes 160, as RFC 4226 advises.
TOTP_MIN_KEY_BYTES = 16
TOTP_NEW_KEY_BYTES = 20


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
    settings["ENGINE"] = engine_of(environ)
    return settings


def engine_of(environ):
    """KNOCKD_ROTATOR_ENGINE, from ENVIRON or the environment file, checked."""
    environ = with_env_file(environ, environ.get("KNOCKD_ROTATOR_ENV_FILE") or DEFAULT_ENV_FILE)
    engine = environ.get("KNOCKD_ROTATOR_ENGINE") or ENGINES[0]
    if engine not in ENGINES:
        raise RotatorError("KNOCKD_ROTATOR_ENGINE=%s is no engine" % engine[:40],
                           "use %s (the default) or %s" % ENGINES, EXIT_ENVIRONMENT)
    return engine


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
    """SETTINGS with .knocks_at(period start, use) -> the door's sequence,
((port, "tcp"|"udp"), ...), and .sequence_at(period start, use) -> the
same as knockd.conf's value (bytes)."""
    if settings.mode == "totp":
        key = totp_secret(settings)

        def key_at(start):
            return cached_door_key(settings, hotp(key, start // TOTP_PERIOD).encode())
    else:
        secret_key = cached_door_key(settings, secret_bytes(settings))

        def key_at(start):
            return secret_key
    settings.knocks_at = lambda start, use=0: tuple(settings.generate(
        use_key(key_at(start), use), settings.door, start, settings.length,
        settings.port_modulo))
    settings.sequence_at = lambda start, use=0: format_sequence(
        settings.knocks_at(start, use)).encode()
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


def settings_warnings(environ, door_settings, whole_run=True):
    """What `check` warns of in the doors' settings, whatever the engine:
    legacy doors below the floors (weak_doors) and, for a WHOLE_RUN, the
    KNOCKD_ROTATOR_* variables of ENVIRON that nothing reads."""
    found = ["%s (%s)" % weak for weak in weak_doors(door_settings)]
    if whole_run:
        found += unread_variables(environ, {door.algorithm for door in door_settings.values()})
    return found
