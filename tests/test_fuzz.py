"""Property tests over generated knockd.conf texts (hypothesis, dev only).

Texts mix comments, blank lines, sections ([options] in any case, rotator
doors, static doors, odd names), directives with keys in any case and
arbitrary values, unicode, CRLF line endings and a missing final newline.
For each text, a rotation at a moment out of the grace and one inside it:

  - raises nothing but RotatorError;
  - when it accepts the file, changes no byte outside the sequence values of
    rotator doors (and the grace block, which is removed exactly);
  - a second rotation at the same moment changes nothing;
  - door_count, from the header lines alone, counts what door_load does.
"""

import pytest

from knockd_rotator.core import generator
from knockd_rotator.core import plan as core_plan
from knockd_rotator.engines.knockd import config
from knockd_rotator.engines.knockd import instances
from knockd_rotator.engines.knockd import render as knockd_render
from conftest import in_fast_tier, need

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:          # tests/run installs python3-hypothesis
    given = None

EXAMPLES = in_fast_tier(10000, 1000)
PERIOD, GRACE = 3600, 30
AFTER_GRACE = 1767225600 + 100     # a period start + 100 s
IN_GRACE = AFTER_GRACE + PERIOD - 100 + 10
SECRET = b"fuzz-secret-0123"


def settings_of(door):
    """Every door with the same period and grace, no lead, no single use,
    sequences from SECRET."""
    return generator.DoorSettings(
        period=PERIOD, grace=GRACE, lead=0, single_use=False, sequence_at=lambda start, use=0: (
            generator.format_sequence(generator.generate_sequence(SECRET, door, start, 4, 3)).encode()))


if given:
    spaces = st.sampled_from(["", " ", "\t", "  ", " \t "])
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                          blacklist_characters="\n\r\x00"), max_size=30)
    names = st.one_of(st.sampled_from(["ssh_ROTATOR", "web_ROTATOR", "x_ROTATOR_GRACE",
                                       "openSSH", "options", "Options", "OPTIONS", "",
                                       "d\u00e9j\u00e0_ROTATOR", " spaced_ROTATOR "]),
                      text.map(lambda t: t.replace("]", "") + "_ROTATOR"), text)
    keys = st.sampled_from(["sequence", "SEQUENCE", "Sequence", "seq_timeout", "command",
                            "start_command", "stop_command", "cmd_timeout", "tcpflags",
                            "one_time_sequences", "logfile", "unknown", "SeQuEnCe"])
    values = st.one_of(st.sampled_from(["1", "7000,8000,9000", "7000 8000", "syn,ack", "syn, ack",
                                        "true", "", "70000", "1:udp,2:tcp", "abc", "5 # x"]),
                       text)
    any_directive = st.tuples(spaces, keys, spaces, spaces, values, spaces).map(
        lambda p: p[0] + p[1] + p[2] + "=" + p[3] + p[4] + p[5])
    good_directive = st.one_of(
        st.tuples(spaces, st.sampled_from(["sequence", "SEQUENCE", "Sequence"]), spaces,
                  st.sampled_from(["1", "7000,9000,8000", "1:udp,2:tcp", "2:UDP"])),
        st.tuples(spaces, st.sampled_from(["command", "START_COMMAND", "stop_command"]),
                  spaces, text),
        st.tuples(spaces, st.sampled_from(["seq_timeout", "Cmd_Timeout"]), spaces,
                  st.integers(0, 99999).map(str)),
    ).map(lambda p: p[0] + p[1] + p[2] + "=" + p[2] + p[3])
    comment = st.tuples(spaces, text).map(lambda p: p[0] + "#" + p[1])
    header = st.tuples(spaces, names, spaces).map(lambda p: p[0] + "[" + p[1] + "]" + p[2])
    # Mostly lines knockd takes, so that most files reach the rewrite.
    line = st.one_of(good_directive, good_directive, good_directive, comment, spaces, header,
                     any_directive, st.just("USESYSLOG"))
    first = st.sampled_from(["[ssh_ROTATOR]", "[options]", "[web_ROTATOR]", "[openSSH]"])
    files = st.tuples(first, st.lists(st.tuples(line, st.sampled_from(["\n", "\r\n"])),
                                      max_size=25), st.booleans()).map(
        lambda p: (p[0] + "\n" + "".join(l + end for l, end in p[1])).rstrip(
            "" if p[2] else "\r\n").encode("utf-8"))


