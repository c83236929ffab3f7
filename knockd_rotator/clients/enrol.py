"""What enrolling a client takes whatever the engine: its name, its PIN, a new
secret or TOTP key, what the client is told (text and QR code), and
list-clients' columns.  Each engine writes the client's door: knockd.py in
knockd.conf, nftables.py in the doors file.
"""

import sys

from knockd_rotator.clients.qr import check_qr_png, otpauth_uri, qr_code, write_qr_png
from knockd_rotator.core.errors import EXIT_USAGE
from knockd_rotator.core.generator import (
    door_variable, own_variable, read_settings, ROTATOR_SUFFIX, RotatorError)
from knockd_rotator.core.plan import door_start, use_count
from knockd_rotator.core.settings import rotation_settings, TOTP_NEW_KEY_BYTES


NAME_MAX = 32            # characters of a client or service name
# The lock of add-client and remove-client (in STATE_DIR): two enrolments
# never pick the same place or rewrite the environment file at once.
CLIENTS_LOCK = "clients-lock"


def check_name(kind, text):
    """TEXT, when it is a valid client or service name."""
    if (0 < len(text) <= NAME_MAX and text.isascii() and text[0].isalnum()
            and all(c.isalnum() or c == "-" for c in text)):
        return text
    raise RotatorError("invalid %s name %r" % (kind, text[:40]),
                       "use 1 to %d letters, digits and '-', starting with a letter or digit"
                       % NAME_MAX, EXIT_USAGE)


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
