"""The grace block: sibling doors at the end of knockd.conf that hold the previous sequences, and
the burns that single-use doors run.
"""

import os
import re

from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.files import utc
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.plan import GRACE_SUFFIX, is_rotator
from knockd_rotator.core.uses import BURNING
from knockd_rotator.engines.knockd.config import numbered_lines, section_body, with_lines_appended


# For GRACE seconds after a boundary the previous sequence still opens each
# rotator door: a block at the end of the file holds, for each rotator
# section, a sibling `[NAME_GRACE]` with the same directives and the previous
# sequence (knockd opens both doors).  The block is the server's own: it is
# rewritten whole or removed, and whatever the user wrote before or after it
# stays as it was.  When the user's last line had no newline, the block's
# first line says so, and removing the block takes that newline away again.

GRACE_BEGIN = b"# BEGIN knockd_rotator grace block"
GRACE_END = b"# END knockd_rotator grace block"

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


def burn_gate(folder, door):
    """The shell in front of DOOR's burn: it records the opening in FOLDER
    (STATE_DIR/BURNING) and lets only the first opening of a use through;
    the rotation names the use (0:0 here)."""
    import shlex
    record = os.path.join(folder, door + ".0.0")
    return "{ echo 2>/dev/null >>%s; mkdir %s 2>/dev/null || [ ! -d %s ]; } &&" % (
        shlex.quote(record), shlex.quote(record + ".burn"), shlex.quote(folder))