def plan(data, now):
    """plan_rotation's result, or None when it refuses the file."""
    try:
        result = knockd_render.plan_rotation("knockd.conf", data, now, settings_of)
    except generator.RotatorError:
        return None
    return None if result.errors else result


def data_of(lines):
    return b"".join(line.raw for line in lines)


def check_text(data):
    after = plan(data, AFTER_GRACE)
    if after is None:
        return
    new = data_of(after.new_lines)
    # Outside the sequence values of rotator doors, every byte is kept.
    user = after.user_lines
    kept = [line for line in after.new_lines if not (
        line.is_sequence and core_plan.is_rotator(line.section) and
        line.number not in {old.number for old in user if old.is_sequence})]
    assert len(kept) == len(user)
    for old, line in zip(user, kept):
        if old.is_sequence and core_plan.is_rotator(old.section):
            assert line.raw[:line.span[0]] == old.raw[:old.span[0]]
            assert line.raw[line.span[1]:] == old.raw[old.span[1]:]
        elif line.raw != old.raw:
            # A rotator door without a sequence gets one after its header;
            # a header that ended the file without a newline needs one.
            assert line.kind == "section" and core_plan.is_rotator(line.section)
            assert line.raw == old.raw + b"\n" and old is user[-1]
    # Idempotent.
    assert data_of(plan(new, AFTER_GRACE).new_lines) == new
    # The grace block comes and goes, and nothing else changes with it.
    during = plan(new, IN_GRACE)
    assert during is not None
    in_grace = data_of(during.new_lines)
    assert data_of(plan(in_grace, IN_GRACE).new_lines) == in_grace
    leaving = plan(in_grace, IN_GRACE + GRACE)
    expected = plan(new, IN_GRACE + GRACE)
    assert data_of(leaving.new_lines) == data_of(expected.new_lines)
    # add-client's count of a file's doors, from its header lines alone.
    for text in (data, new, in_grace):
        assert instances.door_count(text) == instances.door_load(config.parse_config(text))[0]


def test_fuzz_rewrites_are_byte_exact_and_idempotent():
    need(given, "needs hypothesis (Debian package python3-hypothesis; tests/run installs it)")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(files)
    def run(data):
        check_text(data)

    run()


@pytest.mark.parametrize("data", [
    # Found by the fuzz: a door name that reads as a group reference once
    # put into a regular expression's replacement.
    b"[ssh_ROTATOR]\n[\\2_ROTATOR]\nSTART_COMMAND=",
    b"[a\\g<0>_ROTATOR]\n\tstart_command = knockd_rotator_server.py burn a\\g<0>_ROTATOR\n",
])
def test_rewrites_found_by_the_fuzz(data):
    check_text(data)


@pytest.mark.parametrize("data", [
    b"[a]\0junk\n[b\0]\n\0[c]\n[d]  \0[e]\n",       # C strings end at a NUL
    b"[options]\n[ options ]\n[]\n[[x]]\n\t [y] \r\n",
])
def test_door_count_reads_headers_as_knockd_does(data):
    """Beyond the fuzz's texts, which have no NUL."""
    assert instances.door_count(data) == instances.door_load(config.parse_config(data))[0]


def test_the_checker_above_can_fail():
    """A rewrite that touched another byte would be caught."""
    data = b"[ssh_ROTATOR]\nsequence = 1\ncommand = true\n"
    check_text(data)
    original = config.rewrite_config

    def sloppy(lines, sequences):
        return config.parse_config(data_of(original(lines, sequences)).replace(b"true", b"tru"))

    config.rewrite_config = sloppy
    try:
        with pytest.raises(AssertionError):
            check_text(data)
    finally:
        config.rewrite_config = original
