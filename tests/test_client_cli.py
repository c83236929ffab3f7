"""The client run as a user runs it: a subprocess, its output and exit codes."""

import json
import shutil
import subprocess
import sys

import pytest

import knockd_rotator_client as client
from conftest import CLIENT, SECRET, rotator_env, run_client


def test_generate_prints_knockd_form():
    result = run_client("generate", "ssh")
    assert result.returncode == 0, result.stderr
    items = result.stdout.strip().split(",")
    assert len(items) == 10
    assert all(item.endswith(":tcp") and 2000 <= int(item[:-4]) <= 65535 for item in items)


def test_generate_knock_and_json_forms_agree():
    knockd_form = run_client("generate", "ssh").stdout.strip()
    knock_form = run_client("generate", "ssh", "--format", "knock").stdout.strip()
    data = json.loads(run_client("generate", "ssh", "--format", "json").stdout)
    assert knock_form == knockd_form.replace(",", " ")
    assert data["sequence"] == knockd_form
    assert data["door"] == "ssh_ROTATOR"
    assert data["period_end"] - data["period_start"] == 21600
    assert [f"{p['port']}:{p['protocol']}" for p in data["ports"]] == knockd_form.split(",")


def test_generate_matches_the_library_for_the_same_period():
    data = json.loads(run_client("gen", "web", "--format", "json", "--offset", "-1",
                                 env=rotator_env(LENGTH=11, PORT_MODULO=4)).stdout)
    expected = client.generate_sequence(SECRET.encode(), "web_ROTATOR", data["period_start"], 11, 4)
    assert data["sequence"] == client.format_sequence(expected)


def test_suffix_is_not_appended_twice():
    assert run_client("generate", "ssh").stdout == run_client("generate", "ssh_ROTATOR").stdout


@pytest.mark.parametrize("spelling", [["--offset", "-1"], ["--offset=-1"]])
def test_offset_moves_by_whole_periods(spelling):
    now = json.loads(run_client("generate", "ssh", "--format", "json").stdout)
    before = json.loads(run_client("generate", "ssh", "--format", "json", *spelling).stdout)
    assert now["period_start"] - before["period_start"] == 21600
    assert now["sequence"] != before["sequence"]


def test_knock_takes_a_negative_offset_beside_its_family_options(netns):
    """knock has -4 and -6, which make argparse read "-1" as an option."""
    result = run_client("knock", "127.0.0.1", "ssh", "--offset", "-1", "-4", "--check-timeout",
                        "0.2", "--check", "9", netns=netns.name)
    assert result.stderr.startswith("error: port 9 on 127.0.0.1 did not open"), result.stderr


@pytest.mark.parametrize("word", ["g", "gen", "gene", "generate"])
def test_command_prefixes(word):
    result = run_client(word, "ssh")
    assert result.returncode == 0 and result.stdout == run_client("generate", "ssh").stdout


def test_version_and_help():
    version = run_client("--version")
    assert version.returncode == 0 and client.VERSION in version.stdout
    top = run_client("--help").stdout
    assert "examples:" in top and "exit codes:" in top
    for command in ("generate", "knock"):
        assert "examples:" in run_client(command, "--help").stdout


