"""knockd.conf: knockd 0.8's grammar, its silent traps, and the byte-exact rewrite of the rotator
doors' sequences.
"""

import sys

from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.generator import (
    _is_monotonic, DOOR_NAME_MAX, door_name_refused, MAX_LENGTH, MAX_PORT, RotatorError,
    settings_name)
from knockd_rotator.core.plan import is_rotator


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


def one_line(what, text, fix, code):
    """Refuse TEXT (named WHAT), bound for a line of knockd.conf: a line break
    in it would start lines of its own there (a start_command of whoever set
    it, which knockd runs at the next knock), and a character that is not
    printable (a control character, a byte that is not UTF-8) has no place."""
    if not text.isprintable():
        raise RotatorError("%s holds a line break or another character that is not "
                           "printable, and would go into knockd.conf" % what, fix, code)


def client_marks(lines):
    """{client name: index of its comment line} in LINES."""
    marks = {}
    for index, line in enumerate(lines):
        if line.kind == "comment" and line.raw.startswith(CLIENT_MARK):
            name = line.raw[len(CLIENT_MARK):].split(b":", 1)[0]
            marks[name.decode("utf-8", "replace")] = index
    return marks


# Any valid, non-monotonic sequence: `check` puts it into every rotator door,
# which the next rotation rewrites anyway, so a door without a sequence yet
# (knockd would refuse it) is not reported as an error.
PLACEHOLDER_SEQUENCE = b"2000:tcp,4000:tcp,3000:tcp"


def with_placeholders(user_lines):
    """USER_LINES with PLACEHOLDER_SEQUENCE in every rotator door."""
    return rewrite_config(user_lines, {door: PLACEHOLDER_SEQUENCE
                                       for door in rotator_doors(user_lines)})
