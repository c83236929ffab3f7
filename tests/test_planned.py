"""The planned record: a run that finds a file as its last good rotation left
it, for the same settings, counters and stretch between two events, changes
nothing and so plans nothing.  A new process (the timer's hourly run, a run
by hand) then pays one PBKDF2, not one per PIN door (1000 PIN doors: 11 s);
anything that would change the file makes it plan again.

In-process, with the moment as an argument: the caches are emptied for each
run, as a new process has them.  bench/pin_doors.py times the real runs."""

import hashlib
import json
import os

import pytest

from knockd_rotator import planned as rotator_planned
from knockd_rotator import rotation as rotator_rotation
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.core import uses as core_uses
from knockd_rotator.engines.knockd import grace
from knockd_rotator.engines.knockd import render as knockd_render
from conftest import SECRET

PIN = "2468-1357"
DOORS = b"".join(b"[c%d_ROTATOR]\n\tstart_command = true\n" % number for number in range(20))
HOUR = 1800000000 // 3600 * 3600


@pytest.fixture
def setup(tmp_path, server_env, monkeypatch):
    """(config path, environment, the PBKDF2s of the last run, run(now, **env))."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[options]\n\tlogfile = /dev/null\n" + DOORS)
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_PIN=%s\n" % PIN)
    env_file.chmod(0o600)
    # The reload opens the file, as knockd does: the evidence of a re-read.
    env = server_env(ENV_FILE=env_file, PERIOD_MODULO=3600, RELOAD_COMMAND="cat %s" % config)
    derived = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac",
                        lambda *args: derived.append(args) or real(*args))

    def run(now, environ=env):
        for module, cache in ((core_settings, "KEY_CACHE"), (rotator_planned, "PLANNED_DIGESTS"),
                              (rotator_planned, "PLANNED_BASIS")):
            monkeypatch.setattr(module, cache, {})
        derived.clear()
        return rotator_rotation.rotate_all(str(config), environ, now)

    return config, env, derived, run


def test_a_current_file_costs_one_pbkdf2_not_one_per_pin_door(setup):
    config, env, derived, run = setup
    event = run(HOUR + 100)
    assert sum(args[1] == PIN.encode() for args in derived) == 20, \
        "the first run derives each PIN door's key"
    written = config.read_bytes()
    assert b"sequence" in written
    for moment in (HOUR + 100, HOUR + 1000, event - 1):
        assert run(moment) == event
        assert [args[3] for args in derived] == [generator.PIN_ITERATIONS], \
            "one PBKDF2, of PIN_ITERATIONS rounds, for the whole record"
        assert config.read_bytes() == written


def full_plan(config, env, now):
    """What planning every door again makes of CONFIG at NOW."""
    state = env["KNOCKD_ROTATOR_STATE_DIR"]
    environ = core_settings.with_env_file(env, env["KNOCKD_ROTATOR_ENV_FILE"])
    plan = knockd_render.plan_rotation(str(config), config.read_bytes(), now,
                                core_settings.settings_reader(environ), uses=core_uses.read_uses(state))
    return b"".join(line.raw for line in plan.new_lines)


def test_whatever_would_change_the_file_makes_the_run_plan_again(setup, tmp_path):
    """Each change below, after a recorded rotation: the run plans every door
    (20 PBKDF2 and the record's one) and the file is what a full plan makes."""
    config, env, derived, run = setup
    env_file = tmp_path / "rotator.env"
    event = run(HOUR + 100)

    def changes_planned(now, what):
        expected = full_plan(config, env, now)
        run(now)
        assert len(derived) > 1, what + ": skipped"
        assert config.read_bytes() == expected, what
        assert run(now) is not None and len(derived) == 1, what + ": then recorded again"

    env_file.write_text("KNOCKD_ROTATOR_PIN=1357-2468\n")
    before = config.read_bytes()
    changes_planned(HOUR + 200, "the PIN changed")
    assert config.read_bytes() != before
    config.write_bytes(config.read_bytes() + b"[new_ROTATOR]\n\tstart_command = true\n")
    changes_planned(HOUR + 300, "a door added by hand")
    assert b"[new_ROTATOR]\n\tsequence = " in config.read_bytes()
    changes_planned(event, "the event came (the lead's start)")
    assert grace.GRACE_BEGIN in config.read_bytes()
    changes_planned(event - 3600, "the clock went back")
    env["KNOCKD_ROTATOR_PERIOD_MODULO"] = "7200"
    changes_planned(HOUR + 300, "a setting in the environment changed")
    counters = os.path.join(env["KNOCKD_ROTATOR_STATE_DIR"], core_uses.USES)
    with open(counters, "w") as handle:
        json.dump({"c3_ROTATOR": {"counts": {str(HOUR): 1}}}, handle)
    changes_planned(HOUR + 300, "the single-use counters changed")


def test_a_current_file_that_knockd_has_not_loaded_is_not_as_planned(setup):
    """The record of what knockd loaded differs (a reload failed, or a run
    died before it): the run plans, reloads, and records the file as loaded."""
    config, env, derived, run = setup
    run(HOUR + 100)
    written = config.read_bytes()
    loaded = os.path.join(env["KNOCKD_ROTATOR_STATE_DIR"], "loaded")
    with open(loaded, "w") as handle:
        handle.write("%s\n" % hashlib.sha256(b"the file before").hexdigest())
    run(HOUR + 200)
    assert len(derived) > 1, "planned again"
    assert config.read_bytes() == written
    assert open(loaded).read() == "%s\n" % hashlib.sha256(written).hexdigest()
    run(HOUR + 300)
    assert len(derived) == 1, "then as planned again"


def test_a_door_with_one_time_sequences_always_plans(setup, tmp_path):
    """knockd uses their lines up: a rotation tends their keeper every time."""
    config, env, derived, run = setup
    supply = tmp_path / "once"
    supply.write_text("1000,2000,3000\n4000,5000,6000\n")
    config.write_bytes(config.read_bytes() + b"[once]\n\tone_time_sequences = %s\n"
                       b"\tcommand = true\n" % bytes(supply))
    run(HOUR + 100)
    run(HOUR + 200)
    assert len(derived) > 1


def test_the_record_holds_no_secret_and_no_pin(setup):
    config, env, derived, run = setup
    run(HOUR + 100)
    path = os.path.join(env["KNOCKD_ROTATOR_STATE_DIR"], rotator_planned.PLANNED)
    data = open(path, "rb").read()
    assert SECRET.encode() not in data and PIN.encode() not in data
    assert os.stat(path).st_mode & 0o077 == 0
    record = json.loads(data)
    assert record["file"] == hashlib.sha256(config.read_bytes()).hexdigest()
