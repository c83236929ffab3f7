"""The command line: parser, run, main."""

import argparse
import os
import sys
import time

from knockd_rotator import scheduling
from knockd_rotator.clients import nftables as nftables_clients
from knockd_rotator.clients.firewalls import FIREWALLS
from knockd_rotator.clients.enrol import check_name
from knockd_rotator.clients.knockd import add_client, list_clients, remove_client
from knockd_rotator.core import commands
from knockd_rotator.core.errors import EXIT_OK, EXIT_USAGE
from knockd_rotator.core.generator import (
    bounded_number, Parser, port_number, resolve_command, RotatorError)
from knockd_rotator.core.plan import AT_MAX
from knockd_rotator.core.settings import DEFAULT_CONFIG, engine_of, server_settings
from knockd_rotator.core.uses import parse_use
from knockd_rotator.engines.knockd.burns import reopen_gate
from knockd_rotator.engines.knockd.report import check, status
from knockd_rotator.engines.nftables import report as nftables_report
from knockd_rotator.engines.nftables.doors import DEFAULT_DOORS
from knockd_rotator.rotation import rotate, rotate_all
from knockd_rotator.scheduling import derive_keys, tell_next_event
from knockd_rotator.watch import watch


VERSION = "0.1.0"


EPILOG = """\
commands (a unique prefix is enough: ch, st, a, r, l, b):
  (none)         rotate: bring the doors to the current period and reload knockd
  check          check knockd.conf against knockd 0.8's grammar and its silent traps
  status         the state of every rotator door, for monitoring (exit 0 OK,
                 1 WARNING, 2 CRITICAL, 3 UNKNOWN)
  add-client     enrol a client: its own door and secret (optional PIN or TOTP)
  remove-client  remove a client's door and secret
  list-clients   the rotator doors and their clients, never a secret
  burn           move a single-use door on to its next sequence (start_command)
Every command but burn also covers the further knockd's files that add-client
makes in knockd_rotator.d/ beside knockd.conf (past KNOCKD_ROTATOR_DOORS_PER_KNOCKD).

examples:
  %(prog)s                          rotate /etc/knockd.conf, reload knockd
  %(prog)s --dry-run                print the diff a rotation would apply
  %(prog)s --watch                  rotate at every boundary until SIGTERM
  %(prog)s check --config /tmp/k.conf
  %(prog)s status --json
  %(prog)s add-client alice --firewall iptables --pin

exit codes: 0 ok, 1 knockd refused the reload (previous file restored),
            2 bad command line, 3 bad KNOCKD_ROTATOR_* variable,
            4 knockd.conf unreadable or refused by knockd's grammar,
            6 lock held by another run, 7 knockd down and recovery failed
"""

COMMANDS = ("check", "status", "add-client", "remove-client", "list-clients", "burn")
CONFIG_HELP = ("knockd's configuration (default %s), or under the nftables engine the doors "
               "file (default %s)" % (DEFAULT_CONFIG, DEFAULT_DOORS))
# Options that take a value: the word after them is not a command.
VALUE_OPTIONS = ("--config", "--at")


def boundary_moment(text):
    return bounded_number(text, 0, AT_MAX, "a UNIX time")


def add_command(subparsers, name, help_text, examples):
    """The subcommand NAME among SUBPARSERS, with its help, its examples and
    a --config of its own."""
    sub = subparsers.add_parser(name, allow_abbrev=False, help=help_text,
                                description=help_text + ".", epilog="examples:\n" + examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # SUPPRESS: a --config given before the command word stays in force.
    sub.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=CONFIG_HELP)
    return sub


