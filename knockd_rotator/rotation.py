"""The rotation: bring each file to the core's plan of the moment (core/plan.py)
and have the engine (engines/knockd/) enforce it, then check that it took.
Under the nftables engine, rotate_all has engines/nftables/load.py load the
table instead."""

import contextlib
import os
import sys
import time

from knockd_rotator import scheduling
from knockd_rotator.core.errors import EXIT_RECOVERY
from knockd_rotator.core.files import (
    log, read_config, remove_stale_temporaries, replace_file, take_lock, utc,
    warn_if_readable_by_others)
from knockd_rotator.core.generator import ROTATOR_SUFFIX, RotatorError, unread_variables
from knockd_rotator.core.plan import door_start, grace_until, GRACE_SUFFIX
from knockd_rotator.core.settings import (
    server_settings, settings_reader, weak_doors, with_env_file)
from knockd_rotator.core.uses import BURNING, read_uses, with_burn, with_openings_kept, write_uses
from knockd_rotator.engines import knockd as engine
# Several knockd: the files one run rotates (see instances.py).
from knockd_rotator.engines.knockd.instances import knockd_files, settings_for
from knockd_rotator.engines.knockd.processes import KNOCKD_CONFIGS
from knockd_rotator.engines.knockd.report import record_fingerprints
from knockd_rotator.engines.nftables import load as nftables_load
from knockd_rotator.planned import as_planned, record_planned


def rotate(config_path, environ, now, dry_run=False, verbose=False, change=None, burn=None,
           whole_run=True, burn_use=None):
    """Bring CONFIG_PATH (knockd.conf, or an instance's file) to the state of
    the moment NOW: every rotator door holds the sequence of its period
    holding NOW (of the next period from LEAD seconds before its start), and
    from then until GRACE seconds after the period's start the grace block
    holds its previous one.  Returns the Plan.  CHANGE (an EnvChange)
    also edits the doors and swaps the environment file with the config, or
    neither when anything fails.  BURN names a single-use door (or grace
    sibling) that has just opened, BURN_USE the use (period start, counter)
    it opened with: a use burnt already makes the run an ordinary one, which
    finds the file current.  WHOLE_RUN: also warn about what concerns
    every file (the environment file's mode, variables nothing reads);
    rotate_all asks it of the first file only."""
    config_path = os.path.realpath(config_path)
    settings = settings_for(config_path, server_settings(environ))
    warn_if_readable_by_others(config_path, settings["ENV_FILE"] if whole_run else None)
    original_environ = environ
    with contextlib.nullcontext() if dry_run else take_lock(settings["STATE_DIR"]):
        if not dry_run:
            remove_stale_temporaries(config_path)
            engine.prepare(settings)
        old_data = read_config(config_path)
        if not dry_run:
            engine.resume(config_path, settings, old_data)
        if change:
            change.prepare(config_path, old_data)
        environ = change.environ if change else with_env_file(environ, settings["ENV_FILE"])
        settings_of = settings_reader(environ)
        uses = read_uses(settings["STATE_DIR"])
        if burn:
            uses, burn = burnt(settings["STATE_DIR"], uses, burn, burn_use, now, settings_of)
        shortcut = not (dry_run or verbose or change or burn) and engine.loaded(settings, old_data)
        recorded = shortcut and as_planned(settings["STATE_DIR"], old_data, environ, uses, now)
        if recorded:
            engine.heal(config_path, settings, old_data)
            return recorded
        plan = engine.plan(config_path, old_data, now, settings_of,
                           change.edit if change else None, uses,
                           os.path.join(settings["STATE_DIR"], BURNING))
        struck = not dry_run and engine.keep(settings, plan)
        log_warnings(config_path, environ, plan, whole_run, dry_run or verbose)
        if dry_run:
            if plan.new_data != old_data:
                sys.stdout.writelines(engine.diff(config_path, plan))
            return plan
        if plan.new_data == old_data and not struck and engine.loaded(settings, plan.new_data):
            if verbose:
                log("%s is current" % config_path)
            engine.confirm(config_path, settings, plan.new_data)
            record(settings, plan, environ, uses, now)
            return plan
        if plan.new_data == old_data and not struck:
            log("knockd was not seen to load the current %s (a reload failed, a run "
                "ended before it, or no record yet): reloading it" % config_path)
        applied = engine.apply(config_path, plan, settings, engine.fallback(
            config_path, settings, now, uses, old_data, original_environ), change)
        record(settings, plan, environ, uses, now)
        settle(config_path, settings, plan, applied, now)
    return plan


def record(settings, plan, environ, uses, now):
    """After a good rotation: what status and the next run read (fingerprints, planned)."""
    record_fingerprints(settings["STATE_DIR"], plan)
    record_planned(settings["STATE_DIR"], plan.new_data, environ, uses, now, plan)


def settle(config_path, settings, plan, applied, now):
    """After the engine applied PLAN (APPLIED: what apply returned): its
    warning, its upkeep, and what changed."""
    warning = applied[0]
    if warning:
        log("warning: " + warning)
    restarted = engine.settle(config_path, settings, applied)
    if restarted:
        log(restarted)
    replace_file(os.path.join(settings["STATE_DIR"], "last-rotation"), b"%d\n" % now,
                 create=True)
    log_rotated(plan, now)


