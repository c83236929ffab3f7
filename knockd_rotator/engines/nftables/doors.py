"""The nftables engine's doors file (/etc/knockd_rotator.doors): one door a
line, what it guards and for how long a knock opens it; the sequences come
from each door's KNOCKD_ROTATOR_* settings, as with knockd.

    # door              what it guards, and how (defaults: open=30 seq_timeout=15 family=inet)
    ssh_ROTATOR         guard=22
    alice_ssh_ROTATOR   guard=22 client=alice

add-client appends a line with client=NAME; remove-client takes it out,
keeping every other byte of the file.
"""

from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.generator import door_name_refused, ROTATOR_SUFFIX, RotatorError

DEFAULT_DOORS = "/etc/knockd_rotator.doors"
DEFAULTS = {"open": 30, "seq_timeout": 15, "family": "inet"}
KEYS = ("guard", "open", "seq_timeout", "family", "client")
FAMILIES = ("inet", "ip", "ip6")
MAX_GUARDED = 4          # ports a door guards (the ruleset's port groups)
MAX_SECONDS = 86400


class DoorLine:
    """A door of the doors file: NAME, GUARD (TCP ports), OPEN and
    SEQ_TIMEOUT (seconds), FAMILY, CLIENT (or None), LINE (its number)."""

    def __init__(self, name, guard, open_seconds, seq_timeout, family, client, line):
        self.name, self.guard, self.open_seconds = name, guard, open_seconds
        self.seq_timeout, self.family, self.client, self.line = seq_timeout, family, client, line


def _seconds(text, what):
    if not (text.isascii() and text.isdigit() and len(text) <= 6
            and 1 <= int(text) <= MAX_SECONDS):
        raise ValueError("%s must be a whole number of seconds from 1 to %d"
                         % (what, MAX_SECONDS))
    return int(text)


def _ports(text):
    ports = []
    for item in text.split(","):
        if not (item.isascii() and item.isdigit() and len(item) <= 5
                and 1 <= int(item) <= 65535):
            raise ValueError("guard takes TCP ports from 1 to 65535, separated by ','")
        ports.append(int(item))
    if len(ports) > MAX_GUARDED or len(set(ports)) != len(ports):
        raise ValueError("guard takes 1 to %d different ports" % MAX_GUARDED)
    return tuple(ports)


def _door(words, number):
    name = words[0]
    if not name.endswith(ROTATOR_SUFFIX) or door_name_refused(name):
        raise ValueError("a door's name ends with %s and has no control character, "
                         "'[' or ']'" % ROTATOR_SUFFIX)
    fields, given = dict(DEFAULTS), set()
    for word in words[1:]:
        key, equals, value = word.partition("=")
        if not equals or key not in KEYS or key in given:
            raise ValueError("%r is not KEY=VALUE with KEY one of %s, each once"
                             % (word[:40], ", ".join(KEYS)))
        given.add(key)
        fields[key] = value
    if "guard" not in fields:
        raise ValueError("door %s guards nothing: add guard=PORT" % name)
    if fields["family"] not in FAMILIES:
        raise ValueError("family is one of %s" % ", ".join(FAMILIES))
    return DoorLine(name, _ports(fields["guard"]), _seconds(str(fields["open"]), "open"),
                    _seconds(str(fields["seq_timeout"]), "seq_timeout"), fields["family"],
                    fields.get("client"), number)


def parse_doors(data, path):
    """The DoorLines of the doors file's DATA (bytes, read from PATH).
    Raises RotatorError (exit 4) at the first line it cannot read."""
    doors, seen = [], {}
    for number, raw in enumerate(data.splitlines(), 1):
        words = raw.decode("utf-8", "surrogateescape").split("#", 1)[0].split()
        if not words:
            continue
        try:
            door = _door(words, number)
            if door.name in seen:
                raise ValueError("door %s is on line %d already" % (door.name, seen[door.name]))
        except ValueError as exc:
            raise RotatorError("%s:%d: %s" % (path, number, exc),
                               "see the example at the top of the doors file, or "
                               "docs/NFTABLES.md", EXIT_CONFIG) from None
        seen[door.name] = number
        doors.append(door)
    return doors


def door_line(name, guard, client):
    """The line add-client appends for CLIENT's door NAME guarding port GUARD."""
    return "%s guard=%d client=%s\n" % (name, guard, client)


def with_line(data, line):
    """DATA with LINE appended (after a final newline of its own)."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data + line.encode()


def without_line(data, number):
    """DATA without its line NUMBER (1-based), every other byte kept."""
    lines = data.splitlines(True)
    return b"".join(lines[:number - 1] + lines[number:])
