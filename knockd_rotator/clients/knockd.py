"""add-client, remove-client, list-clients under the knockd engine: a door of
knockd.conf and its secret, PIN or TOTP secret, changed with the environment
file in one rotation.
"""

import os
import time

from knockd_rotator.clients.enrol import (
    check_enrolment, CLIENTS_LOCK, door_row, new_secrets, print_enrolment, print_table)
from knockd_rotator.clients.firewalls import (
    CLIENT_CMD_TIMEOUT, CLIENT_SEQ_TIMEOUT, firewall_commands)
from knockd_rotator.core.errors import EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE
from knockd_rotator.core.files import (
    private_fix, read_config, readable_by_others, replace_file, take_lock)
from knockd_rotator.core.generator import DOOR_SETTINGS, own_variable, ROTATOR_SUFFIX, RotatorError
from knockd_rotator.core.settings import (
    env_assignment, env_values, read_env_file, server_settings, with_env_file)
from knockd_rotator.core.uses import read_uses
from knockd_rotator.engines.knockd.burns import burn_command
from knockd_rotator.engines.knockd.config import (
    CLIENT_MARK, client_marks, numbered_lines, parse_config, rotator_doors, section_body,
    with_lines_appended)
from knockd_rotator.engines.knockd.grace import split_grace_block
from knockd_rotator.engines.knockd.instances import (
    client_file, knockd_files, place_client, settings_for)
from knockd_rotator.engines.knockd.reload import knockd_runs
from knockd_rotator.rotation import rotate
from knockd_rotator.scheduling import tell_next_event


def client_door_lines(name, door, commands, newline):
    """The raw lines of a new client door (its sequence comes with the rotation)."""
    start_command, stop_command, start_command_6, stop_command_6 = commands
    return [line.encode() + newline for line in [
        "",
        "%s%s: added by add-client; remove-client %s removes this door"
        % (CLIENT_MARK.decode(), name, name),
        "[%s]" % door,
        "    seq_timeout     = %d" % CLIENT_SEQ_TIMEOUT,
        "    tcpflags        = syn",
        "    start_command   = %s" % start_command,
        "    start_command_6 = %s" % start_command_6,
        "    cmd_timeout     = %d" % CLIENT_CMD_TIMEOUT,
        "    stop_command    = %s" % stop_command,
        "    stop_command_6  = %s" % stop_command_6]]


def without_client_door(lines, name, marks):
    """LINES without client NAME's comment line and door (and the blank line before)."""
    first = marks[name]
    header = first + 1
    if header >= len(lines) or lines[header].kind != "section":
        raise RotatorError("the comment line %d of client %s is not followed by its door"
                           % (lines[first].number, name),
                           "remove the door by hand, then the comment line", EXIT_CONFIG)
    body = section_body(lines, header)
    last = header + max([i + 1 for i, line in enumerate(body) if line.kind == "directive"],
                        default=0)
    if first > 0 and lines[first - 1].kind == "blank":
        first -= 1
    kept = lines[:first] + lines[last + 1:]
    return numbered_lines([(line.number, line.raw) for line in kept])


class EnvChange:
    """The change of knockd.conf's doors and of ENV_FILE that a rotation makes
    for add-client or remove-client (see rotate()).  PREPARE(lines, values)
    checks the change against the user's Lines of knockd.conf and ENV_FILE's
    values, under the lock; it returns (edit of the Lines, assignments to
    append, names to remove)."""

    def __init__(self, env_path, environ, prepare, adds):
        self.env_path, self.base_environ, self.checker = env_path, environ, prepare
        self.adds = adds         # True for add-client, False for remove-client
        self.old_env = self.new_env = None
        self.edit = self.environ = None

    def prepare(self, config_path, old_data):
        self.old_env = read_env_file(self.env_path)
        warning = readable_by_others(self.env_path)
        if warning:
            raise RotatorError("%s is readable by others, and would hold a client's secret"
                               % self.env_path, private_fix(self.env_path),
                               EXIT_ENVIRONMENT)
        if self.adds and readable_by_others(config_path):
            raise RotatorError("%s is readable by others, and would hold the client's live "
                               "sequences" % config_path, private_fix(config_path),
                               EXIT_CONFIG)
        user_lines, _ = split_grace_block(parse_config(old_data))
        values = env_values(self.old_env)
        self.edit, assignments, removals = self.checker(user_lines, values)
        kept = (self.old_env or b"").splitlines(True)
        if removals:
            kept = [raw for raw in kept if (env_assignment(raw) or ("",))[0] not in removals]
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\n"
        kept += [("%s=%s\n" % pair).encode() for pair in assignments]
        self.new_env = b"".join(kept)
        merged = {**self.base_environ, **values, **dict(assignments)}
        self.environ = {name: value for name, value in merged.items() if name not in removals}

    def write(self):
        replace_file(self.env_path, self.new_env, create=True)

    def undo(self):
        if self.old_env is None:
            os.unlink(self.env_path)
        else:
            replace_file(self.env_path, self.old_env)


