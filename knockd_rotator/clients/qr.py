"""QR codes of a client's settings or TOTP secret (qrencode)."""

import os
import subprocess

from knockd_rotator.core.commands import without_secrets
from knockd_rotator.core.errors import EXIT_ENVIRONMENT, EXIT_USAGE
from knockd_rotator.core.generator import RotatorError, TOTP_DIGITS, TOTP_PERIOD


def qrencode_program(environ):
    import shutil
    return shutil.which("qrencode", path=environ.get("PATH", os.defpath))


def qrencode(text, environ, *options):
    """qrencode's image of TEXT (OPTIONS: its type), with the standard's quiet
    zone of 4 modules (strict decoders find nothing in less); None without
    qrencode."""
    program = qrencode_program(environ)
    if not program:
        return None
    # The text goes through stdin: a command line is visible to every user.
    result = subprocess.run([program, "-m", "4", "-o", "-"] + list(options),
                            input=text.encode(), env=without_secrets(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return result.stdout if result.returncode == 0 else None


def qr_code(text, environ):
    """TEXT drawn as a QR code for the terminal, or a line saying how to get one."""
    # ANSIUTF8 sets both colours (white modules on black), so the code is the
    # right way round whatever the terminal's theme: UTF8 draws the light
    # modules in the terminal's foreground, which inverts it on a light one.
    drawing = qrencode(text, environ, "-t", "ANSIUTF8")
    if drawing is not None:
        return drawing.decode("utf-8", "replace")
    return ("(no QR code: qrencode is not installed; apt install qrencode, then "
            "`qrencode -t ANSIUTF8 -m 4` draws the lines above from its standard input)\n")


def check_qr_png(path, environ):
    """Refuse, before anything changes, a --qr-png PATH that write_qr_png would."""
    if not os.path.basename(path):
        raise RotatorError("--qr-png %r names no file" % path,
                           "give the path of a new file, e.g. /root/alice.png", EXIT_USAGE)
    if os.path.lexists(path):
        raise RotatorError("--qr-png %s exists already" % path,
                           "choose a new path, or delete that file first", EXIT_USAGE)
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise RotatorError("--qr-png %s: there is no folder %s" % (path, folder),
                           "create it, or choose another path", EXIT_USAGE)
    if not qrencode_program(environ):
        raise RotatorError("--qr-png needs qrencode, which is not installed",
                           "apt install qrencode, or leave out --qr-png", EXIT_ENVIRONMENT)


def write_qr_png(path, text, environ, name):
    """TEXT's QR code into PATH, a new PNG file of mode 0600, once client NAME
    is enrolled: a failure here leaves the enrolment as it is."""
    # 8 pixels a module: big enough to scan off a screen.
    image = qrencode(text, environ, "-t", "PNG", "-s", "8")
    try:
        if image is None:
            raise OSError("qrencode failed")
        # O_EXCL and O_NOFOLLOW: never over a file, nor through a link, that
        # someone put there since check_qr_png.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(image)
        except OSError:
            os.unlink(path)
            raise
    except OSError as exc:
        raise RotatorError("client %s is enrolled (above), but --qr-png %s failed: %s"
                           % (name, path, exc.strerror or exc),
                           "scan the QR code above instead, or remove-client %s and enrol "
                           "it again" % name,
                           EXIT_USAGE if isinstance(exc, FileExistsError) else EXIT_ENVIRONMENT
                           ) from None


def otpauth_uri(door, host, secret):
    """The otpauth:// URI that authenticator apps read (Key Uri Format)."""
    from urllib.parse import quote
    # The label's one colon parts issuer and account: safe="" escapes every
    # other, as an IPv6 --host has, and a '/' that would end the path.
    return ("otpauth://totp/%s:%s?secret=%s&issuer=%s&algorithm=SHA1&digits=%d&period=%d"
            % (quote("knockd-rotator"), quote("%s@%s" % (door, host), safe=""), secret,
               quote("knockd-rotator"), TOTP_DIGITS, TOTP_PERIOD))
