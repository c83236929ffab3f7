"""docs/SPEC.md's validation vectors, parsed from its table, run against both
scripts: each input accepted with its sequence, or refused with its exit code.

The client runs in-process (`generate`, with the typed line on standard
input); the server reads the same environment and door through its
settings, its sequences and its knockd.conf check.  A few rows also run as
real processes of both scripts.
"""

import contextlib
import io
import json
import os
import re
import sys

import pytest

import knockd_rotator_client as client
from knockd_rotator.core import errors
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.engines.knockd import config as knockd_config
from conftest import CLIENT, ROOT, SERVER, run_script

NOW = 1700000000
BASE_SECRET = "example-secret-0123-abcdefghij"
ROW = re.compile(r"^\| (\d+) \| ([^|]*) \| `([^`]*)` \| `([^`]*)` \| (?:`([^`]*)`|-) \| "
                 r"`([^`]*)` \| ([^|]*) \|$")


def spec_rows():
    """The table under `## Validation vectors`: (number, rule, argv, environment
    overrides, typed text or None, client result, server result)."""
    text = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
    table = text.split("\n## Validation vectors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        if not line.startswith("| ") or line.startswith(("| # ", "|---")):
            continue
        match = ROW.match(line)
        assert match, line
        number, rule, argv, env, typed, client_result, server_result = match.groups()
        rows.append(pytest.param(int(number), json.loads(argv), json.loads(env),
                                 None if typed is None else json.loads(typed), client_result,
                                 server_result.strip(), id="%s %s" % (number, rule.strip())))
    return rows


ROWS = spec_rows()


def environment(overrides, folder):
    """The row's KNOCKD_ROTATOR_* variables: BASE_SECRET unless the row sets
    SECRET (null: unset), and no remembered use counter."""
    env = {"KNOCKD_ROTATOR_SECRET": BASE_SECRET,
           "KNOCKD_ROTATOR_USES_FILE": os.path.join(folder, "no-uses.json")}
    for key, value in overrides.items():
        if value is None:
            env.pop("KNOCKD_ROTATOR_" + key, None)
        else:
            env["KNOCKD_ROTATOR_" + key] = value
    return env


def client_result(argv, env, typed):
    """What docs/SPEC.md's table says of the client: the sequence, or `exit N`."""
    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(typed or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            client.run(argv, env, NOW)
    except client.RotatorError as exc:
        return "exit %d" % exc.code
    finally:
        sys.stdin = saved
    return out.getvalue().strip()


def server_result(argv, env):
    """The server's view of the row's door and environment: its knockd.conf
    check of the door name (`exit 4`), its settings (`exit 3`), or the
    sequence of offset 0 for the row's --use."""
    door = client.door_name(argv[1])
    section = door.encode("utf-8", "surrogateescape")
    lines = knockd_config.parse_config(b"[" + section + b"]\n\tsequence = 1\n\tcommand = true\n")
    if knockd_config.rotator_errors(lines):
        return "exit %d" % errors.EXIT_CONFIG
    use = int(argv[argv.index("--use") + 1]) if "--use" in argv else 0
    try:
        settings = core_settings.with_sequences(generator.read_settings(env, door))
        return settings.sequence_at(generator.period_start(NOW, settings.period), use).decode()
    except generator.RotatorError as exc:
        return "exit %d" % exc.code


def test_table_covers_every_rule():
    assert len(ROWS) >= 60
    assert [row.values[0] for row in ROWS] == list(range(1, len(ROWS) + 1))
    results = [row.values[4] for row in ROWS]
    assert {"exit 2", "exit 3"} <= set(results)
    assert sum(not result.startswith("exit") for result in results) >= 30
    environments = [row.values[2] for row in ROWS]
    for setting in ("LENGTH", "PERIOD_MODULO", "PORT_MODULO", "GRACE", "SINGLE_USE", "SECRET",
                    "PIN", "MODE", "ALGORITHM", "PORTS", "PROTO_MODULO", "SALT"):
        assert any(setting in env for env in environments), setting
    assert {"legacy-v1", "legacy-v3"} <= {env.get("ALGORITHM") for env in environments}
    options = {word.split("=")[0] for row in ROWS for word in row.values[1]}
    assert {"--offset", "--use", "--code", "--pin"} <= options
    assert any(row.values[3] is not None for row in ROWS)


@pytest.mark.parametrize("number, argv, overrides, typed, expected, on_server", ROWS)
def test_row(tmp_path, number, argv, overrides, typed, expected, on_server):
    env = environment(overrides, str(tmp_path))
    assert client_result(argv, env, typed) == expected
    if on_server != "-":
        assert server_result(argv, env) == (expected if on_server == "same" else on_server)


# Rows whose command line a real process can carry (no lone surrogate).
SPAWNED = ["sign +", "LENGTH 9: below the floor", "LENGTH 1", "GRACE above half the period",
           "--offset +1", "door: U+001F", "door: U+0085 (C1)", "SECRET unset",
           "totp: own PERIOD_MODULO 60", "PIN empty is no PIN", "legacy-v1 totp",
           "--use 4294967296", "PIN typed, CR CR LF: the PIN ends in CR"]


@pytest.mark.parametrize("rule", SPAWNED)
def test_row_as_a_real_client(tmp_path, rule):
    """The exit code of a real process (whose clock is its own: an accepted
    row only checks that it succeeds)."""
    (_, argv, overrides, typed, expected, _), = [row.values for row in ROWS
                                                 if row.id.split(" ", 1)[1] == rule]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")},
               **environment(overrides, str(tmp_path)))
    result = run_script(CLIENT, *argv, env=env, input=(typed or "").encode())
    assert "Traceback" not in result.stderr
    if expected.startswith("exit"):
        assert "exit %d" % result.returncode == expected, result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    else:
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overrides, code", [
    ({"LENGTH": "+10"}, 3), ({"LENGTH": "1"}, 3), ({"PERIOD_MODULO": "\u0661\u0660"}, 3),
    ({"PORT_MODULO": "65536"}, 3), ({"LENGTH": "010"}, 0),
])
def test_server_process_reads_numbers_as_the_table(tmp_path, server_env, overrides, code):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    result = run_script(SERVER, "--dry-run", "--config", config,
                        env=server_env(TRIAL_KNOCKD="", **overrides))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
