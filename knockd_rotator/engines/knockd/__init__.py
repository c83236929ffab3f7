"""The knockd engine: knockd.conf's doors, rewritten byte-exactly and loaded into knockd.

These functions are the seam through which the rotation (rotation.py) has
the core's plan of the doors (core/plan.py) enforced, and learns that it
took.  Before a run reads its file: prepare, resume.  The plan: plan, keep,
diff.  Applying it, with the evidence that it took: loaded, heal, confirm,
fallback, apply, settle.  What `status` reports of it: status.  For the
watch and the timer, as every engine has them: LOOK_SECONDS, files,
timings, derive_keys.
"""

import os

from knockd_rotator.core.files import log, read_config, replace_file
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.settings import rotation_settings, settings_reader, with_env_file
from knockd_rotator.core.uses import BURNING
from knockd_rotator.engines.knockd.config import (
    door_sequences, finding, parse_config, refuse_errors, rotator_doors, unified_diff)
from knockd_rotator.engines.knockd.grace import split_grace_block
from knockd_rotator.engines.knockd.instances import crowded_knockd, door_load, knockd_files
from knockd_rotator.engines.knockd.one_time import (
    file_errors, keep_one_time_sequences, one_time_supplies)
from knockd_rotator.engines.knockd.processes import knockd_listening
from knockd_rotator.engines.knockd.reload import (
    file_digest, heal_knockd, knockd_runs, last_good, load_into_knockd, loaded_digest,
    remember_good)
from knockd_rotator.engines.knockd.render import plan_rotation
from knockd_rotator.engines.knockd.trial import remove_stale_trials, try_on_knockd
from knockd_rotator.engines.knockd.upkeep import restart_when_grown, resume_stopped_knockd


def prepare(settings):
    """Before a run reads its file: end what a killed run left (trial knockd)."""
    remove_stale_trials(settings["STATE_DIR"])


def resume(config_path, settings, data):
    """A knockd that is stopped hears no knock: let it go on (see
    resume_stopped_knockd), and say so."""
    resumed = resume_stopped_knockd(config_path, settings, data)
    if resumed:
        log("warning: " + resumed)


def plan(config_path, data, now, settings_of, edit=None, uses=None, burning=None):
    """plan_rotation(), refused when knockd would refuse the new file or die
    of it.  Adds .new_data (the new file), .held (the sequences the doors
    held), .notes (warnings for every run) and .findings (checker warnings,
    for a dry or verbose run)."""
    planned = plan_rotation(config_path, data, now, settings_of, edit, uses, burning)
    refuse_errors(config_path, planned.errors + file_errors(planned.new_lines))
    crowded = crowded_knockd(planned.new_lines)
    planned.new_data = b"".join(line.raw for line in planned.new_lines)
    planned.held = door_sequences(planned.user_lines)
    planned.notes = [crowded] if crowded else []
    planned.findings = [finding(config_path, number, what, fix)
                        for number, what, fix in planned.warnings]
    return planned


def keep(settings, planned):
    """Before knockd.conf, what its doors need besides it: the folder where
    burn_command's gate records openings (without it every opening starts a
    burn), and the keeper of a one_time_sequences file that knockd re-reads
    (keep_one_time_sequences).  Whether a keeper was written."""
    if any(found.single_use for found in planned.settings.values()):
        os.makedirs(os.path.join(settings["STATE_DIR"], BURNING), mode=0o700, exist_ok=True)
    return keep_one_time_sequences(planned.new_lines)


def diff(config_path, planned):
    """The unified diff a dry run prints."""
    return unified_diff(planned.old_lines, planned.new_lines, config_path)


def loaded(settings, data):
    """Whether knockd was seen to load DATA."""
    return loaded_digest(settings["STATE_DIR"]) == file_digest(data)


def heal(config_path, settings, data):
    """DATA is current: start knockd if it does not run (heal_knockd)."""
    heal_knockd(config_path, settings, data)


def confirm(config_path, settings, data):
    """DATA is current and loaded: heal, and keep it as the last good file."""
    heal_knockd(config_path, settings, data)
    remember_good(settings["STATE_DIR"], data)


