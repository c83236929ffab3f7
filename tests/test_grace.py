"""The grace block: added at a boundary, removed at the grace end, byte-exact.

The golden files are rotated at fixed moments under faketime: 06:00:10 is
10 s into a 6-hour period (inside the default 30 s grace), 06:00:40 is after
it, and the previous period of both is the one the golden files hold."""

import shutil
import subprocess

import pytest

from knockd_rotator.core import generator
from knockd_rotator.core import plan
from knockd_rotator.engines.knockd import config as knockd_config
from knockd_rotator.engines.knockd import grace as knockd_grace
from conftest import ROOT, need, run_server
from test_server_config import GOLDEN, GOLDEN_SETTINGS

IN_GRACE = "2026-01-01 06:00:10"
AFTER_GRACE = "2026-01-01 06:00:40"


def rotate_at(config, env, moment, *args):
    need(shutil.which("faketime"), "needs faketime (run tests/run to install it)")
    env = dict(env, TZ="UTC")
    result = run_server("--config", config, *args, env=env, prefix=["faketime", moment])
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def golden_env(server_env):
    return server_env(**GOLDEN_SETTINGS)


def sections(data):
    """{section name: sequence value} of a file's Lines, in file order."""
    found = {}
    for line in knockd_config.parse_config(data):
        if line.is_sequence:
            found[line.section.decode("utf-8", "replace")] = line.value.decode()
    return found


@pytest.mark.parametrize("name", ["odd", "debian"])
def test_block_added_in_grace_and_removed_after(tmp_path, golden_env, name):
    original = (GOLDEN / (name + ".conf")).read_bytes()
    config, reference = tmp_path / "knockd.conf", tmp_path / "reference.conf"
    config.write_bytes(original)
    reference.write_bytes(original)
    rotate_at(reference, golden_env, AFTER_GRACE)
    after_grace = reference.read_bytes()

    result = rotate_at(config, golden_env, IN_GRACE)
    assert "grace: the previous sequences open the doors until 2026-01-01 06:00:30 UTC" \
        in result.stderr
    in_grace = config.read_bytes()
    user, block = knockd_grace.split_grace_block(knockd_config.parse_config(in_grace))
    assert b"".join(line.raw for line in user) == after_grace, \
        "outside the block the file is the one rotated after the grace"
    assert in_grace.startswith(after_grace.rstrip(b"\n"))
    assert block[0].raw.startswith(knockd_grace.GRACE_BEGIN + b": generated, do not edit; "
                                   b"removed at 1767247230 (2026-01-01 06:00:30 UTC)")
    # Each rotator door has a sibling holding the sequence of the previous
    # period: the one the golden rotated file holds.
    previous = sections((GOLDEN / (name + ".rotated.conf")).read_bytes())
    siblings = {door: value for door, value in sections(in_grace).items()
                if door.endswith("_ROTATOR_GRACE")}
    assert siblings == {door + "_GRACE": value for door, value in previous.items()
                        if door.endswith("_ROTATOR")}
    assert not knockd_config.config_errors(knockd_config.parse_config(in_grace))

    rotate_at(config, golden_env, IN_GRACE)
    assert config.read_bytes() == in_grace, "a second run in the grace changes nothing"
    result = rotate_at(config, golden_env, AFTER_GRACE)
    assert "grace ended" in result.stderr
    assert config.read_bytes() == after_grace, "the block goes, and only the block"


def test_siblings_copy_every_directive_but_the_sequence(tmp_path, golden_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n  seq_timeout = 7\n  sequence = 1\n"
                       b"  # a comment is not copied\n  start_command = echo %IP%\n")
    rotate_at(config, golden_env, IN_GRACE)
    text = config.read_text()
    block = text[text.index("[ssh_ROTATOR_GRACE]"):]
    assert block.splitlines()[1:4] == ["  seq_timeout = 7", "  start_command = echo %IP%",
                                       "  sequence = " + sections(config.read_bytes())[
                                           "ssh_ROTATOR_GRACE"]]
    assert "comment" not in block