def add_client_arguments(add):
    """add-client's arguments, onto its parser ADD."""
    add.add_argument("name", metavar="NAME", type=lambda text: check_name("client", text),
                     help="the client's name: letters, digits, '-'")
    add.add_argument("--service", default="ssh", type=lambda text: check_name("service", text),
                     help="what the door guards, part of its name (default ssh)")
    add.add_argument("--port", default=22, type=port_number,
                     help="the TCP port the door opens (default 22)")
    add.add_argument("--firewall", choices=sorted(FIREWALLS),
                     help="knockd engine (required there): what opens the port: iptables; "
                          "nftables (a set inet filter knockd_rotator_PORT your ruleset "
                          "accepts); ufw.  The nftables engine opens it itself")
    add.add_argument("--pin", action="store_true",
                     help="ask for a PIN the client must type as well (no echo)")
    add.add_argument("--totp", action="store_true",
                     help="the client knocks with an authenticator app's 6-digit codes "
                          "instead of a stored secret (30 s periods)")
    add.add_argument("--host", metavar="HOST",
                     help="this server's name for the client (default: the host name)")
    add.add_argument("--qr-png", metavar="PATH",
                     help="also write the QR code into PATH, a new PNG image of mode 0600, "
                          "once the client is enrolled (PATH must not exist)")
    add.add_argument("--no-single-use", dest="single_use", action="store_false",
                     help="let a sequence open the door again until its period ends (by "
                          "default each opening burns it: see Single-use knocks)")


def add_burn_command(subparsers):
    """burn, which a single-use door's start_command runs, among SUBPARSERS."""
    burn = add_command(subparsers, "burn", "Move a single-use door on to its next sequence "
                       "(its start_command runs this when it opens)",
                       "  start_command = /usr/local/sbin/knockd_rotator_server.py burn "
                       "ssh_ROTATOR & <what opens the port>\n"
                       "The door needs KNOCKD_ROTATOR_SINGLE_USE=1 (or _SINGLE_USE_<NAME>=1); "
                       "its\ngrace sibling burns itself as DOOR_GRACE.")
    burn.add_argument("door", metavar="DOOR", help="the [*_ROTATOR] door that opened")
    burn.add_argument("--use", metavar="START:N",
                      help="the use that opened it, which the rotation writes into the "
                           "start_command (period start, counter): only its first opening "
                           "burns; without it every opening burns one more use")


def build_parser():
    parser = Parser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False,
                    description="Rotate the sequences of the [*_ROTATOR] doors of knockd.conf "
                                "and make knockd load them.",
                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the unified diff; write, reload and schedule nothing")
    mode.add_argument("--watch", action="store_true",
                      help="keep running: rotate at every boundary and grace end, until "
                           "SIGTERM (for short periods; see knockd_rotator-watch.service)")
    mode.add_argument("--schedule", action="store_true",
                      help="also leave a boundary run for an event before the timer's next "
                           "run (knockd_rotator.service's own runs; by hand, rotate without it)")
    # A boundary run: sleep until this UNIX time, then rotate (see scheduling.py).
    mode.add_argument("--at", type=boundary_moment, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="say more")
    subparsers = parser.add_subparsers(dest="command", metavar="[COMMAND]")

    def command(name, help_text, examples):
        return add_command(subparsers, name, help_text, examples)

    command("check", "Check knockd.conf against knockd 0.8's grammar and its silent traps",
            "  check\n  check --config /tmp/knockd.conf\n"
            "exit codes: 0 no errors (warnings are allowed), 4 errors, 2 bad command line")
    status_parser = command(
        "status", "Show whether every rotator door holds the current sequence",
        "  status\n  status --json\n  status --show-sequences\n"
        "exit codes (monitoring convention): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    status_parser.add_argument("--show-sequences", action="store_true",
                               help="include the sequences (hidden by default)")
    add = command(
        "add-client", "Enrol a client: a door of its own with a new secret, then print "
        "its set-up",
        "  add-client alice --firewall iptables\n"
        "  add-client bob --service https --port 443 --firewall nftables --pin\n"
        "  add-client carol --firewall ufw --totp --pin  (an authenticator app's codes)\n"
        "  add-client dave --firewall iptables --totp --pin --qr-png /root/dave.png\n"
        "                          (the QR code also as an image: too tall for 24 lines)\n"
        "The door is [NAME_SERVICE_ROTATOR]; the secret goes into the environment file\n"
        "(mode 0600) and is printed once, here, for the client.")
    add_client_arguments(add)
    remove = command("remove-client", "Remove a client's door and settings, then reload knockd",
                     "  remove-client alice")
    remove.add_argument("name", metavar="NAME", type=lambda text: check_name("client", text),
                        help="the client's name")
    command("list-clients", "List the rotator doors and their clients (never a secret)",
            "  list-clients")
    add_burn_command(subparsers)
    return parser