def add_client(config_path, environ, now, args):
    """Enrol a client: a door of its own, a new secret, one rotation; then
    print what the client needs."""
    name = args.name
    door = "%s_%s%s" % (name, args.service, ROTATOR_SUFFIX)
    check_enrolment(args, environ)
    if args.firewall is None:
        raise RotatorError("add-client needs --firewall under the knockd engine: what opens "
                           "the port when knockd hears the knock",
                           "add --firewall iptables, nftables or ufw", EXIT_USAGE)
    commands = firewall_commands(args.firewall, args.port, environ)
    secret, assignments = new_secrets(args, door)
    settings = server_settings(environ)
    env_path = settings["ENV_FILE"]
    if args.single_use:
        assignments.append((own_variable("SINGLE_USE", door), "1"))

    def enrolled(lines):
        if name in client_marks(lines) or door in rotator_doors(lines):
            raise RotatorError("client %s is enrolled already" % name,
                               "remove-client %s first, or choose another name" % name,
                               EXIT_USAGE)

    def prepare(lines, values):
        enrolled(lines)
        taken = sorted({own_variable(s, door) for s in DOOR_SETTINGS} & set(values))
        if taken:
            raise RotatorError("%s sets %s already" % (env_path, taken[0]),
                               "delete that line, or choose another name", EXIT_USAGE)
        newline = b"\r\n" if lines and lines[0].raw.endswith(b"\r\n") else b"\n"
        raws = client_door_lines(name, door, commands, newline)
        return (lambda user: with_lines_appended(user, raws)), assignments, ()

    # The lock keeps two enrolments from picking the same place, or from
    # rewriting the environment file at once from two knockd's rotations.
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        data_of = {path: read_config(path) for path in knockd_files(config_path)}
        for data in data_of.values():
            if name.encode("utf-8", "surrogateescape") in data:
                enrolled(split_grace_block(parse_config(data))[0])
        target, made = place_client(data_of, settings)
        change = EnvChange(env_path, environ, prepare, adds=True)
        try:
            if args.single_use:
                # An IPv6 knock burns the use as well.
                burn = burn_command(target, door, environ)
                commands = (burn + commands[0], commands[1], burn + commands[2], commands[3])
            plan = rotate(target, environ, now, change=change)
        except RotatorError:
            # A new knockd that never ran leaves nothing behind.
            if made and not knockd_runs(settings_for(target, settings)):
                os.unlink(target)
            raise
    tell_next_event(config_path, plan.event, now, settings)
    print_enrolment(args, door, target, secret, change.environ, environ)
    return EXIT_OK


def remove_client(config_path, environ, now, name):
    """Take a client's door and settings away, with one rotation."""

    def prepare(lines, values):
        marks = client_marks(lines)
        if name not in marks:
            raise RotatorError("no client %s in %s" % (name, config_path),
                               "list-clients shows the clients", EXIT_USAGE)
        header = lines[min(marks[name] + 1, len(lines) - 1)]
        door = (header.section or b"").decode("utf-8", "surrogateescape")
        removals = {own_variable(setting, door) for setting in DOOR_SETTINGS}
        return (lambda user: without_client_door(user, name, client_marks(user))), (), removals

    settings = server_settings(environ)
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        plan = rotate(client_file(config_path, name) or config_path, environ, now,
                      change=EnvChange(settings["ENV_FILE"], environ, prepare, adds=False))
    tell_next_event(config_path, plan.event, now, settings)
    print("client %s removed: its door and its settings are gone, and knockd has reloaded"
          % name)
    return EXIT_OK


def list_clients(config_path, environ):
    """Every rotator door with its client, settings and knockd, never a secret."""
    settings = server_settings(environ)
    environ = with_env_file(environ, settings["ENV_FILE"])
    rows = [("CLIENT", "DOOR", "MODE", "PIN", "SECRET", "PERIOD", "USES", "KNOCKD")]
    now = time.time()
    for path in knockd_files(config_path):
        knockd = settings_for(path, settings)
        lines, _ = split_grace_block(parse_config(read_config(path)))
        client_of = {}
        for name, index in client_marks(lines).items():
            if index + 1 < len(lines) and lines[index + 1].kind == "section":
                client_of[lines[index + 1].section.decode("utf-8", "surrogateescape")] = name
        uses = read_uses(knockd["STATE_DIR"])
        for door in rotator_doors(lines):
            rows.append((client_of.get(door, "-"),) + door_row(environ, uses, door, now)
                        + (knockd["UNIT"],))
    print_table(rows)
    return EXIT_OK