def fallback(config_path, settings, now, uses, data, environ):
    """What apply puts back when knockd does not take the new file: the last
    file knockd ran with, at this moment's sequences, else DATA.  ENVIRON:
    the environment before any change, since a removed client's door that
    comes back must keep its own secret."""
    def last_good_now():
        good = last_good(settings["STATE_DIR"])
        if good is None:
            return data
        try:
            replan = plan_rotation(config_path, good, now, settings_reader(
                with_env_file(environ, settings["ENV_FILE"])), uses=uses,
                burning=os.path.join(settings["STATE_DIR"], BURNING))
        except RotatorError:
            return good
        return good if replan.errors else b"".join(l.raw for l in replan.new_lines)
    return last_good_now


def apply(config_path, planned, settings, fallback, change=None):
    """Write the new file and load it into knockd, trying a file in a new shape
    on a trial knockd first.  CHANGE (an EnvChange) is written with it, in
    the order that never leaves a door without its secret, and undone when
    the load fails.  Raises RotatorError with FALLBACK() back in force, or
    returns (a warning or None, whether knockd ran before)."""
    try_on_knockd(config_path, planned.new_lines, settings)
    was_running = knockd_runs(settings)
    # The file that makes the other one valid goes first: a door must
    # never be without its secret, even after a crash between the two.
    if change and change.adds:
        change.write()
    try:
        replace_file(config_path, planned.new_data)
        warning = load_into_knockd(config_path, planned.new_data, fallback, was_running,
                                   settings)
    except RotatorError:
        if change and change.adds:
            change.undo()
        raise
    if change and not change.adds:
        change.write()
    return warning, was_running


def settle(config_path, settings, applied):
    """After apply (APPLIED: what it returned), upkeep: a message, or None."""
    warning, was_running = applied
    # After a reload, not a start: knockd's first reload keeps the heap
    # of its filter (4.5 to 27.5 MB at 100 doors), which is no leak.
    return was_running and not warning and restart_when_grown(config_path, settings)

# knockd's doors change only at events: the watch has nothing to look at
# in between (the nftables engine looks at its table).
LOOK_SECONDS = None


def files(config_path):
    """The files a run reads besides the environment file: knockd.conf and
    every instance's (the watch follows them)."""
    return knockd_files(config_path)


def timings(config_path, environ):
    """{(period, grace, lead)} of the rotator doors of CONFIG_PATH and its
    instances' files."""
    found = set()
    for path in knockd_files(config_path):
        lines, _ = split_grace_block(parse_config(read_config(path)))
        found |= {(door.period, door.grace, door.lead) for door in
                  (rotation_settings(environ, name) for name in rotator_doors(lines))}
    return found


def derive_keys(config_path, settings_of, moment):
    """Plan every file's rotation at MOMENT, for the keys it derives (see
    scheduling.derive_keys)."""
    for path in knockd_files(config_path):
        plan_rotation(path, read_config(path), moment, settings_of)


def status(config_path, settings, data):
    """What `status` reports of the knockd reading CONFIG_PATH (which holds
    DATA): whether it runs, hears knocks and was seen to load DATA, and the
    load that DATA's doors and one_time_sequences files put on it."""
    found = {"knockd_active": knockd_runs(settings)}
    found["knockd_listening"], found["knockd_listening_why"] = knockd_listening(config_path)
    loaded = loaded_digest(settings["STATE_DIR"])
    found["knockd_loaded"] = None if loaded is None else loaded == file_digest(data)
    found["file_written"] = int(os.stat(config_path).st_mtime)
    lines = parse_config(data)
    found["knockd"] = settings["UNIT"]
    found["door_count"], found["doors_in_grace"] = door_load(lines)
    found["doors_per_knockd"] = settings["DOORS_PER_KNOCKD"]
    found["crowded"] = crowded_knockd(lines)
    found["one_time_sequences"] = [
        {"file": path, "unused": None if isinstance(supply, OSError) else supply.unused,
         "kept": not isinstance(supply, OSError) and supply.kept}
        for _, path, supply in one_time_supplies(lines)]
    return found
