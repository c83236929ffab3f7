"""`check` (knockd's grammar and its silent traps) and `status` (monitoring)."""

import json
import os

import pytest

from knockd_rotator.engines.knockd import report as rotator_status
from knockd_rotator.core import errors as core_errors
from knockd_rotator.engines.knockd import config as knockd_config
from conftest import SECRET, run_server
from test_server_config import GOLDEN

GOOD_DOOR = (b"[ssh_ROTATOR]\n\tsequence = 1\n\tstart_command = true\n\tcmd_timeout = 10\n"
             b"\tstop_command = true\n")

# (name, knockd.conf text, line, words of the error)
TRAPS = [
    ("space-separated sequence", b"[static]\nsequence = 7000 8000 9000\nstop_command = true\n",
     2, "sequence item '7000 8000 9000' has a space: knockd reads it as the one port 7000"),
    ("comment after a value", b"[static]\nsequence = 7000,8000 # ssh\nstop_command = true\n",
     2, "'#' in the value of sequence"),
    ("comment after seq_timeout", b"[static]\nsequence = 7000,9000,8000\nseq_timeout = 5 # s\n"
     b"stop_command = true\n", 3, "'#' in the value of seq_timeout"),
    ("space in tcpflags", b"[static]\nsequence = 7000,9000,8000\ntcpflags = syn, ack\n"
     b"stop_command = true\n", 3, "space around tcp flag ' ACK', which knockd refuses"),
    ("port above 65535", b"[static]\nsequence = 7000,70000,8000\nstop_command = true\n",
     2, "port '70000' is above 65535"),
    ("port not a number", b"[static]\nsequence = 7000,ssh,8000\nstop_command = true\n",
     2, "port 'ssh' is not a number: knockd reads it as port 0"),
    ("33 ports", b"[static]\nsequence = " + b",".join(b"%d" % (3000 + (i * 7919) % 997)
                                                        for i in range(33))
     + b"\nstop_command = true\n", 2, "33 ports in the sequence, knockd takes at most 32"),
    ("unknown key", b"[static]\nsequence = 7000,9000,8000\nstop_comand = true\n",
     3, "unknown key 'stop_comand' in door [static]"),
    ("[Options] in other case", b"[Options]\nlogfile = /var/log/knockd.log\n",
     1, "[Options] is a door to knockd, not its options"),
    ("directive before a section", b"logfile = /var/log/knockd.log\n",
     1, "directive before the first section"),
    ("duplicate section", b"[static]\nsequence = 7000,9000,8000\nstop_command = true\n"
     b"[static]\nsequence = 7001,9001,8001\nstop_command = true\n",
     4, "section [static] again (first on line 6)"),
    ("one_time_sequences in a rotator door", b"[x_ROTATOR]\none_time_sequences = /tmp/s\n",
     2, "rotator door [x_ROTATOR] has one_time_sequences"),
]


def trap_file(config, name, text):
    """Write the trap TEXT after a good door (before it, for a directive that
    must come first); returns the number of lines before the trap."""
    first = name == "directive before a section"
    config.write_bytes(text + GOOD_DOOR if first else GOOD_DOOR + text)
    return 0 if first else GOOD_DOOR.count(b"\n")


@pytest.mark.parametrize("name, text, line, words", TRAPS, ids=[t[0] for t in TRAPS])
def test_check_reports_each_trap_with_its_line_and_fix(tmp_path, server_env, name, text, line,
                                                       words):
    config = tmp_path / "knockd.conf"
    offset = trap_file(config, name, text)
    written = config.read_bytes()
    result = run_server("check", "--config", config, env=server_env())
    assert result.returncode == core_errors.EXIT_CONFIG, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    expected = "error: %s line %d: %s" % (config, line + offset, words)
    assert any(e.startswith(expected) and e.endswith(")") and " (" in e for e in errors), \
        result.stderr
    assert "Traceback" not in result.stderr
    assert config.read_bytes() == written