def prepare_argv(argv):
    """ARGV with the command word expanded from a unique prefix."""
    argv = list(argv)
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in VALUE_OPTIONS:
            index += 2
            continue
        if word == "--":
            break
        if not word.startswith("-"):
            argv[index] = resolve_command(word, COMMANDS)
            break
        index += 1
    return argv


def run(argv, environ):
    args = build_parser().parse_args(prepare_argv(argv))
    if args.command and (args.dry_run or args.watch or args.schedule or args.at is not None):
        raise RotatorError("%s does not take --dry-run, --watch or --schedule" % args.command,
                           "see %s --help" % os.path.basename(sys.argv[0]), EXIT_USAGE)
    if engine_of(environ) == "nftables":
        return run_nftables(args, environ)
    args.config = args.config or DEFAULT_CONFIG
    if args.command == "check":
        return check(args.config, environ)
    if args.command == "status":
        return status(args.config, environ, time.time(), args.json, args.show_sequences)
    if args.command == "add-client":
        return add_client(args.config, environ, time.time(), args)
    if args.command == "remove-client":
        return remove_client(args.config, environ, time.time(), args.name)
    if args.command == "list-clients":
        return list_clients(args.config, environ)
    if args.command == "burn":
        # The door's start_command names its own file with --config.
        now = time.time()
        use = args.use and parse_use(args.use)
        try:
            plan = rotate(args.config, environ, now, burn=args.door, burn_use=use)
        except RotatorError:
            if use:
                reopen_gate(args.config, environ, args.door, use)
            raise
        tell_next_event(args.config, plan.event, now, server_settings(environ))
        return EXIT_OK
    return run_rotation(args, environ)


def run_rotation(args, environ):
    """A run with no command: rotate now, at a boundary (--at), or in a loop (--watch)."""
    if args.watch:
        return watch(args.config, environ, args.verbose)
    if args.at is not None:
        derive_keys(args.config, environ, args.at)
        scheduling.sleep_until(args.at)
    scheduled = args.schedule or args.at is not None
    now = time.time()
    try:
        event = rotate_all(args.config, environ, now, args.dry_run, args.verbose, scheduled)
    except RotatorError:
        if scheduled:
            scheduling.schedule_retry(args.config, environ, now, args.verbose)
        raise
    if not scheduled and not args.dry_run:
        tell_next_event(args.config, event, now, server_settings(environ))
    return EXIT_OK


def run_nftables(args, environ):
    """The commands under the nftables engine (engines/nftables/)."""
    args.config = args.config or DEFAULT_DOORS
    now = time.time()
    if args.command == "check":
        return nftables_report.check(args.config, environ, now)
    if args.command == "status":
        return nftables_report.status(args.config, environ, now, args.json)
    if args.command == "add-client":
        return nftables_clients.add_client(args.config, environ, now, args)
    if args.command == "remove-client":
        return nftables_clients.remove_client(args.config, environ, now, args.name)
    if args.command == "list-clients":
        return nftables_clients.list_clients(args.config, environ, now)
    if args.command == "burn":
        raise RotatorError("burn is for knockd's single-use doors: the nftables engine burns "
                           "a use in the kernel, as the knock completes",
                           "take `burn` out of the door's commands", EXIT_USAGE)
    return run_rotation(args, environ)


def main(script=None):
    """SCRIPT: the path of the script users run (see commands.SCRIPT)."""
    if script:
        commands.SCRIPT = script
    try:
        return run(sys.argv[1:], os.environ)
    except RotatorError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`status | head`): what is left has nowhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
