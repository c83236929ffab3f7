"""A clean-room client against the reference: tests/clean_room/krgen.c is the
client's `generate` command written in C from docs/SPEC.md alone (without
reading either script), and this file checks that it and the reference
client agree.

1. Every row of the SPEC's "Validation vectors" table: krgen gives the row's
   result.
2. Thousands of seeded random inputs (door names, every KNOCKD_ROTATOR_*
   setting the SPEC lists for a client, --offset, --use, --pin with a typed
   line, --code, --format, legacy doors, wrong command lines), all within
   the SPEC's contract (its "Command line": no positional word or option
   value that begins with `-`, but `--code -` and whole numbers for
   --offset and --use; no `--`): krgen and the reference client
   (in-process, as tests/test_validation_vectors.py runs it) accept and
   refuse alike, with the same exit code, and print the same sequence.
3. Real processes of both, for bytes that in-process calls cannot carry.

Every disagreement fails: there are no expected failures. One whose cause
is the SPEC (silent, loose or ambiguous) is settled in the SPEC, by making
the reference's behaviour its rule (and krgen follows the new text) or by
leaving the case outside its contract (and the random inputs then avoid
it); a case the SPEC settled stays in AGREED_CASES, so that a change in
either client shows.
"""

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

import knockd_rotator_client as client
from conftest import ROOT, in_fast_tier, need
from test_validation_vectors import ROWS as VECTOR_ROWS
from test_validation_vectors import environment

NOW = 1700000000
BASE_SECRET = "example-secret-0123-abcdefghij"
SOURCE = ROOT / "tests" / "clean_room" / "krgen.c"
INT64_MAX = 2 ** 63 - 1
INT64_MIN = -2 ** 63
ROUNDS = 4000
SEED = 20261207


@pytest.fixture(scope="session")
def krgen(tmp_path_factory):
    """krgen.c compiled once per session (CI must have gcc and libcrypto)."""
    need(shutil.which("gcc"), "needs gcc (tests/run installs it)")
    folder = tmp_path_factory.mktemp("krgen")
    program = folder / "krgen"
    result = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(program), str(SOURCE), "-lcrypto"],
                            capture_output=True, text=True)
    if result.returncode and not os.path.exists("/usr/include/openssl/hmac.h"):
        need(False, "needs libssl-dev (tests/run installs it)")
    assert result.returncode == 0, result.stderr
    return str(program)


def to_bytes(text):
    """What a process gets for TEXT: its UTF-8 bytes, a lone surrogate
    U+DC80..U+DCFF standing for one byte that is not UTF-8 (surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


def as_read(text):
    """TEXT as a process reads its bytes back (SPEC "Text"), so that the
    in-process reference sees what krgen gets: lone surrogates whose bytes
    make valid UTF-8 together (`\\udcc3\\udc80`) become that character."""
    return to_bytes(text).decode("utf-8", "surrogateescape")


# ---- the two clients -------------------------------------------------------

def reference(argv, env, typed, now=NOW):
    """The reference client's `generate`, in-process: its stdout, or `exit N`."""
    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(typed or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            client.run(list(argv), dict(env), now)
    except client.RotatorError as exc:
        return "exit %d" % exc.code
    except SystemExit as exc:
        return "exit %s" % (exc.code if isinstance(exc.code, int) else 1)
    finally:
        sys.stdin = saved
    return out.getvalue().strip()


def clean_room(program, argv, env, typed, now=NOW):
    """krgen as a process: its stdout, or `exit N` (checking that a refusal is
    one `error: ` line on stderr and nothing on stdout)."""
    environ = {b"KRGEN_NOW": str(now).encode()}
    environ.update({to_bytes(k): to_bytes(v) for k, v in env.items()})
    result = subprocess.run([program.encode()] + [to_bytes(a) for a in argv], env=environ,
                            input=(typed or "").encode("utf-8"), capture_output=True,
                            timeout=30)
    if result.returncode:
        assert result.stdout == b"", (argv, env, result.stdout)
        lines = result.stderr.decode("utf-8", "replace").splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, env, lines)
        return "exit %d" % result.returncode
    return result.stdout.decode("utf-8", "surrogateescape").strip()


