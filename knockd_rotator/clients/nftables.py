"""add-client, remove-client, list-clients under the nftables engine: a line
of the doors file and the client's settings in the environment file, then
one load of the table.  The table opens the port itself: no firewall
command for the admin to paste.
"""

import os

from knockd_rotator.clients.enrol import (
    check_enrolment, CLIENTS_LOCK, door_row, new_secrets, print_enrolment, print_table)
from knockd_rotator.core.errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE
from knockd_rotator.core.files import (
    private_fix, read_config, readable_by_others, replace_file, take_lock)
from knockd_rotator.core.generator import DOOR_SETTINGS, own_variable, ROTATOR_SUFFIX, RotatorError
from knockd_rotator.core.settings import (
    env_assignment, env_values, read_env_file, server_settings, with_env_file)
from knockd_rotator.core.uses import read_uses
from knockd_rotator.engines.nftables import load
from knockd_rotator.engines.nftables.doors import (
    door_line, parse_doors, with_line, without_line)


def read_doors_file(path):
    """The doors file's bytes, or None when there is none (add-client makes it)."""
    if not os.path.exists(path):
        return None
    return read_config(path)


def swap(files, doors_path, environ, now):
    """Write FILES ({path: (old bytes or None, new bytes)}) in order, then load
    the table for DOORS_PATH; put every file back as it was when that fails."""
    done = []
    try:
        for path, (old, new) in files.items():
            replace_file(path, new, create=True)
            done.append((path, old))
        return load.rotate(doors_path, environ, now)
    except RotatorError:
        for path, old in reversed(done):
            if old is None:
                os.unlink(path)
            else:
                replace_file(path, old)
        raise


def add_client(doors_path, environ, now, args):
    """Enrol a client: its door line, a new secret, one load; then print its set-up."""
    name = args.name
    door = "%s_%s%s" % (name, args.service, ROTATOR_SUFFIX)
    if args.firewall is not None:
        raise RotatorError("the nftables engine opens the port itself",
                           "leave out --firewall", EXIT_USAGE)
    check_enrolment(args, environ)
    settings = server_settings(environ)
    env_path = settings["ENV_FILE"]
    if readable_by_others(env_path):
        raise RotatorError("%s is readable by others, and would hold a client's secret"
                           % env_path, private_fix(env_path), EXIT_ENVIRONMENT)
    secret, assignments = new_secrets(args, door)
    if args.single_use:
        assignments.append((own_variable("SINGLE_USE", door), "1"))
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        data = read_doors_file(doors_path)
        if any(found.client == name or found.name == door
               for found in parse_doors(data or b"", doors_path)):
            raise RotatorError("client %s is enrolled already" % name,
                               "remove-client %s first, or choose another name" % name,
                               EXIT_USAGE)
        old_env = read_env_file(env_path)
        taken = sorted({own_variable(s, door) for s in DOOR_SETTINGS} & set(env_values(old_env)))
        if taken:
            raise RotatorError("%s sets %s already" % (env_path, taken[0]),
                               "delete that line, or choose another name", EXIT_USAGE)
        new_env = with_line(old_env or b"", "".join("%s=%s\n" % pair for pair in assignments))
        # The secret goes first: a door is never without it, even after a crash.
        new_doors = with_line(data or b"", door_line(door, args.port, name))
        swap({env_path: (old_env, new_env), doors_path: (data, new_doors)},
             doors_path, environ, now)
    print_enrolment(args, door, doors_path, secret, dict(environ, **dict(assignments)), environ)
    return EXIT_OK


def remove_client(doors_path, environ, now, name):
    """Take a client's door line and settings away, with one load."""
    settings = server_settings(environ)
    env_path = settings["ENV_FILE"]
    with take_lock(settings["STATE_DIR"], CLIENTS_LOCK):
        data = read_config(doors_path)
        found = [door for door in parse_doors(data, doors_path) if door.client == name]
        if not found:
            raise RotatorError("no client %s in %s" % (name, doors_path),
                               "list-clients shows the clients", EXIT_USAGE)
        door = found[0]
        old_env = read_env_file(env_path)
        removals = {own_variable(setting, door.name) for setting in DOOR_SETTINGS}
        new_env = b"".join(raw for raw in (old_env or b"").splitlines(True)
                           if (env_assignment(raw) or ("",))[0] not in removals)
        # The door goes first: no door is ever left without its secret.
        swap({doors_path: (data, without_line(data, door.line)),
              env_path: (old_env, new_env)}, doors_path, environ, now)
    print("client %s removed: its door and its settings are gone, and the table no longer "
          "holds its sequences" % name)
    return EXIT_OK


def list_clients(doors_path, environ, now):
    """Every door of the doors file with its client and settings, never a secret."""
    settings = server_settings(environ)
    environ = with_env_file(environ, settings["ENV_FILE"])
    uses = read_uses(settings["STATE_DIR"])
    rows = [("CLIENT", "DOOR", "MODE", "PIN", "SECRET", "PERIOD", "USES", "GUARDS")]
    for door in parse_doors(read_config(doors_path), doors_path):
        rows.append((door.client or "-",) + door_row(environ, uses, door.name, now)
                    + ("tcp " + ",".join(map(str, door.guard)),))
    print_table(rows)
    return EXIT_OK