def burnt(state_dir, uses, burn, burn_use, now, settings_of):
    """USES after the burn of BURN_USE by door BURN, and BURN, or None when
    that use is burnt already: (uses, burn)."""
    burnt = with_burn(uses, burn, now, settings_of, burn_use)
    if burnt is uses:
        log("%s: use %d:%d is burnt already, or its period is over (a replay, or a "
            "second opening of it): nothing to burn" % ((burn,) + burn_use))
        return uses, None
    base = burn[:-len(GRACE_SUFFIX)] if burn.endswith(GRACE_SUFFIX) else burn
    door = settings_of(base)
    uses = with_openings_kept(state_dir, burnt, base, burn_use,
                              door_start(now, door) - door.period)
    # Counted before anything else may fail: a used sequence never
    # comes back, even if this reload does not happen.
    write_uses(state_dir, uses)
    return uses, burn


def log_warnings(config_path, environ, plan, whole_run, findings):
    """What a rotation warns about before it writes anything; FINDINGS: also
    the checker's warnings about the new file."""
    if not plan.doors:
        log("%s has no door whose name ends with %s: nothing to rotate"
            % (config_path, ROTATOR_SUFFIX))
    for what, fix in weak_doors(plan.settings):
        log("warning: %s (%s)" % (what, fix))
    for note in plan.notes:
        log("warning: " + note)
    algorithms = {found.algorithm for found in plan.settings.values()}
    for warning in unread_variables(environ, algorithms) if whole_run else ():
        log("warning: " + warning)
    for warning in plan.findings if findings else ():
        log("warning: " + warning)


def log_rotated(plan, now):
    """What a rotation that loaded a new file changed, door by door, and the grace."""
    for door in plan.doors:
        if plan.held.get(door) != plan.current[door]:
            log("%s: rotated to the period from %s" % (door, utc(plan.starts[door])))
    if plan.graced and not plan.old_block:
        until = grace_until(plan)
        early = [door for door in plan.graced if now < plan.starts[door]]
        doors = "the doors" if plan.graced == plan.doors else ", ".join(plan.graced)
        if early:
            log("lead: %s hold the sequences of the period from %s already; the "
                "current ones open them until %s" % (
                    doors, utc(min(plan.starts[door] for door in early)), utc(until)))
        else:
            log("grace: the previous sequences open %s until %s" % (doors, utc(until)))
    elif plan.old_block and not plan.graced:
        log("grace ended: the previous sequences no longer open the doors")


# 500 doors on 2 CPUs: one file per CPU at a time, 7.3 s; four, 4.6 s.
ROTATION_THREADS = 4 * (os.cpu_count() or 1)


def rotate_all(config_path, environ, now, dry_run=False, verbose=False, schedule=False):
    """Bring the engine's doors to NOW: rotate() knockd.conf and every
    instance's file, or load the nftables engine's table for the doors file
    CONFIG_PATH.  Schedule a boundary run for the next event when SCHEDULE.
    Returns that event."""
    settings = server_settings(environ)
    if settings["ENGINE"] == "nftables":
        event = nftables_load.rotate(config_path, environ, now, dry_run, verbose).event
    else:
        event = rotate_knockd_files(config_path, environ, now, dry_run, verbose)
    if schedule:
        with take_lock(settings["STATE_DIR"]):
            scheduling.schedule_boundary_run(config_path, event, now, settings, verbose)
    return event


def rotate_knockd_files(config_path, environ, now, dry_run, verbose):
    """rotate() knockd.conf and every instance's file.  A file that fails
    does not stop the others: each failure is printed, and the gravest one
    raised.  Returns the first next event."""
    paths = knockd_files(config_path)
    KNOCKD_CONFIGS.clear()
    if dry_run or len(paths) == 1:
        plans = [rotate(path, environ, now, dry_run, verbose, whole_run=path == paths[0])
                 for path in paths]
    else:
        import concurrent.futures
        # RELOAD_SLOTS keeps the reloads to one per CPU; the threads wait.
        with concurrent.futures.ThreadPoolExecutor(ROTATION_THREADS) as pool:
            futures = [pool.submit(rotate, path, environ, now, verbose=verbose,
                                   whole_run=path == paths[0]) for path in paths]
        plans, failures = [], []
        for future in futures:
            try:
                plans.append(future.result())
            except RotatorError as exc:
                failures.append(exc)
        if failures:
            failures.sort(key=lambda exc: exc.code == EXIT_RECOVERY)
            for exc in failures[:-1]:
                print(exc, file=sys.stderr)
            raise failures[-1]
    # The lead exists so that every knockd holds the new sequences when the
    # period starts: say so when this run ended too late for that.
    prepared = min((plan.starts[door] for plan in plans for door in plan.doors
                    if plan.starts[door] > now), default=None)
    ended = time.time()
    if prepared is not None and not dry_run and ended > prepared:
        log("warning: the rotation of %d knockd files ended %.1f s after the period start at "
            "%s that it prepared: until then some knockd held the old sequences, and clients "
            "got in on their retry (raise KNOCKD_ROTATOR_LEAD, at most the period less the "
            "grace, or lengthen the period)" % (len(paths), ended - prepared, utc(prepared)))
    return min((plan.event for plan in plans if plan.event is not None), default=None)