def test_text_after_the_block_is_kept(tmp_path, golden_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n")
    rotate_at(config, golden_env, IN_GRACE)
    appended = b"# added by hand after the block\n[static]\n\tsequence = 7000,8000,9000\n"
    config.write_bytes(config.read_bytes() + appended)
    rotate_at(config, golden_env, AFTER_GRACE)
    data = config.read_bytes()
    assert b"_GRACE" not in data and data.endswith(b"\n" + appended)
    assert sections(data)["static"] == "7000,8000,9000", "its lines belong to [static] again"


def test_a_block_without_its_end_is_refused(tmp_path, golden_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n")
    rotate_at(config, golden_env, IN_GRACE)
    broken = config.read_bytes().replace(knockd_grace.GRACE_END, b"# the end, edited by hand")
    config.write_bytes(broken)
    result = run_server("--config", config, env=dict(golden_env, TZ="UTC"),
                        prefix=["faketime", AFTER_GRACE])
    assert result.returncode == 4
    assert result.stderr.startswith("error: line 3 begins a grace block that has no end line")
    assert config.read_bytes() == broken


@pytest.mark.parametrize("name", ["odd", "debian"])
def test_dry_run_diffs_of_both_transitions_apply(tmp_path, golden_env, name):
    need(shutil.which("patch"), "needs patch (run tests/run to install it)")
    config, patched = tmp_path / "knockd.conf", tmp_path / "patched.conf"
    config.write_bytes((GOLDEN / (name + ".rotated.conf")).read_bytes())
    for moment in (IN_GRACE, AFTER_GRACE):
        patched.write_bytes(config.read_bytes())
        diff = rotate_at(config, golden_env, moment, "--dry-run").stdout
        assert diff.startswith("--- ")
        rotate_at(config, golden_env, moment)
        subprocess.run(["patch", "--quiet", str(patched)], input=diff, text=True, check=True)
        assert patched.read_bytes() == config.read_bytes(), moment


def test_grace_zero_never_writes_a_block(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n")
    rotate_at(config, server_env(**dict(GOLDEN_SETTINGS, GRACE=0)), IN_GRACE)
    assert b"_GRACE" not in config.read_bytes()


@pytest.mark.parametrize("period, grace, expected", [
    (21600, None, 30), (30, None, 15), (10, None, 5), (1, None, 0), (20, "5", 5), (20, "0", 0)])
def test_grace_default_and_range(period, grace, expected):
    env = {"KNOCKD_ROTATOR_PERIOD_MODULO": str(period)}
    if grace is not None:
        env["KNOCKD_ROTATOR_GRACE"] = grace
    assert generator.read_settings(env, "ssh_ROTATOR").grace == expected


@pytest.mark.parametrize("grace", ["11", "-1", "5s", ""])
def test_grace_beyond_half_the_period_is_an_error(grace):
    with pytest.raises(generator.RotatorError) as caught:
        generator.read_settings({"KNOCKD_ROTATOR_GRACE": grace,
                              "KNOCKD_ROTATOR_PERIOD_MODULO": "20"}, "ssh_ROTATOR")
    assert "KNOCKD_ROTATOR_GRACE must be a whole number from 0 to 10" in str(caught.value)


@pytest.mark.parametrize("now, expected", [(100, 105), (104.9, 105), (105, 120), (119, 120),
                                           (120, 125)])
def test_next_event_is_the_grace_end_or_the_boundary(now, expected):
    assert plan.next_event(now, 20, 5, 0) == expected
    assert plan.next_event(now, 20, 0, 0) == (int(now) // 20 + 1) * 20


def test_spec_describes_the_block():
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    assert knockd_grace.GRACE_BEGIN.decode() in spec and plan.GRACE_SUFFIX in spec
