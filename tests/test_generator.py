"""Properties of the shared generator over many draws."""

import itertools

import pytest

import knockd_rotator_client as client

SECRET = b"property-test-secret"


def draws(count, length, port_modulo=0, door="ssh_ROTATOR", period=30):
    for index in range(count):
        yield client.generate_sequence(SECRET, door, index * period, length, port_modulo)


def test_ports_are_uniform_over_2000_to_65535():
    """Chi-square over 64 nearly equal bins; modulo bias would load the low bins."""
    bins = 64
    counts = [0] * bins
    for sequence in draws(6000, 10):
        for port, _ in sequence:
            assert client.MIN_PORT <= port <= client.MAX_PORT
            counts[(port - client.MIN_PORT) * bins // client.PORT_SPAN] += 1
    total = sum(counts)
    sizes = [sum(1 for v in range(client.PORT_SPAN) if v * bins // client.PORT_SPAN == b)
             for b in range(bins)]
    chi_square = sum((counts[b] - total * sizes[b] / client.PORT_SPAN) ** 2
                     / (total * sizes[b] / client.PORT_SPAN) for b in range(bins))
    assert chi_square < 103.4, "p < 0.001 for 63 degrees of freedom"


def test_modulo_bias_would_be_caught():
    """The chi-square test above is sharp enough to see `v % 63536`."""
    bins = 64
    counts = [0] * bins
    values = [(a * 7919 + 13) % 65536 for a in range(60000)]
    for v in values:
        counts[(v % client.PORT_SPAN) * bins // client.PORT_SPAN] += 1
    expected = len(values) / bins
    assert sum((c - expected) ** 2 / expected for c in counts) > 103.4


@pytest.mark.parametrize("length", [2, 3, 10, 32])
def test_no_port_repeats(length):
    for sequence in draws(1500, length):
        ports = [p for p, _ in sequence]
        assert len(ports) == length and len(set(ports)) == length


@pytest.mark.parametrize("length", [3, 4, 10])
def test_never_monotonic(length):
    for sequence in draws(3000, length):
        ports = [p for p, _ in sequence]
        assert ports != sorted(ports) and ports != sorted(ports, reverse=True)


@pytest.mark.parametrize("modulo", [0, 1, 2, 3, 7, 1000, 65535])
def test_protocol_follows_the_modulo_rule(modulo):
    for sequence in draws(300, 10, modulo):
        for port, protocol in sequence:
            tcp = modulo == 0 or port % modulo == 0
            assert protocol == ("tcp" if tcp else "udp")


def test_the_modulo_only_changes_protocols():
    for plain, mixed in zip(draws(100, 10, 0), draws(100, 10, 3)):
        assert [p for p, _ in plain] == [p for p, _ in mixed]


@pytest.mark.parametrize("period", [1, 10, 30, 21600, 86400])
def test_period_boundaries_and_offsets(period):
    for start in (0, period * 56666, -period * 3):
        assert client.period_start(start, period) == start
        assert client.period_start(start + period - 1, period) == start
        assert client.period_start(start + period - 0.5, period) == start
        assert client.period_start(start + period, period) == start + period
        assert client.period_start(start - 1, period) == start - period
        for offset in (-2, -1, 1, 5):
            assert client.period_start(start, period, offset) == start + offset * period


def test_sequences_differ_by_period_door_and_secret():
    base = client.generate_sequence(SECRET, "ssh_ROTATOR", 0, 10, 0)
    assert client.generate_sequence(SECRET, "ssh_ROTATOR", 30, 10, 0) != base
    assert client.generate_sequence(SECRET, "web_ROTATOR", 0, 10, 0) != base
    assert client.generate_sequence(SECRET + b"x", "ssh_ROTATOR", 0, 10, 0) != base
    assert client.generate_sequence(SECRET, "ssh_ROTATOR", 0, 10, 0) == base


def test_door_name_appends_suffix_once():
    assert client.door_name("ssh") == "ssh_ROTATOR"
    assert client.door_name("ssh_ROTATOR") == "ssh_ROTATOR"
    assert client.door_name("ssh_rotator") == "ssh_rotator_ROTATOR"


def test_period_start_out_of_int64_is_an_error():
    with pytest.raises(client.RotatorError):
        client.generate_sequence(SECRET, "ssh_ROTATOR", 2 ** 63, 10, 0)
    assert client.generate_sequence(SECRET, "ssh_ROTATOR", -(2 ** 63), 3, 0)


@pytest.mark.parametrize("word,expected", [("generate", "generate"), ("gen", "generate"),
                                           ("g", "generate"), ("kn", "knock")])
def test_unique_prefixes_resolve(word, expected):
    assert client.resolve_command(word, client.COMMANDS) == expected


def test_ambiguous_prefix_lists_the_choices():
    with pytest.raises(client.RotatorError) as error:
        client.resolve_command("st", ("status", "start", "check"))
    assert "ambiguous" in str(error.value) and "status, start" in str(error.value)


def settings_tuple(environ, door="ssh_ROTATOR"):
    settings = client.read_settings(environ, door)
    return (client.secret_bytes(settings), settings.length, settings.port_modulo,
            settings.period)


def test_settings_defaults_and_ranges():
    env = {"KNOCKD_ROTATOR_SECRET": "0123456789abcdeffedcba9876543210"}
    assert settings_tuple(env) == (b"0123456789abcdeffedcba9876543210", 10, 0, 21600)
    for name, good, bad in [("LENGTH", ["10", "32"],
                             ["0", "9", "33", "", "x", "1.5", "-1", "9" * 40]),
                            ("PORT_MODULO", ["0", "65535"], ["-1", "65536", " 3", "0x10"]),
                            ("PERIOD_MODULO", ["1", "31622400"], ["0", "31622401", "١٠"])]:
        for value in good:
            settings_tuple(dict(env, **{"KNOCKD_ROTATOR_" + name: value}))
        for value in bad:
            with pytest.raises(client.RotatorError) as error:
                settings_tuple(dict(env, **{"KNOCKD_ROTATOR_" + name: value}))
            assert error.value.code == client.EXIT_ENVIRONMENT
            assert "KNOCKD_ROTATOR_" + name in str(error.value)
    legacy = dict(env, KNOCKD_ROTATOR_ALGORITHM="legacy-v1", KNOCKD_ROTATOR_SECRET="0123456789")
    assert settings_tuple(dict(legacy, KNOCKD_ROTATOR_LENGTH="1"))[:2] == (b"0123456789", 1)
    for secret in [None, "", "short", "Autumn2025!!", "0123456789abcdef0123456789abcde"]:
        broken = {} if secret is None else {"KNOCKD_ROTATOR_SECRET": secret}
        with pytest.raises(client.RotatorError, match="KNOCKD_ROTATOR_SECRET"):
            settings_tuple(broken)


def test_all_pairs_of_small_lengths_and_modulos_are_valid():
    for length, modulo in itertools.product(range(1, 33), (0, 2, 5)):
        sequence = client.generate_sequence(SECRET, "x_ROTATOR", 1234 * 60, length, modulo)
        assert len(sequence) == length
