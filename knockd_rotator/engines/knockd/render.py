"""The core's plan rendered as knockd.conf: the new file for one moment, with its errors."""

from knockd_rotator.core.plan import grace_until, grace_uses, plan_doors
from knockd_rotator.engines.knockd import config
from knockd_rotator.engines.knockd.config import (
    config_errors, parse_config, rotator_doors, rotator_errors, trap_errors, trap_warnings)
from knockd_rotator.engines.knockd.grace import (
    split_grace_block, with_burns_named, with_grace_block)


def plan_rotation(config_path, old_data, now, settings_of, edit=None, uses=None, burning=None):
    """The rotation of CONFIG_PATH's OLD_DATA for the moment NOW (pure: no I/O):
    the core's plan_doors, written as knockd.conf.

    SETTINGS_OF(door) gives a door's settings: .period, .grace and
    .sequence_at(period start, use).  EDIT, if given, changes the user's Lines
    first (add-client, remove-client).  USES (see use_count) gives a single-use
    door's use counter of a period; BURNING (its STATE_DIR/BURNING) gates the
    burns that add-client wrote ungated (with_burns_named).  The result's
    errors (line, what, fix) are those of the new file: knockd's grammar, the
    rotator's rules and the silent traps; a rotation refuses any of them.
    """
    old_lines = parse_config(old_data)
    user_lines, old_block = split_grace_block(old_lines)
    if edit:
        user_lines = edit(user_lines)
    plan = plan_doors(rotator_doors(user_lines), now, settings_of, uses)
    new_lines = with_burns_named(config.rewrite_config(user_lines, plan.current), {
        door: (plan.starts[door], plan.counters[door]) for door in plan.doors
        if plan.settings[door].single_use}, burning)
    errors = config_errors(new_lines) + rotator_errors(new_lines) + trap_errors(new_lines)
    warnings = trap_warnings(new_lines)
    if plan.graced and not errors:
        previous_uses = grace_uses(plan, uses)
        previous = {door: plan.settings[door].sequence_at(*use)
                    for door, use in previous_uses.items()}
        new_lines = with_grace_block(new_lines, previous, grace_until(plan), {
            door: use for door, use in previous_uses.items() if plan.settings[door].single_use})
        errors = config_errors(new_lines)
    plan.__dict__.update(old_lines=old_lines, user_lines=user_lines, old_block=old_block,
                         new_lines=new_lines, errors=errors, warnings=warnings)
    return plan