@pytest.mark.parametrize("name, text, line, words", TRAPS, ids=[t[0] for t in TRAPS])
def test_a_rotation_refuses_each_trap_before_writing(tmp_path, server_env, name, text, line,
                                                     words):
    config = tmp_path / "knockd.conf"
    trap_file(config, name, text)
    written = config.read_bytes()
    result = run_server("--config", config, env=server_env(RELOAD_COMMAND="false"))
    assert result.returncode == core_errors.EXIT_CONFIG
    assert words in result.stderr
    assert config.read_bytes() == written


def test_check_warnings_do_not_fail(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[openSSH]\n\tsequence = 7000,8000,9000\n\tcommand = true\n"
                       b"[new_ROTATOR]\n\tstart_command = true\n\tstop_command = true\n")
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
    env_file.chmod(0o644)
    result = run_server("ch", "--config", config, env=server_env(ENV_FILE=env_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("%s: 0 errors, 4 warnings, 1 rotator doors\n%s: knockd compiles 2 "
                             "doors, 3 during a grace window (add-client gives it 10 at most; "
                             "past 100 with grace windows, each reload leaves it deaf for 0.5 s "
                             "or more)\n" % (config, config))
    warnings = result.stderr.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: ") for w in warnings)
    text = result.stderr
    assert "line 1: door [openSSH] has no stop_command" in text
    assert "line 2: the static sequence of [openSSH] is in ascending order" in text
    assert "line 4: rotator door [new_ROTATOR] has no sequence yet" in text
    assert "is mode 0644: others can read the secret" in text


@pytest.mark.parametrize("name", ["odd", "debian"])
def test_check_passes_the_golden_files(server_env, name):
    result = run_server("check", "--config", GOLDEN / (name + ".conf"), env=server_env())
    assert result.returncode == 0, result.stderr
    assert " 0 errors, " in result.stdout


def status_of(config, env, *args):
    result = run_server("status", "--config", config, "--json", *args, env=env)
    return result.returncode, json.loads(result.stdout)


def test_status_ok_critical_warning_unknown(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(GOOD_DOOR)
    env = server_env(GRACE=0)
    code, report = status_of(config, env)
    assert (code, report["state"]) == (2, "CRITICAL")
    assert report["reasons"] == ["ssh_ROTATOR does not hold the current sequence"]
    assert report["report"]["last_rotation"] is None

    assert run_server("--config", config, env=env).returncode == 0
    code, report = status_of(config, env)
    assert (code, report["state"], report["reasons"]) == (0, "OK", [])
    details = report["report"]
    door = details["doors"][0]
    assert {key: door[key] for key in ("door", "mode", "grace", "current", "previous")} == {
        "door": "ssh_ROTATOR", "mode": "secret", "grace": 0, "current": True, "previous": False}
    assert door["period"] == 31622400 and door["period_start"] % 31622400 == 0
    assert 0 < details["next_rotation_in"] == door["next_rotation_in"] <= 31622400
    assert details["knockd_active"] is True and details["grace_active"] is False
    assert abs(details["last_rotation"] - details["now"]) <= 5
    assert "sequence" not in json.dumps(details["doors"]), "no sequence without the flag"

    code, report = status_of(config, env, "--show-sequences")
    held = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    assert report["report"]["doors"][0]["sequence"] == held.decode()

    code, report = status_of(config, server_env(GRACE=0, CHECK_COMMAND="false"))
    assert (code, report["reasons"]) == (2, ["knockd is not active"])

    stale = config.read_bytes() + b"# BEGIN knockd_rotator grace block: x\n" \
                                   b"# END knockd_rotator grace block\n"
    config.write_bytes(stale)
    code, report = status_of(config, env)
    assert (code, report["reasons"]) == (1, ["the grace block is left after the grace"])

    code, report = status_of(tmp_path / "missing.conf", env)
    assert code == 3 and report["state"] == "UNKNOWN" and report["report"] is None
    code, report = status_of(config, server_env(SECRET=None, STATE_DIR=tmp_path / "empty"))
    assert code == 3
    assert "no secret to compute the sequences with, and no fingerprints" in report["reasons"][0]


def test_status_needs_no_secret(tmp_path, server_env):
    """A monitoring account holds no secret: status compares the file with
    the fingerprints the last rotation recorded, which reveal no sequence."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(GOOD_DOOR)
    env = server_env(GRACE=0)
    assert run_server("--config", config, env=env).returncode == 0
    sequence = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    recorded = (tmp_path / "state" / "fingerprints").read_text()
    assert sequence.decode() not in recorded and SECRET not in recorded
    no_secret = server_env(GRACE=0, SECRET=None)
    code, report = status_of(config, no_secret)
    assert (code, report["state"]) == (0, "OK"), report
    assert report["report"]["checked_with"] == "fingerprints"
    assert report["report"]["doors"][0]["current"] is True
    config.write_bytes(config.read_bytes().replace(sequence, b"7000,8000,9000,7100,8100,9100"))
    code, report = status_of(config, no_secret)
    assert (code, report["reasons"]) == (2, ["ssh_ROTATOR does not hold the current sequence"])


def test_status_text_hides_sequences(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(GOOD_DOOR)
    env = server_env(GRACE=0)
    assert run_server("--config", config, env=env).returncode == 0
    sequence = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    plain = run_server("st", "--config", config, env=env)
    assert plain.returncode == 0
    assert plain.stdout.startswith("KNOCKD_ROTATOR OK - 1 doors current; next rotation in ")
    assert "ssh_ROTATOR: current\n" in plain.stdout
    assert sequence.decode() not in plain.stdout + plain.stderr
    shown = run_server("status", "--config", config, "--show-sequences", env=env)
    assert "ssh_ROTATOR: current %s\n" % sequence.decode() in shown.stdout


@pytest.mark.parametrize("lead", [0, 10])
def test_status_warns_right_after_a_rotation_is_due_then_turns_critical(lead):
    """Due at the period's start less the lead (see test_lead.py)."""
    report = {"knockd_active": True, "now": 1003 - lead, "grace_block_present": False,
              "grace_active": False, "doors": [{"door": "ssh_ROTATOR", "current": False,
                                                "previous": True, "period_start": 1000,
                                                "lead": lead}]}
    assert rotator_status.knockd_state(report) == ("WARNING", ["ssh_ROTATOR: rotation due"])
    report["now"] = 1000 - lead + rotator_status.STATUS_SLACK
    assert rotator_status.knockd_state(report)[0] == "CRITICAL"


def test_command_words_and_their_options(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(GOOD_DOOR)
    before = run_server("--config", config, "check", env=server_env())
    assert before.returncode == 0, before.stderr
    for argv, words in [(["c", "--dry-run"], "unrecognized arguments: --dry-run"),
                        (["--dry-run", "check"], "check does not take --dry-run, --watch or --schedule"),
                        (["chek"], "unknown command 'chek'"),
                        (["status", "--jsn"], "unrecognized arguments: --jsn")]:
        result = run_server("--config", config, *argv, env=server_env())
        assert result.returncode == 2, argv
        assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert os.path.exists(config) and config.read_bytes() == GOOD_DOOR


def test_status_sees_one_time_sequences_running_out(tmp_path, server_env):
    """knockd 0.8 stops hearing a door whose one_time_sequences are used up,
    and exits at the next reload unless the rotation gave the file a keeper
    line: status warns below 10 unused, and is critical when a kept file is
    used up, when a file without a keeper is down to 1, or is gone."""
    config = tmp_path / "knockd.conf"
    sequences = tmp_path / "otp"
    config.write_bytes(GOOD_DOOR + b"[otp]\n\tone_time_sequences = %s\n\tstart_command = true\n"
                       % bytes(sequences))
    env = server_env(GRACE=0)

    def with_unused(count):
        sequences.write_text("#000,7000,8000\n" * 3 + "".join(
            "%d,7000,8000\n" % (6000 + n) for n in range(count)))
    with_unused(12)
    assert run_server("--config", config, env=env).returncode == 0
    code, report = status_of(config, env)
    assert (code, report["state"]) == (0, "OK"), report
    assert report["report"]["one_time_sequences"] == [
        {"file": str(sequences), "unused": 12, "kept": True}]
    with_unused(9)
    code, report = status_of(config, env)
    assert (code, report["reasons"]) == (1, [
        "one_time_sequences file %s: 9 unused (its door opens for nobody once they are used "
        "up)" % sequences]), report
    with_unused(1)
    code, report = status_of(config, env)
    assert (code, report["reasons"]) == (2, [
        "one_time_sequences file %s: 1 unused and no keeper line yet (knockd stops when it "
        "has used the last)" % sequences])
    with_unused(0)
    assert run_server("--config", config, env=env).returncode == 0
    code, report = status_of(config, env)
    assert (code, report["reasons"]) == (2, [
        "one_time_sequences file %s: used up (its door opens for nobody until you add lines)"
        % sequences])
    sequences.unlink()
    code, report = status_of(config, env)
    assert code == 2 and "unreadable" in report["reasons"][0], report


def test_check_sees_one_time_sequences_knockd_would_stumble_on(tmp_path, server_env):
    """Used up (the door opens for nobody), and a line longer than the one
    before it (knockd 0.8 goes deaf to other doors when it moves on to it):
    warnings with the line of knockd.conf."""
    config = tmp_path / "knockd.conf"
    sequences = tmp_path / "otp"
    config.write_bytes(GOOD_DOOR + b"[otp]\n\tone_time_sequences = %s\n\tstart_command = true\n"
                       % bytes(sequences))
    number = GOOD_DOOR.count(b"\n") + 2
    sequences.write_bytes(b"#000,7000,8000\n")
    checked = run_server("check", "--config", config, env=server_env())
    assert checked.returncode == 0
    assert ("warning: %s line %d: one_time_sequences file %s is used up: its door opens for "
            "nobody (add sequences at its end)" % (config, number, sequences)) in checked.stderr
    sequences.write_bytes(b"#000,7000,8000\n6001,7001,8001\n6002,7002,8002,9002\n")
    checked = run_server("check", "--config", config, env=server_env())
    assert checked.returncode == 0
    assert ("line 3 of the one_time_sequences file %s has more ports than the line before it"
            % sequences) in checked.stderr, checked.stderr
    assert "used up" not in checked.stderr


def test_a_crowded_knockd_is_reported(tmp_path, server_env):
    """knockd is deaf while it reloads, for longer the more doors it has:
    above 100 (grace siblings counted) check, rotation and status say so."""
    config = tmp_path / "knockd.conf"
    static = b"".join(b"[static%d]\n\tsequence = %d,%d,%d\n\tstart_command = true\n"
                      b"\tcmd_timeout = 5\n\tstop_command = true\n"
                      % (n, 3000 + n, 5000 + n, 4000 + n) for n in range(98))
    config.write_bytes(GOOD_DOOR + static)
    config.chmod(0o600)
    env = server_env(GRACE=0)
    assert "knockd holds" not in run_server("check", "--config", config, env=env).stderr
    rotated = run_server("--config", config, env=env)
    assert rotated.returncode == 0 and "knockd holds" not in rotated.stderr, rotated.stderr
    assert status_of(config, env)[0] == 0

    config.write_bytes(config.read_bytes() + GOOD_DOOR.replace(b"ssh_", b"web_"))
    checked = run_server("check", "--config", config, env=env)
    assert checked.returncode == 0
    assert "warning: knockd holds 100 doors, 102 during a grace window" in checked.stderr
    rotated = run_server("--config", config, env=env)
    assert rotated.returncode == 0 and "knockd holds 100 doors" in rotated.stderr
    code, report = status_of(config, env)
    assert code == 1 and report["reasons"][0].startswith("knockd holds 100 doors"), report