def comparable(argv, output):
    """--format json compares as parsed JSON (the SPEC fixes its fields, not
    its spacing)."""
    fmt = [a.split("=", 1)[1] if a.startswith("--format=") else argv[i + 1]
           for i, a in enumerate(argv) if a.startswith("--format") and
           (a.startswith("--format=") or i + 1 < len(argv))]
    if fmt and fmt[-1] == "json" and not output.startswith("exit"):
        try:
            return json.loads(output)
        except ValueError:
            return output
    return output


# ---- 1. the SPEC's validation vectors --------------------------------------
# The rows as tests/test_validation_vectors.py reads them from docs/SPEC.md,
# with the client's result only (krgen is a client).

SPEC_ROWS = [pytest.param(*row.values[1:5], id=row.id) for row in VECTOR_ROWS]


def test_table_parsed():
    assert len(SPEC_ROWS) >= 100


@pytest.mark.parametrize("argv, overrides, typed, expected", SPEC_ROWS)
def test_validation_vector(krgen, tmp_path, argv, overrides, typed, expected):
    env = environment(overrides, str(tmp_path))
    assert clean_room(krgen, argv, env, typed) == expected


# ---- 2. random inputs --------------------------------------------------------

def door_key(door):
    """SPEC "Settings of a door": <NAME> of a door name."""
    name = door[:-len("_ROTATOR")] if door.endswith("_ROTATOR") else door
    return "".join(c.upper() if c.isascii() and c.isalnum() else "_" for c in name)


def setting_of(env, door, name):
    """SPEC "Settings of a door": the door's own variable, else the general one."""
    own = "KNOCKD_ROTATOR_%s_%s" % (name, door_key(door))
    return env[own] if own in env else env.get("KNOCKD_ROTATOR_" + name)


WORDS = ["ssh", "alice_ssh", "web", "a b", "d\u00e9j\u00e0-vu", "\u670d\u52a1", "x", "SSH", "Ssh",
         "a.b", "1", "ssh_rotator", "ssh_ROTATOR_ROTATOR", "_", "a/b", "a=b", "a#b", "a;b", "*"]
# Allowed in a door name, assigned or not (SPEC "Door names").
GOOD_CHARS = ["\u00a0", "\u200b", "\ue000", "\u0378", "\ufeff", "\ufffd", "\uffff",
              "\U0010ffff", "\U0001f600", "\ud7ff", " ", "\u00e9", "\u670d", "_", "-", "=", "#",
              "\u00a0", "\u00ff", "\u0100", "\u2027", "\u202a", "\u00a1", "~",
              "\U000e0001", "\U0010fffd"]
# Refused: C0, DEL and C1 controls, brackets, line and paragraph separators,
# and bytes that are not UTF-8 (lone surrogates: surrogateescape).
BAD_CHARS = ["\u0001", "\u001f", "\t", "\n", "\r", "\u007f", "\u0080", "\u0085", "\u009f",
             "[", "]", "\u2028", "\u2029", "\udcff", "\udc80", "\udcc3", "\udced\udca0\udc80",
             "\udcc0\udcaf", "\udcf4\udc90\udc80\udc80", "\udce2\udc82", "\udcf8\udc88\udc80"]


def random_door(rng, bad):
    """A SERVICE word: BAD is the chance of an input meant to be refused."""
    kind = rng.random()
    hostile = rng.random() < bad
    if kind < 0.5:
        word = rng.choice(WORDS if rng.random() < 0.3 else WORDS[:9])
    elif kind < 0.75:
        chars = GOOD_CHARS + list("abcXYZ09_") + (BAD_CHARS if hostile else [])
        word = "".join(rng.choice(chars) for _ in range(rng.randint(1, 5)))
    elif kind < 0.95:   # around knockd's 127 bytes
        char = rng.choice(["x", "\u00e9", "\u670d", "\U0001f600", "\u00a0"])
        limit = rng.randint(118, 131) if hostile else rng.randint(110, 127)
        word = ""
        while len(to_bytes(word + char + "_ROTATOR")) <= limit:
            word += char
        word += rng.choice(["", "x"]) if hostile else ""
    else:
        word = rng.choice(["", "_ROTATOR", "ROTATOR", "_ROTATO"]) if hostile else "_ROTATOR"
    if word and rng.random() < 0.2:
        word += "_ROTATOR"
    if word.startswith("-"):    # SPEC "Command line": outside the contract
        word = "x" + word
    return word


