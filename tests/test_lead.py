"""The lead: from KNOCKD_ROTATOR_LEAD seconds before a boundary the server
writes the next period's sequence, and the current one stays as the grace
sibling.  A rotation of many knockd takes seconds (500 doors: 4.6 s on 2
CPUs); with the lead every knockd holds the new sequence when the period
starts, and no file changes at the boundary itself.

The pure parts (plan_rotation, next_event, with_burn, the status) take the
moment as an argument; test_rotation_knockd has the client whose clock is
ahead getting in at once with real knockd, and bench/concurrent_knockers.py
the 500 doors."""

import pytest

from knockd_rotator import rotation as rotator_rotation
from knockd_rotator.engines.knockd import report as rotator_status
from knockd_rotator.core import files as core_files
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.core import uses as core_uses
from knockd_rotator.engines.knockd import render as knockd_render
from conftest import SECRET

CONFIG = b"[options]\n\tlogfile = /dev/null\n[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"
BOUNDARY = 1800000000 // 3600 * 3600


def env(**settings):
    return dict({"KNOCKD_ROTATOR_SECRET": SECRET},
                **{"KNOCKD_ROTATOR_" + key: str(value) for key, value in settings.items()})


def plan_at(environ, now):
    return knockd_render.plan_rotation("knockd.conf", CONFIG, now, core_settings.settings_reader(environ))


def opening(plan):
    """{door: sequence} of every door the planned file holds, siblings included."""
    return {line.section.decode(): line.value for line in plan.new_lines if line.is_sequence}


def data(plan):
    return b"".join(line.raw for line in plan.new_lines)


def sequence(environ, start):
    return core_settings.with_sequences(core_settings.rotation_settings(environ, "ssh_ROTATOR")).sequence_at(
        start)


def test_the_next_sequence_opens_from_the_lead_and_nothing_changes_at_the_boundary():
    environ = env(PERIOD_MODULO=3600)          # grace 30 s, lead 10 s: the defaults
    now, previous = sequence(environ, BOUNDARY), sequence(environ, BOUNDARY - 3600)
    before = plan_at(environ, BOUNDARY - 10.01)
    assert opening(before) == {"ssh_ROTATOR": previous}
    assert before.event == BOUNDARY - 10
    at_lead = plan_at(environ, BOUNDARY - 10)
    assert opening(at_lead) == {"ssh_ROTATOR": now, "ssh_ROTATOR_GRACE": previous}
    assert at_lead.event == BOUNDARY + 30, "the next change is the grace end, not the boundary"
    for moment in (BOUNDARY - 0.01, BOUNDARY, BOUNDARY + 29.99):
        assert data(plan_at(environ, moment)) == data(at_lead), moment
    after = plan_at(environ, BOUNDARY + 30)
    assert opening(after) == {"ssh_ROTATOR": now}
    assert after.event == BOUNDARY + 3600 - 10


@pytest.mark.parametrize("period, grace, lead, expected", [
    (3600, None, None, 10), (3600, 30, 0, 0), (3600, 30, 100, 100), (3600, 1800, None, 10),
    (10, None, None, 5), (20, 5, None, 10), (20, 5, 30, 15), (1, None, None, 1), (30, 15, 20, 15)])
def test_the_lead_is_at_most_the_period_less_the_grace(period, grace, lead, expected):
    settings = {"PERIOD_MODULO": period}
    if grace is not None:
        settings["GRACE"] = grace
    if lead is not None:
        settings["LEAD"] = lead
    assert core_settings.rotation_settings(env(**settings), "ssh_ROTATOR").lead == expected


@pytest.mark.parametrize("lead", ["-1", "10s", "", "99999999999"])
def test_a_bad_lead_is_refused(lead):
    with pytest.raises(generator.RotatorError) as caught:
        core_settings.rotation_settings(env(LEAD=lead), "ssh_ROTATOR")
    assert "KNOCKD_ROTATOR_LEAD must be a whole number from 0 to" in str(caught.value)


@pytest.mark.parametrize("period, grace, lead", [(10, 5, 10), (20, 5, 10), (20, 0, 3),
                                                 (20, 10, 0), (7, 3, 2), (1, 0, 10)])
