"""Several knockd: knockd.conf and the files of knockd_rotator.d/, each read by a knockd of its
own, and which one gets a new client.
"""

import os
import re

from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.files import log, read_config, replace_file
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.plan import is_rotator
from knockd_rotator.core.settings import DEFAULT_COMMANDS, INSTANCE_UNIT
from knockd_rotator.engines.knockd.config import client_marks, parse_config
from knockd_rotator.engines.knockd.grace import GRACE_BEGIN, GRACE_END, split_grace_block


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

INSTANCE_FILE = re.compile(r"[1-9][0-9]{0,5}\.conf")


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