# Bytes that are not UTF-8, all different (SPEC "Text": one character each).
BYTES = "".join(chr(0xdc80 + i) for i in range(40))
# At least 128 bits by SPEC "Secret strength" (the unit's length, in
# characters, times the bits of the smallest alphabet), and fewer.
EMOJI = "\U0001f600\U0001f601\U0001f602\U0001f603\U0001f604\U0001f605"
ACCENTS = "\u00e9\u00e8\u00ea\u00eb\u00e0\u00e2"
# A secret whose bytes repeat and whose characters do not: (AC, a-j, E2 82)
# 3 times reads AC, a-j, the euro sign, a-j, the euro sign, a-j, E2, 82.
BYTES_REPEAT = "\udcacabcdefghij\u20acabcdefghij\u20acabcdefghij\udce2\udc82"
STRONG = ["example-secret-0123-abcdefghij", "kJ8sQ2pL9xV4mN7bR1tY6wZ3",
          "s\u00e9cret-\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9-0123456", ACCENTS * 4 + "x",
          "a b c d e f g h i j k l", "0123456789abcdef0123456789ABCDEF",
          "123456789012345678901234567890123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
          "abcdefghijklmnopqrstuvwxyzab", "thequickbrownfoxjumpsoverlaz", "abcdef" * 5 + "abcdeg",
          "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJA", BYTES[:22], "ABCDEFABCDEFABCDEFABCDEFABCDEFAB",
          "A2345677ABCDEFGHIJKLMNOPQR====", "23456=" * 4 + "AB", EMOJI * 4 + "!",
          "\udce2\udc82\u00e9\u00e8" * 5 + "x\udcff", "abcdefghijklmnopqrstuvwxyz0123456789-_",
          BYTES_REPEAT, "\t\n\r !\"#$%&'()*+,-./:;<=>?@[]^_`{|}~", "\udce9" + ACCENTS[:5] * 5,
          "kJ8sQ2pL9xV4mN7bR1tY6wZ3" * 200 + "k", ACCENTS * 500 + "x"]
WEAK = ["short", "Autumn2025!!", "0123456789abcdef0123456789ABCDE", "1" * 39,
        "ABCDEFGHIJKLMNOPQRSTUVWXY", "abcdefghijklmnopqrstu", "\u00e9" * 22, "legacy-s-1",
        "legacy-s1", "x", BYTES[:21], "\udcff" * 22, "ABCDEFABCDEFABCDEFABCDEFABCDEFA", "=" * 26,
        "\udce2\udc82" * 11 + "x", "0123456789", BYTES[:10], BYTES[:9], "aaaaa" + "b" * 40,
        "correcthorsebatterystaple", "thequickbrownfoxjumpsovrla", "abcdefedcbafabdcebfadcefbadc",
        "0123456789abcdef" * 2, "abcdef" * 6, "\udcacabcdefghij\u20ac" * 3,
        "abcdefghijklmnopqrstuv", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", "0123456789" * 4,
        "\udce9\u00e9" * 30, "12345678901234567890123456789012345678", "kJ8sQ2pL9xV4" * 400,
        "k" * 5000, ACCENTS * 500, "\U0001f600" * 22, " " * 22]
MALFORMED = ["", "-", "+10", " 10", "10 ", "1_0", "\u0661\u0660", "\uff11\uff10", "0x10", "1e1",
             "10.0", "000000000000000000010", "99999999999999999999", "-99999999999999999999",
             "100000000000000000000", "9" * 40, "--1", "1-", "\t10", "10\n", "\u00a010",
             "\u0661", "junk", "-00000000000000000000", "\udcff"]


def random_number(rng, good, wrong, bad):
    """A whole-number setting: GOOD values in range, WRONG ones out of it."""
    if rng.random() >= bad:
        value = rng.choice(good)
        return rng.choice([str(value)] * 4 + ["0" * rng.randint(1, 19 - len(str(value)) + 1)
                                               + str(value)] + (["-0"] if value == 0 else []))
    if rng.random() < 0.4:
        return str(rng.choice(wrong))
    return rng.choice(MALFORMED + ["00000000000000000010"])


