"""add-client, remove-client, list-clients: a door and its secret, PIN or TOTP secret, changed
with the environment file.
"""

import os
import sys
import time

from knockd_rotator.clients.firewalls import (
    CLIENT_CMD_TIMEOUT, CLIENT_SEQ_TIMEOUT, firewall_commands)
from knockd_rotator.clients.qr import check_qr_png, otpauth_uri, qr_code, write_qr_png
from knockd_rotator.core.errors import EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE
from knockd_rotator.core.files import (
    private_fix, read_config, readable_by_others, replace_file, take_lock)
from knockd_rotator.core.generator import (
    DOOR_SETTINGS, door_variable, own_variable, read_settings, ROTATOR_SUFFIX, RotatorError)
from knockd_rotator.core.plan import door_start, use_count
from knockd_rotator.core.settings import (
    env_assignment, env_values, read_env_file, rotation_settings, server_settings,
    TOTP_NEW_KEY_BYTES, with_env_file)
from knockd_rotator.core.uses import read_uses
from knockd_rotator.engines.knockd.burns import burn_command
from knockd_rotator.engines.knockd.config import (
    CLIENT_MARK, client_marks, numbered_lines, parse_config, rotator_doors, section_body,
    with_lines_appended)
from knockd_rotator.engines.knockd.grace import split_grace_block
from knockd_rotator.engines.knockd.instances import (
    client_file, CLIENTS_LOCK, knockd_files, place_client, settings_for)
from knockd_rotator.engines.knockd.reload import knockd_runs
from knockd_rotator.rotation import rotate
from knockd_rotator.scheduling import tell_next_event


NAME_MAX = 32            # characters of a client or service name


def check_name(kind, text):
    """TEXT, when it is a valid client or service name."""
    if (0 < len(text) <= NAME_MAX and text.isascii() and text[0].isalnum()
            and all(c.isalnum() or c == "-" for c in text)):
        return text
    raise RotatorError("invalid %s name %r" % (kind, text[:40]),
                       "use 1 to %d letters, digits and '-', starting with a letter or digit"
                       % NAME_MAX, EXIT_USAGE)


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


def check_enrolment(args, environ):
    """What add-client refuses whatever the engine, before it asks for anything."""
    if args.totp and not args.pin:
        raise RotatorError("a totp door needs a PIN: without one, its keys are the same "
                           "10^6 in every period, and one address that sprays them opens it",
                           "add --pin", EXIT_USAGE)
    if args.qr_png is not None:
        check_qr_png(args.qr_png, environ)


def add_client(config_path, environ, now, args):
    """Enrol a client: a door of its own, a new secret, one rotation; then
    print what the client needs."""
    name = args.name
    door = "%s_%s%s" % (name, args.service, ROTATOR_SUFFIX)
    check_enrolment(args, environ)
    if args.firewall is None:
        raise RotatorError("add-client needs --firewall under the knockd engine: what opens "
                           "the port when knockd hears the knock",
                           "add --firewall iptables, nftables or ufw", EXIT_USAGE)
    commands = firewall_commands(args.firewall, args.port, environ)
    secret, assignments = new_secrets(args, door)
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
    print_enrolment(args, door, target, secret, change.environ, environ)
    return EXIT_OK


def new_secrets(args, door):
    """(secret, [(variable, value)]) of a new client's DOOR: a new secret, or
    TOTP key, and the PIN the admin types, for the environment file."""
    import secrets
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
    return secret, assignments


def print_enrolment(args, door, target, secret, door_environ, environ):
    """What the client enrolled into DOOR of TARGET needs, printed once:
    its settings (from DOOR_ENVIRON), as text and QR code, and how to knock."""
    import socket
    name = args.name
    host = args.host or socket.gethostname()
    service = door[:-len(ROTATOR_SUFFIX)]
    client_lines = "".join("%s=%s\n" % pair
                           for pair in client_environment(door_environ, door).items())
    print("Client %s enrolled: door [%s] in %s opens tcp port %d (%s).\n"
          % (name, door, target, args.port, args.firewall or "the nftables engine"))
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
            rows.append((client_of.get(door, "-"),) + door_row(environ, uses, door, now)
                        + (knockd["UNIT"],))
    print_table(rows)
    return EXIT_OK


def door_row(environ, uses, door, now):
    """list-clients' (DOOR, MODE, PIN, SECRET, PERIOD, USES) of DOOR, never a secret."""
    variable, secret = door_variable(environ, "SECRET", door)
    source = ("missing" if secret is None else
              "own" if variable == own_variable("SECRET", door) else "shared")
    try:
        found = rotation_settings(environ, door)
        mode, period = found.mode, found.period
        pin = "yes" if found.pin else "no"
        # Single use: the openings of the period its door holds.
        used = str(use_count(uses, found, door_start(now, found))) if found.single_use else "-"
    except RotatorError as exc:
        mode, pin, period, used = "error: " + exc.what, "?", "?", "?"
    return door, mode, pin, source, str(period), used


def print_table(rows):
    """ROWS in columns, the last one unpadded."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))
