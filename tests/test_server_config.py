"""The server's rewrite of knockd.conf: golden files, byte-exactness, errors.

Nothing here needs root except the comparison with knockd's own parser."""

import os
import shutil
import subprocess

import pytest

from knockd_rotator.core import errors as core_errors
from knockd_rotator.engines.knockd import config as knockd_config
from conftest import ROOT, SECRET, need, need_root_and, run_server

GOLDEN = ROOT / "tests" / "golden"
GOLDEN_TIME = "2026-01-01 00:30:00"
GOLDEN_SETTINGS = dict(SECRET="golden-secret-0123-4567", LENGTH=10, PORT_MODULO=3, PERIOD_MODULO=21600)


def rotate_at(config, env, moment=GOLDEN_TIME, *args):
    return run_server("--config", config, *args, env=env, prefix=["faketime", moment])


@pytest.mark.parametrize("name", ["odd", "debian"])
def test_golden_files(tmp_path, server_env, name):
    need_root_and("faketime")
    config = tmp_path / "knockd.conf"
    config.write_bytes((GOLDEN / (name + ".conf")).read_bytes())
    env = server_env(**GOLDEN_SETTINGS)
    result = rotate_at(config, env)
    assert result.returncode == 0, result.stderr
    assert config.read_bytes() == (GOLDEN / (name + ".rotated.conf")).read_bytes()