def random_setting_values(rng, door, bad):
    """KNOCKD_ROTATOR_* overrides (value None unsets), general or the door's
    own, the general one now and then shadowed by a door's own."""
    key = door_key(door if door.endswith("_ROTATOR") else door + "_ROTATOR")
    env = {}

    def put(name, value):
        where = rng.random()
        if where < 0.6:
            env[name] = value
        elif where < 0.85:
            env[name + "_" + key] = value
        else:
            env[name] = rng.choice([value, "", "junk"])
            env[name + "_" + key] = value

    algorithm = rng.random()
    if algorithm < 0.12:
        put("ALGORITHM", rng.choice(["legacy-v1", "legacy-v3"]))
    elif algorithm < 0.16:
        put("ALGORITHM", rng.choice(["", "knockd-rotator/1"] * 3 +
                                    ["md5", "Legacy-v1", "legacy-v2", "knockd-rotator/1 ",
                                     "legacy_v1", "KNOCKD-ROTATOR/1"]))
    legacy = "legacy" in "".join(v for k, v in env.items() if k.startswith("ALGORITHM"))

    roll = rng.random()
    if roll < 1 - bad:
        put("SECRET", rng.choice(STRONG))
    elif roll < 1 - bad / 3:
        put("SECRET", rng.choice(WEAK))
    elif roll < 1 - bad / 6 or legacy:
        env["SECRET"] = None
        if legacy or rng.random() < 0.3:
            put("SALT", rng.choice(STRONG + WEAK[:3]))
    else:
        put("SECRET", "")
    if legacy and rng.random() < 0.2:
        put("SALT", rng.choice(STRONG + WEAK))

    if rng.random() < 0.15:
        put("MODE", rng.choice(["secret", "totp", "totp", ""] * 3 +
                               ["TOTP", "Secret", " totp", "secret\n"]))
    if rng.random() < (0.2 if not legacy else 0.3 * bad):
        put("PIN", rng.choice(["1234", "", "correct horse", " ", "p\u00efn", "\r", "0",
                               "\U0001f600", "1234\r", "\udcff\udcfe", "p" * 3000]))
    length_good = list(range(1, 33)) if legacy else list(range(10, 33))
    if rng.random() < 0.35:
        put("LENGTH", random_number(rng, length_good, [0, 33, 9, 1, 3, 100], bad))
    if rng.random() < 0.3:
        put("PORT_MODULO", random_number(rng, [0, 1, 2, 3, 7, 65535, 1000],
                                         [65536, -1, 100000], bad))
    periods = [21600, 30, 1, 2, 31622400, 60, 10, 86400, 3600, 7]
    if rng.random() < 0.3:
        put("PERIOD_MODULO", random_number(rng, periods, [0, 31622401, -30], bad))
    if rng.random() < 0.25:
        put("GRACE", random_number(rng, [0, 0, 1], [31, 10801, 15811201, -1], bad))
    if rng.random() < 0.2:
        put("SINGLE_USE", random_number(rng, [0, 1, 1], [2, -1, 10], bad))
    if legacy and rng.random() < 0.4:
        good = ["1-2", " 5000-6000 ,\t7000", "", "65535-65536", "65536,1", "3,2,1",
                "10-20,21-30", "1-1,2-2", "1-65536", "00007,8", "2000-65535", "443,22,80"]
        wrong = ["5000 - 6000", "\u00a05000-6000", "2000-3000,2500-4000", "7000", "0-5",
                 "1-65537", "+5,6", "5,6,", "10-20,20-30", "-5", "5-", "1,,2", " ", "6-5",
                 ",1,2", "1;2", "1-2-3", "\u0661-\u0662"]
        put("PORTS", rng.choice(good if rng.random() >= bad else wrong))
    if legacy and rng.random() < 0.3:
        put("PROTO_MODULO", random_number(rng, [0, 2, 3, 65535], [65536, -1], bad))
    return env