def test_at_every_moment_the_current_sequence_opens_and_the_next_only_within_the_lead(
        period, grace, lead):
    """Over three periods, a tenth of a second at a time: the door always
    takes the period's own sequence, the previous one during the grace, the
    next one only within the lead, and no other.  The file changes at most
    twice a period; once when the lead reaches back to the grace end."""
    environ = env(PERIOD_MODULO=period, GRACE=grace, LEAD=lead)
    lead = core_settings.rotation_settings(environ, "ssh_ROTATOR").lead
    first = generator.period_start(BOUNDARY, period)
    values = {start: sequence(environ, start)
              for start in range(first - 2 * period, first + 5 * period, period)}
    changes, last = [], None
    for tenth in range(30 * period):
        moment = BOUNDARY + tenth / 10
        start = generator.period_start(moment, period)
        plan = plan_at(environ, moment)
        opens = set(opening(plan).values())
        assert values[start] in opens, moment
        if moment < start + grace:
            assert values[start - period] in opens, moment
        allowed = {values[start], values[start - period] if moment < start + grace else None,
                   values[start + period] if moment >= start + period - lead else None}
        assert opens <= allowed, moment
        assert plan.event > moment
        if last is not None and data(plan) != last:
            changes.append(moment)
        last = data(plan)
    per_period = 1 if lead == period - grace and (lead or grace) else 2
    assert len(changes) in (3 * per_period - 1, 3 * per_period, 3 * per_period + 1), changes


def test_a_burn_within_the_lead_counts_the_door_s_next_period():
    """In the lead the door holds the next period's sequence and its sibling
    the current one: a burn of the door counts the next period's use, a burn
    of the sibling the current period's."""
    environ = env(PERIOD_MODULO=3600, SINGLE_USE=1)
    settings_of = core_settings.settings_reader(environ)
    moment = BOUNDARY - 5
    uses = core_uses.with_burn({}, "ssh_ROTATOR", moment, settings_of)
    assert uses["ssh_ROTATOR"]["counts"] == {str(BOUNDARY): 1}
    uses = core_uses.with_burn(uses, "ssh_ROTATOR_GRACE", moment, settings_of)
    assert uses["ssh_ROTATOR"]["counts"] == {str(BOUNDARY): 1, str(BOUNDARY - 3600): 1}
    plan = knockd_render.plan_rotation("knockd.conf", CONFIG, moment, settings_of, uses=uses)
    door = settings_of("ssh_ROTATOR")
    assert opening(plan) == {"ssh_ROTATOR": door.sequence_at(BOUNDARY, 1),
                             "ssh_ROTATOR_GRACE": door.sequence_at(BOUNDARY - 3600, 1)}


def test_status_within_the_lead_is_ok_with_and_without_the_secret(tmp_path):
    config = tmp_path / "knockd.conf"
    config.write_bytes(CONFIG)
    settings = dict(STATE_DIR=tmp_path / "state", ENV_FILE=tmp_path / "absent.env",
                    RELOAD_COMMAND="true", CHECK_COMMAND="true", RECOVER_COMMAND="true",
                    KILL_COMMAND="true", PERIOD_MODULO=3600, CHECK_SECONDS=1, TRIAL_KNOCKD="")
    environ = env(**settings)
    moment = BOUNDARY - 5
    rotator_rotation.rotate(str(config), environ, moment)
    for secret in (SECRET, None):
        environ = env(**settings) if secret else \
            {k: v for k, v in env(**settings).items() if k != "KNOCKD_ROTATOR_SECRET"}
        report = rotator_status.door_status(str(config), environ, moment)
        assert report["checked_with"] == ("secrets" if secret else "fingerprints")
        assert rotator_status.status_state(report) == ("OK", []), report
        door = report["doors"][0]
        assert door["current"] and door["lead"] == 10 and door["period_start"] == BOUNDARY
        assert door["next_rotation_in"] == 3600 - 10 + 5
        assert report["grace_active"] and report["grace_block_present"]


def test_a_rotation_that_ends_after_the_boundary_it_prepared_warns(tmp_path, capsys):
    """A run at a moment within the lead whose boundary has passed by the
    time it ends (here: a moment of the past) says so, and what to change."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(CONFIG)
    settings = dict(STATE_DIR=tmp_path / "state", ENV_FILE=tmp_path / "absent.env",
                    RELOAD_COMMAND="true", CHECK_COMMAND="true", RECOVER_COMMAND="true",
                    KILL_COMMAND="true", PERIOD_MODULO=3600, CHECK_SECONDS=1, TRIAL_KNOCKD="")
    past = 1700000000 // 3600 * 3600            # a boundary in the past
    rotator_rotation.rotate_all(str(config), env(**settings), past - 30)
    assert "warning: the rotation" not in capsys.readouterr().err, "outside the lead: none"
    rotator_rotation.rotate_all(str(config), env(**settings), past - 5)
    err = capsys.readouterr().err
    assert "warning: the rotation of 1 knockd files ended" in err
    assert "after the period start at %s that it prepared" % core_files.utc(past) in err
    assert "raise KNOCKD_ROTATOR_LEAD" in err