ERRORS = [
    # (arguments, environment overrides, exit code, words in the message)
    (["frobnicate", "ssh"], {}, 2, "unknown command 'frobnicate' (choose one of: generate, knock"),
    ([], {}, 2, "required"),
    (["generate"], {}, 2, "SERVICE"),
    (["generate", "ssh", "--form", "json"], {}, 2, "unrecognized arguments: --form"),
    (["generate", "ssh", "--format", "xml"], {}, 2, "invalid choice"),
    (["generate", "ssh", "--offset", "one"], {}, 2, "'one' is not a whole number"),
    (["generate", "ssh", "--offset", "-99999999999999999999"], {}, 2, "out of range"),
    (["generate", "ssh"], {"SECRET": None}, 3,
     "neither KNOCKD_ROTATOR_SECRET_SSH nor KNOCKD_ROTATOR_SECRET is set"),
    (["generate", "ssh"], {"SECRET": ""}, 3, "KNOCKD_ROTATOR_SECRET is empty"),
    (["generate", "ssh"], {"SECRET": "0123456789abcdef0123456789abcde"}, 3,
     "KNOCKD_ROTATOR_SECRET holds less than 128 bits"),                 # 31 hex digits
    (["generate", "ssh"], {"LENGTH": "9"}, 3, "KNOCKD_ROTATOR_LENGTH is 9"),
    (["generate", "ssh"], {"LENGTH": "0"}, 3, "KNOCKD_ROTATOR_LENGTH must be a whole number from 1 to 32"),
    (["generate", "ssh"], {"LENGTH": "ten"}, 3, "KNOCKD_ROTATOR_LENGTH"),
    (["generate", "ssh"], {"PORT_MODULO": "-3"}, 3, "KNOCKD_ROTATOR_PORT_MODULO"),
    (["generate", "ssh"], {"PERIOD_MODULO": "0"}, 3, "KNOCKD_ROTATOR_PERIOD_MODULO"),
    (["generate", "ssh"], {"PERIOD_MODULO": "1" * 30}, 3, "KNOCKD_ROTATOR_PERIOD_MODULO"),
    (["knock", "host.invalid", "ssh"], {}, 5, "cannot resolve host 'host.invalid'"),
    (["knock", "127.0.0.1", "ssh", "--check", "0"], {}, 2, "not a port"),
    (["knock", "127.0.0.1", "ssh", "--check", "65536"], {}, 2, "not a port"),
    (["knock", "127.0.0.1", "ssh", "--check-timeout", "-1"], {}, 2, "seconds"),
    (["knock", "127.0.0.1", "ssh", "--delay", "fast"], {}, 2, "milliseconds"),
    (["knock", "127.0.0.1", "ssh", "-4", "-6"], {}, 2, "not allowed with"),
    (["knock", "::1", "ssh", "-4"], {}, 5, "cannot resolve host '::1'"),
]


@pytest.mark.parametrize("args,overrides,code,words", ERRORS,
                         ids=[" ".join(e[0]) + str(e[1]) for e in ERRORS])
def test_errors_are_one_line_with_exit_code(request, args, overrides, code, words):
    # Whatever might send a packet or a DNS query runs in a namespace of its own.
    netns = request.getfixturevalue("netns").name if args[:1] == ["knock"] else None
    result = run_client(*args, env=rotator_env(**overrides), netns=netns)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]
    assert lines[0].endswith(")")
    assert SECRET not in result.stderr


def test_secret_never_printed():
    outputs = [run_client(*args) for args in (["generate", "ssh", "--format", "json"],
                                              ["--help"], ["generate", "--help"])]
    assert all(SECRET not in r.stdout + r.stderr for r in outputs)


def test_runs_copied_alone_in_isolated_mode(tmp_path):
    alone = tmp_path / "knockd_rotator_client.py"
    shutil.copy(CLIENT, alone)
    result = subprocess.run([sys.executable, "-I", str(alone), "gen", "ssh"], cwd=tmp_path,
                            env=rotator_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run_client("generate", "ssh").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knockd_rotator_client.py"]


def test_client_imports_only_the_standard_library():
    result = subprocess.run(
        [sys.executable, "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules);"
         "import knockd_rotator_client;"
         "print('\\n'.join(sorted(set(sys.modules) - before)))", str(CLIENT.parent)],
        capture_output=True, text=True, check=True)
    stdlib = sys.stdlib_module_names if hasattr(sys, "stdlib_module_names") else None
    if stdlib is None:
        pytest.skip("Python < 3.10 has no sys.stdlib_module_names")
    new = {m.split(".")[0] for m in result.stdout.split()} - {"knockd_rotator_client"}
    assert new <= set(stdlib), new - set(stdlib)