def random_offset(rng, period, bad, now):
    roll = rng.random()
    if roll < 0.5:
        return str(rng.choice([0, -1, 1, -3, 2, 100, -100000, -0]))
    if roll < 0.8 and period:
        top = INT64_MAX // period - now // period
        bottom = -(-INT64_MIN // period) - now // period
        return str(rng.choice([top, top + 1, top - 1, bottom, bottom - 1, bottom + 1]))
    if rng.random() >= bad:
        return rng.choice(["-0", "00000000000000000001", "-00000000000000000001", "427007964590499",
                           "-427007964747905"])
    return rng.choice(MALFORMED + ["427007964590500", "-427007964747906"])


NOWS = [NOW] * 6 + [0, -1, 1, 29, 30, -30, -31, 21599, 21600, -21601, 4102444800, 2 ** 62,
                    -2 ** 62, INT64_MAX, INT64_MIN + 1, 1111111109, 59]


VALUED = ("--offset", "--code", "--use", "--format")


def separable(option, value):
    """May VALUE follow OPTION as a word of its own (`--name value`)? SPEC
    "Command line": not when it begins with `-`, but for `--code -` and a
    whole number given to `--offset` or `--use`; else `--name=value`."""
    return (not value.startswith("-") or (option == "--code" and value == "-") or
            (option in ("--offset", "--use") and re.fullmatch(r"-[0-9]{1,20}", value)))


def random_case(rng):
    """(argv, environment, typed, now) for one run: about half of them meant to
    be accepted, the rest with one or more inputs meant to be refused."""
    now = rng.choice(NOWS) if rng.random() < 0.7 else rng.randint(-2 ** 40, 2 ** 40)
    bad = rng.choice([0.0, 0.0, 0.02, 0.1, 0.3, 0.6])
    door = random_door(rng, bad)
    overrides = random_setting_values(rng, door, bad)
    env = {"KNOCKD_ROTATOR_SECRET": BASE_SECRET}
    for name, value in overrides.items():
        if value is None:
            env.pop("KNOCKD_ROTATOR_" + name, None)
        else:
            env["KNOCKD_ROTATOR_" + name] = value
    door_name = door if door.endswith("_ROTATOR") else door + "_ROTATOR"
    period = setting_of(env, door_name, "PERIOD_MODULO")
    if period is None:
        period = 21600
    else:
        period = int(period) if re.fullmatch(r"-?[0-9]{1,20}", period) and int(period) > 0 \
            else None
    options = []
    typed_lines = []

    def ending():
        return rng.choice(["\n"] * 4 + ["\r\n"] * 2 + ["\r\r\n", "", "\n\n", "\nrest\n", "\r",
                                                        "\n\r\n"])

    if rng.random() < 0.3:
        options.append(["--offset", random_offset(rng, period, bad, now)])
    single_use = setting_of(env, door_name, "SINGLE_USE") in ("1", "01", "001")
    if rng.random() < (0.5 if single_use else 0.1 * bad):
        good = ["0", "1", "7", "4294967295", "-0", "00000000004294967295", "2"]
        wrong = ["4294967296", "+1", "-1", "", "1.0", "99999999999999999999", "junk"]
        options.append(["--use", rng.choice(good if rng.random() >= bad else wrong)])
    if rng.random() < 0.12:
        options.append(["--pin"])
        typed_lines.append(rng.choice(["1234", " 1234", "correct horse", "1234\r", "p\u00efn",
                                       "\t", "4711", "\u00e9\u00e9"] + [""] * (bad > 0)) +
                           ending())
    code_roll = rng.random()
    if code_roll < 0.1:
        good = ["921300", "921 300 ", " 921300", "000000", "   9 2 1 3 0 0   ", "081804"]
        wrong = ["92130", "9213000", "\uff19\uff12\uff11\uff13\uff10\uff10", "", "92130a",
                 "921\t300", "-1", "-x", "\u00a0921300", "921300\n", "\u0669\u0662\u0661\u0663"
                 "\u0660\u0660"]
        options.append(["--code", rng.choice(good if rng.random() >= bad else wrong)])
    elif code_roll < 0.15:
        options.append(["--code", "-"])
        typed_lines.append(rng.choice(["921300", "921 300", " 921300 "] +
                                      (["", "92130", "92l300"] if bad else [])) + ending())
    if code_roll < 0.15 and rng.random() < 0.5:
        env["KNOCKD_ROTATOR_MODE"] = rng.choice(["totp", "totp", ""] + ["secret"] * (bad > 0))
    if rng.random() < 0.1:
        options.append(["--format", rng.choice(["knockd", "knock", "json"] +
                                               (["JSON", "", "xml"] if bad else []))])
    rng.shuffle(options)
    argv = []
    for option in options:
        if len(option) == 2 and (rng.random() < 0.3 or not separable(*option)):
            argv.append(option[0] + "=" + option[1])
        else:
            argv.extend(option)
    if rng.random() < bad * 0.3:    # a command line that is wrong as a whole
        junk = rng.choice([["--delay", "5"], ["--check", "22"], ["--bogus"], ["--pin=1"],
                           ["--pin="], ["extra"], ["--PIN"], ["--off=-1"], ["--form", "json"],
                           ["--offset", "1", "--offset", "x"], ["--format=xml", "--format=json"]])
        at = rng.choice([0, len(argv)])
        argv[at:at] = junk
        if rng.random() < 0.2:  # an option last on the line, without its value
            argv.append(rng.choice(VALUED))
    where = rng.randint(0, len(argv)) if argv and rng.random() < 0.3 else len(argv)
    while 0 < where < len(argv) and argv[where - 1] in VALUED:
        where += 1
    argv.insert(where, door)
    # --pin and --code - together: two lines, the PIN's first (see AGREED_CASES).
    typed = "".join(line if line.endswith("\n") else line + "\n" for line in typed_lines[:-1])
    typed += typed_lines[-1] if typed_lines else ""
    command = rng.choice(["generate"] * 8 + ["gen", "g", "generat"] +
                         (["Generate", "generates", "x", ""] if bad else []))
    return ([as_read(word) for word in [command] + argv],
            {as_read(k): as_read(v) for k, v in env.items()},
            typed if typed_lines else None, now)


def describe(argv, env, typed, now):
    return "argv=%r env=%r typed=%r now=%d" % (
        argv, {k[len("KNOCKD_ROTATOR_"):]: v for k, v in env.items()
               if k != "KNOCKD_ROTATOR_USES_FILE"}, typed, now)


# Places where the SPEC was silent, loose or ambiguous and both clients read
# it alike (some the SPEC has since made precise: it is named), kept here so
# that a change in either shows.
AGREED_CASES = [
    # --pin and --code - both typed: which line is which (the PIN first)?
    (["generate", "ssh", "--code", "-", "--pin"], {"MODE": "totp"}, "4711\n921300\n"),
    (["generate", "ssh", "--pin", "--code", "-"], {"MODE": "totp"}, "4711\n921300\n"),
    # --pin and KNOCKD_ROTATOR_PIN both: the typed one wins.
    (["generate", "ssh", "--pin"], {"PIN": "9999"}, "1234\n"),
    # an option given twice: the last one counts, but every value given is
    # checked at step 1 (SPEC "Command line"), a code at step 4, the last one.
    (["generate", "ssh", "--offset", "1", "--offset", "-1"], {}, None),
    (["generate", "ssh", "--offset", "x", "--offset", "-1"], {}, None),
    (["generate", "ssh", "--format", "xml", "--format", "knock"], {}, None),
    (["generate", "ssh", "--use", "+1", "--use", "1"], {"SINGLE_USE": "1"}, None),
    (["generate", "ssh", "--code", "1", "--code", "921300"], {"MODE": "totp"}, None),
    # no abbreviated options; the command word may be a prefix (SPEC
    # "Command line").
    (["generate", "ssh", "--off=-1"], {}, None),
    (["generate", "ssh", "--form", "json"], {}, None),
    (["gen", "ssh"], {}, None),
    (["g", "ssh"], {}, None),
    (["Gen", "ssh"], {}, None),
    # `--pin` takes no value; `--name=value` carries any value.
    (["generate", "ssh", "--pin="], {}, "1234\n"),
    (["generate", "ssh", "--code=-x"], {"MODE": "totp"}, None),
    (["generate", "ssh", "--offset=--1"], {}, None),
    # an option last on the line without its value; a second SERVICE.
    (["generate", "ssh", "--code"], {"MODE": "totp"}, None),
    (["generate", "ssh", "web"], {}, None),
    # `--code=-` types the code as `--code -` does.
    (["generate", "ssh", "--code=-"], {"MODE": "totp"}, "921300\n"),
    # a legacy door given a code: in totp mode when its MODE is unset or
    # empty, so refused at step 3 (exit 3); with MODE secret, a code for a
    # door not in totp mode (step 4, exit 2). SPEC "No PIN, totp mode or
    # single use on legacy doors".
    (["generate", "ssh", "--code", "921300"], {"ALGORITHM": "legacy-v1"}, None),
    (["generate", "ssh", "--code", "921300"], {"ALGORITHM_SSH": "legacy-v3", "MODE": ""}, None),
    (["generate", "ssh", "--code", "x"], {"ALGORITHM": "legacy-v3", "LENGTH": "1"}, None),
    (["generate", "ssh", "--code", "-"], {"ALGORITHM": "legacy-v1", "MODE_SSH": ""}, "921300\n"),
    (["generate", "ssh", "--code", "921300"], {"ALGORITHM": "legacy-v1", "MODE": "secret"},
     None),
    (["generate", "ssh", "--code", "921300"], {"ALGORITHM": "legacy-v1", "SINGLE_USE": "x"},
     None),
    # the door `_ROTATOR`: an empty <NAME>, its own variables end in `_`.
    (["generate", "_ROTATOR"], {"LENGTH_": "12"}, None),
    # --use 0 on a door without single use is refused too.
    (["generate", "ssh", "--use", "0"], {}, None),
    # PROTO_MODULO's range (the SPEC gives none): PORT_MODULO's.
    (["generate", "ssh"], {"ALGORITHM": "legacy-v3", "PROTO_MODULO": "65536"}, None),
    (["generate", "ssh"], {"ALGORITHM": "legacy-v3", "PROTO_MODULO": "65535"}, None),
    # PORTS and PROTO_MODULO are not read on other doors; PORT_MODULO is not
    # read when PROTO_MODULO is set.
    (["generate", "ssh"], {"PORTS": "junk", "PROTO_MODULO": "junk"}, None),
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "PORTS": "junk", "PROTO_MODULO": "x"}, None),
    (["generate", "ssh"], {"ALGORITHM": "legacy-v3", "PROTO_MODULO": "2", "PORT_MODULO": "x"},
     None),
    # a legacy door whose SECRET is set but empty does not fall back to SALT.
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "SECRET": "", "SALT": "legacy-salt-1"},
     None),
    # SALT is per door too; the general SECRET still wins over a door's SALT.
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "SALT_SSH": "legacy-salt-1"}, None),
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "SECRET": None,
                           "SALT_SSH": "legacy-salt-1"}, None),
    # a legacy door's empty PIN, MODE secret, SINGLE_USE 0 are no error.
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "PIN": "", "MODE": "secret",
                           "SINGLE_USE": "0"}, None),
    # totp: GRACE against period 30; a door's own PERIOD_MODULO 030 is 30.
    (["generate", "ssh", "--code", "921300"], {"GRACE": "16"}, None),
    (["generate", "ssh", "--code", "921300"], {"GRACE": "15", "PERIOD_MODULO_SSH": "030"},
     None),
    # legacy-v3's fallback period.
    (["generate", "ssh"], {"ALGORITHM": "legacy-v3", "PORTS": "65535-65536", "LENGTH": "1"},
     None),
    # secrets of bytes that are not UTF-8 (SPEC "Text", "Secret strength"):
    # 22 different ones, one byte 22 times, an encoded surrogate as 3 bytes.
    (["generate", "ssh"], {"SECRET": BYTES[:22]}, None),
    (["generate", "ssh"], {"SECRET": BYTES[:21]}, None),
    (["generate", "ssh"], {"SECRET": "\udcff" * 22}, None),
    (["generate", "ssh"], {"SECRET": "\udced\udca0\udc80abcdefghijklmnopqrs"}, None),
    (["generate", "ssh"], {"ALGORITHM": "legacy-v1", "SECRET": "\udced\udca0\udc80abcdefg"},
     None),
    # JSON, with a period end past 64 bits.
    (["generate", "ssh", "--format", "json", "--offset", "427007964590499"], {}, None),
    (["generate", "d\u00e9j\u00e0 \"q\"\\", "--format=json"], {}, None),
]