def test_second_run_changes_nothing_and_does_not_reload(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes((GOLDEN / "odd.conf").read_bytes())
    reloads = tmp_path / "reloads"
    env = server_env(RELOAD_COMMAND="echo reload >> %s" % reloads)
    assert run_server("--config", config, env=env).returncode == 0
    first = config.stat()
    second = run_server("--config", config, "--verbose", env=env)
    assert second.returncode == 0, second.stderr
    assert "knockd.conf is current\n" in second.stderr
    assert config.stat().st_ino == first.st_ino and config.stat().st_mtime_ns == first.st_mtime_ns
    assert reloads.read_text() == "reload\n"


def test_only_sequence_values_change():
    """Parse before and after: every line keeps its bytes but for the value span."""
    data = (GOLDEN / "odd.conf").read_bytes()
    lines = knockd_config.parse_config(data)
    doors = knockd_config.rotator_doors(lines)
    after = knockd_config.rewrite_config(lines, {door: b"1111:tcp,2222:udp" for door in doors})
    header = next(i for i, line in enumerate(after) if line.raw == b"[nosequence_ROTATOR]\n")
    assert after[header + 1].raw == b"      sequence = 1111:tcp,2222:udp\n"
    assert after[header + 1].number == after[header].number == lines[header].number
    assert after[-1].number == lines[-1].number
    kept = after[:header + 1] + after[header + 2:]
    assert len(kept) == len(lines)
    for old, line in zip(lines, kept):
        if line.kind == "directive" and line.key == "SEQUENCE" and \
                line.section.endswith(b"_ROTATOR"):
            (start, end), (old_start, old_end) = line.span, old.span
            assert line.raw[:start] == old.raw[:old_start]
            assert line.raw[end:] == old.raw[old_end:]
            assert line.value == b"1111:tcp,2222:udp"
        else:
            assert line.raw == old.raw


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    original = (GOLDEN / "debian.conf").read_bytes()
    config.write_bytes(original)
    marker = tmp_path / "reloaded"
    env = server_env(RELOAD_COMMAND="touch %s" % marker, PERIOD_MODULO=30, SERVER_INTERVAL=3600)
    result = run_server("--config", config, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--- ") and "\n-\tsequence      = 0\n" in result.stdout
    assert "\n+\tsequence      = " in result.stdout
    assert config.read_bytes() == original
    assert not marker.exists()
    assert not (tmp_path / "state").exists(), "a dry run takes no lock and schedules nothing"


@pytest.mark.parametrize("name", ["odd", "debian"])
def test_dry_run_diff_applies_to_give_the_rewrite(tmp_path, server_env, name):
    """`patch` with the --dry-run output turns the file into what a run writes."""
    need(shutil.which("patch"), "needs patch (run tests/run to install it)")
    config, patched = tmp_path / "knockd.conf", tmp_path / "patched.conf"
    config.write_bytes((GOLDEN / (name + ".conf")).read_bytes())
    patched.write_bytes(config.read_bytes())
    diff = run_server("--config", config, "--dry-run", env=server_env()).stdout
    assert run_server("--config", config, env=server_env()).returncode == 0
    subprocess.run(["patch", "--quiet", str(patched)], input=diff, text=True, check=True)
    assert patched.read_bytes() == config.read_bytes()


def test_mode_owner_and_symlink_are_kept(tmp_path, server_env):
    need_root_and()
    real = tmp_path / "real.conf"
    real.write_bytes((GOLDEN / "debian.conf").read_bytes())
    os.chmod(real, 0o640)
    os.chown(real, 65534, 65534)
    link = tmp_path / "knockd.conf"
    link.symlink_to(real)
    assert run_server("--config", link, env=server_env()).returncode == 0
    assert link.is_symlink()
    status = real.stat()
    assert (status.st_mode & 0o7777, status.st_uid, status.st_gid) == (0o640, 65534, 65534)
    assert b"sequence      = 0\n" not in real.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knockd.conf", "real.conf", "state"]


def test_warns_when_the_environment_file_is_readable_by_others(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes((GOLDEN / "debian.conf").read_bytes())
    env_file = tmp_path / "knockd_rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
    os.chmod(env_file, 0o644)
    result = run_server("--config", config, env=server_env(ENV_FILE=env_file))
    assert result.returncode == 0
    assert "warning: %s is mode 0644: others can read the secret" % env_file in result.stderr
    os.chmod(env_file, 0o600)
    config.write_bytes((GOLDEN / "debian.conf").read_bytes())
    # A reload that reads the file, as knockd's does: no warning of a hung knockd.
    reading = server_env(ENV_FILE=env_file, RELOAD_COMMAND="cat %s >/dev/null" % config)
    assert "warning" not in run_server("--config", config, env=reading).stderr


BAD_CONFIGS = [
    # (name, content or None for missing, words in the error)
    ("missing", None, "cannot read"),
    ("binary garbage", bytes(range(256)) * 4, "directive before the first section"),
    ("one_time_sequences", b"[ssh_ROTATOR]\none_time_sequences = /etc/knock.otp\n",
     "line 2: rotator door [ssh_ROTATOR] has one_time_sequences"),
    ("unknown key", b"[ssh_ROTATOR]\ncommand = true\nfrob = 1\n", "line 3: unknown key 'frob'"),
    ("bad tcpflags", b"[ssh_ROTATOR]\ntcpflags = syn, ack\n", "line 2: space around tcp flag ' ACK'"),
    ("directive first", b"logfile = /x\n[ssh_ROTATOR]\n", "line 1: directive before"),
    ("static door port", b"[a]\nsequence = 70000\n[ssh_ROTATOR]\n", "line 2: port '70000'"),
    ("door without sequence", b"[a]\ncommand = x\n[ssh_ROTATOR]\n", "line 1: door [a] has no"),
    ("Options spelled", b"[Options]\nlogfile = /x\n[ssh_ROTATOR]\n", "line 2: unknown key 'logfile'"),
]


@pytest.mark.parametrize("name,content,words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_fail_cleanly_and_change_nothing(tmp_path, server_env, name, content, words):
    config = tmp_path / "knockd.conf"
    if content is not None:
        config.write_bytes(content)
    marker = tmp_path / "reloaded"
    result = run_server("--config", config, env=server_env(RELOAD_COMMAND="touch %s" % marker))
    assert result.returncode == core_errors.EXIT_CONFIG
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert (config.read_bytes() if content is not None else None) == content
    assert not marker.exists()


def test_config_that_is_a_directory(tmp_path, server_env):
    result = run_server("--config", tmp_path, env=server_env())
    assert result.returncode == core_errors.EXIT_CONFIG
    assert result.stderr.startswith("error: cannot read %s: Is a directory" % tmp_path)


# What knockd 0.8 itself accepts or refuses: (name, config text).  The test
# asks both knockd and config_errors(), and they must agree.
GRAMMAR_CASES = [
    ("plain", "[d]\nsequence = 7000,8000,9000\n"),
    ("timeout and command aliases", "[d]\nsequence = 1\ntimeout = 5\ncommand = true\n"),
    ("usesyslog in a door", "[d]\nsequence = 1\nusesyslog\n"),
    ("spaces in a section name", "[ d ]\nsequence = 7000\n"),
    ("port 65536", "[d]\nsequence = 65536\n"),
    ("port 65535", "[d]\nsequence = 65535\n"),
    ("port abc is atoi 0", "[d]\nsequence = abc\n"),
    ("port -1", "[d]\nsequence = -1\n"),
    ("port 12abc", "[d]\nsequence = 12abc\n"),
    ("space-separated ports", "[d]\nsequence = 7000 8000\n"),
    ("tcpflags with a space", "[d]\nsequence = 1\ntcpflags = syn, ack\n"),
    ("tcpflags", "[d]\nsequence = 1\ntcpflags = SYN,!ack\n"),
    ("tcpflags unknown", "[d]\nsequence = 1\ntcpflags = syn,foo\n"),
    ("two sequence lines", "[d]\nsequence = 1\nSequence = 2\n"),
    ("no sequence", "[d]\ncmd_timeout = 5\n"),
    ("empty section name", "[]\n"),
    ("directive before sections", "logfile = /tmp/x\n[d]\nsequence = 1\n"),
    ("unknown key", "[d]\nsequence = 1\nfrob = 1\n"),
    ("key without =", "[d]\nsequence = 1\nseq_timeout\n"),
    ("sequence in options", "[options]\nsequence = 1\n[d]\nsequence = 1\n"),
    ("Options is a door", "[Options]\nlogfile = /tmp/x\n[d]\nsequence = 1\n"),
    ("33 ports", "[d]\nsequence = %s\n" % ",".join(str(p) for p in range(2001, 2034))),
    ("32 ports", "[d]\nsequence = %s\n" % ",".join(str(p) for p in range(2001, 2033))),
    ("empty protocol", "[d]\nsequence = 7000:\n"),
    ("protocol case and spaces", "[d]\nsequence = 7000:TcP, 8000 : udp\n"),
    ("protocol sctp", "[d]\nsequence = 7000:sctp\n"),
    ("third colon part", "[d]\nsequence = 7000:tcp:x\n"),
    ("empty sequence value", "[d]\nsequence =\n"),
    ("double comma", "[d]\nsequence = 7000,,8000\n"),
    ("empty key", "[d]\nsequence = 1\n= 5\n"),
    ("CRLF", "[d]\r\nsequence = 7000,8000\r\n"),
    ("indented comment", "[d]\n  # x\nsequence = 1\n"),
    ("inline hash", "[d]\nsequence = 7000,8000 # x\n"),
    ("interface in a door", "[d]\nsequence = 1\ninterface = lo\n"),
    ("space inside a key", "[d]\nsequence = 1\nseq timeout = 5\n"),
    ("usesyslog in options", "[options]\nusesyslog\n[d]\nsequence = 1\n"),
    ("lone bracket", "[\n[d]\nsequence = 1\n"),
    ("ipv6 commands", "[d]\nsequence = 1\nstart_command_6 = true\nstop_command_6 = true\n"),
    ("target", "[d]\nsequence = 1\ntarget = 127.0.0.1\n"),
    ("no final newline", "[d]\nsequence = 1"),
]


@pytest.fixture(scope="module")
def knockd_verdicts(tmp_path_factory):
    """Start one knockd per case at once in a namespace; refused ones exit 1."""
    need_root_and("knockd", "ip")
    import uuid
    folder = tmp_path_factory.mktemp("grammar")
    namespace = "krgram-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    processes = {}
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        for index, (name, text) in enumerate(GRAMMAR_CASES):
            config = folder / ("%d.conf" % index)
            config.write_text(text)
            processes[name] = subprocess.Popen(
                ["ip", "netns", "exec", namespace, "knockd", "-i", "lo", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import time
        deadline = time.monotonic() + 2    # knockd refuses a file at once, or never
        while time.monotonic() < deadline and any(p.poll() is None for p in processes.values()):
            time.sleep(0.05)
        verdicts = {name: process.poll() is None for name, process in processes.items()}
        return verdicts
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", namespace], check=False)


@pytest.mark.parametrize("name,text", GRAMMAR_CASES, ids=[c[0] for c in GRAMMAR_CASES])
def test_grammar_agrees_with_knockd(knockd_verdicts, name, text):
    errors = knockd_config.config_errors(knockd_config.parse_config(text.encode()))
    assert (not errors) == knockd_verdicts[name], errors


def test_golden_outputs_are_accepted_by_knockd(tmp_path, start_knockd):
    for name in ("odd", "debian"):
        text = (GOLDEN / (name + ".rotated.conf")).read_text().replace(
            "LogFile=/var/log/knockd.log", "LogFile=%s" % (tmp_path / "knockd.log"))
        assert not knockd_config.config_errors(knockd_config.parse_config(text.encode()))
        start_knockd(text, name=name + ".conf").stop()