@pytest.mark.parametrize("argv, overrides, typed", AGREED_CASES,
                         ids=["%d %s" % (i, " ".join(c[0][1:])) for i, c in
                              enumerate(AGREED_CASES)])
def test_silent_spec_read_alike(krgen, tmp_path, argv, overrides, typed):
    env = environment(overrides, str(tmp_path))
    assert comparable(argv, clean_room(krgen, argv, env, typed)) == \
        comparable(argv, reference(argv, env, typed))


def test_random_inputs_agree(krgen, tmp_path):
    rng = random.Random(SEED)
    uses = str(tmp_path / "no-uses.json")
    agreed, disagreements, accepted = 0, [], 0
    started = time.monotonic()
    rounds = in_fast_tier(ROUNDS, ROUNDS // 4)
    for _ in range(rounds):
        argv, env, typed, now = random_case(rng)
        env["KNOCKD_ROTATOR_USES_FILE"] = uses
        want = comparable(argv, reference(argv, env, typed, now))
        if os.path.exists(uses):
            os.unlink(uses)
        got = comparable(argv, clean_room(krgen, argv, env, typed, now))
        if want == got:
            agreed += 1
            accepted += not str(want).startswith("exit")
        else:
            disagreements.append("%s\n    reference: %s\n    krgen:     %s"
                                 % (describe(argv, env, typed, now), want, got))
    print("\nclean room: %d of %d random inputs agree (%.2f%%; %d accepted), in %.1f s"
          % (agreed, rounds, 100.0 * agreed / rounds, accepted, time.monotonic() - started))
    assert not disagreements, "\n".join(disagreements[:40])


# ---- 3. real processes: bytes that in-process calls cannot carry ------------

# The SPEC's "Text" rule reads the environment and the command line as bytes;
# it says nothing of bytes typed on standard input that are not UTF-8 (nor of
# a NUL byte there). Both clients take such a PIN's bytes as they are, and
# refuse such a code.
PROCESS_CASES = [
    (["generate", "ssh", "--pin"], {}, b"\xff\xfe1234\n"),
    (["generate", "ssh", "--pin"], {}, b"1234\xff\r\n"),
    (["generate", "ssh", "--pin"], {}, b"\xed\xa0\x80\n"),
    (["generate", "ssh", "--pin"], {}, b"12\x0034\n"),
    (["generate", "ssh", "--pin"], {}, b"\xc3\xa9\n"),
    (["generate", "ssh", "--code", "-"], {"MODE": "totp"}, b"921300\xff\n"),
    (["generate", "ssh", "--code", "-"], {"MODE": "totp"}, b"921\x00300\n"),
    (["generate", "ssh", "--code", "-"], {"MODE": "totp"}, b"921300\n"),
    (["generate", "a\udcffb"], {}, b""),
    (["generate", "ssh"], {"SECRET": BYTES[:22]}, b""),
    (["generate", "ssh"], {"SECRET": BYTES[:21]}, b""),
    (["generate", "ssh"], {"SECRET": "\udcff" * 22}, b""),
    (["generate", "ssh"], {"SECRET": BYTES_REPEAT}, b""),
    (["generate", "ssh"], {"PIN": "\udcff\udcfe"}, b""),
    (["generate", "\u00e9t\u00e9"], {"SECRET_\u00c9T\u00c9": "x", "SECRET__T_": BASE_SECRET},
     b""),
]


@pytest.mark.parametrize("argv, overrides, typed", PROCESS_CASES,
                         ids=["%d" % i for i in range(len(PROCESS_CASES))])
def test_real_processes_agree(krgen, tmp_path, argv, overrides, typed):
    """Both as processes, krgen on the reference's clock (a period of a year,
    run again if a boundary fell between the two)."""
    env = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C.UTF-8"}
    env.update({to_bytes(k): to_bytes(v) for k, v in
                environment(dict(overrides, PERIOD_MODULO="31622400"), str(tmp_path)).items()})
    for _ in range(3):
        before = int(time.time()) // 31622400
        reference_run = subprocess.run([sys.executable.encode(), str(ROOT).encode() +
                                        b"/knockd_rotator_client.py"] + [to_bytes(a) for a in argv],
                                       env=env, input=typed, capture_output=True, timeout=60)
        now = int(time.time())
        krgen_run = subprocess.run([krgen.encode()] + [to_bytes(a) for a in argv],
                                   env=dict(env, KRGEN_NOW=str(now).encode()), input=typed,
                                   capture_output=True, timeout=60)
        if before == now // 31622400:
            break
    assert b"Traceback" not in reference_run.stderr
    assert (krgen_run.returncode, krgen_run.stdout) == \
        (reference_run.returncode, reference_run.stdout), krgen_run.stderr
