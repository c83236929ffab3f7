"""add-client's QR codes (issue 17).

The code add-client draws for the terminal is rendered as a terminal would
show it, on a dark and on a light theme, photographed into an image and read
back with zbarimg: it must hold exactly the text add-client printed.
--qr-png writes the same code into a new PNG file of mode 0600, and an IPv6
--host keeps the otpauth label's one colon between issuer and account."""

import os
import re
import shutil
import subprocess
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from knockd_rotator.clients import qr as clients_qr
from knockd_rotator.core import errors
from knockd_rotator.core import generator
from conftest import SECRET, need
from test_clients import Enrol

try:
    from PIL import Image, ImageDraw
except ImportError:
    Image = None

PIN = b"qr-pin-24680\n"


def need_qr_tools():
    need(shutil.which("qrencode"), "needs qrencode (run tests/run to install it)")
    need(shutil.which("zbarimg"), "needs zbarimg (zbar-tools; run tests/run to install it)")
    need(Image, "needs PIL (python3-pil; run tests/run to install it)")


@pytest.fixture
def enrol(tmp_path, server_env):
    """test_clients' Enrol, running add-client (which checks the firewall
    program: iptables)."""
    need(shutil.which("iptables"), "needs iptables (add-client checks the firewall program)")
    return Enrol(tmp_path, server_env, "add-client")


# ---------------------------------------------------------------- a terminal, photographed

# xterm's 16 colours.  Bold brightens 30-37, as most terminals do by default.
PALETTE = [(0, 0, 0), (205, 0, 0), (0, 205, 0), (205, 205, 0), (0, 0, 238), (205, 0, 205),
           (0, 205, 205), (229, 229, 229), (127, 127, 127), (255, 0, 0), (0, 255, 0),
           (255, 255, 0), (92, 92, 255), (255, 0, 255), (0, 255, 255), (255, 255, 255)]
# (default foreground, default background): a light theme swaps them.
THEMES = {"dark": ((229, 229, 229), (0, 0, 0)), "light": ((0, 0, 0), (255, 255, 255))}
# Which half of a cell each character fills with the foreground (upper, lower).
GLYPHS = {" ": (0, 0), "█": (1, 1), "▀": (1, 0), "▄": (0, 1)}
MODULE = 8        # pixels: a cell is one module wide and two high
BORDER = 3        # cells of the terminal's own background around the code


def colour_256(number):
    if number < 16:
        return PALETTE[number]
    if number < 232:
        levels = (0, 95, 135, 175, 215, 255)
        number -= 16
        return levels[number // 36], levels[number // 6 % 6], levels[number % 6]
    return (8 + 10 * (number - 232),) * 3


def terminal_cells(line, theme):
    """[(character, foreground, background)] of LINE as a terminal with THEME
    shows it; a colour the escapes set is a palette index or an RGB triple."""
    default_fg, default_bg = THEMES[theme]
    fg = bg = None
    bold = reverse = False
    cells = []
    for token in re.split(r"(\x1b\[[0-9;]*m)", line):
        if token.startswith("\x1b["):
            codes = [int(code or 0) for code in token[2:-1].split(";")]
            while codes:
                code = codes.pop(0)
                if code == 0:
                    fg = bg = None
                    bold = reverse = False
                elif code in (1, 22):
                    bold = code == 1
                elif code in (7, 27):
                    reverse = code == 7
                elif 30 <= code <= 37 or 90 <= code <= 97:
                    fg = code % 10 + (8 if code >= 90 else 0)
                elif 40 <= code <= 47 or 100 <= code <= 107:
                    bg = code % 10 + (8 if code >= 100 else 0)
                elif code in (39, 49):
                    fg, bg = (None, bg) if code == 39 else (fg, None)
                elif code in (38, 48) and codes[:1] == [5] and len(codes) > 1:
                    colour = colour_256(codes[1])
                    del codes[:2]
                    fg, bg = (colour, bg) if code == 38 else (fg, colour)
                else:
                    pytest.fail("an escape this terminal does not know: %r" % token)
            continue
        shown_fg = (default_fg if fg is None else fg if isinstance(fg, tuple) else
                    PALETTE[fg + 8 if bold and fg < 8 else fg])
        shown_bg = default_bg if bg is None else bg if isinstance(bg, tuple) else PALETTE[bg]
        if reverse:
            shown_fg, shown_bg = shown_bg, shown_fg
        cells += [(char, shown_fg, shown_bg) for char in token]
    return cells


def qr_lines(output):
    """The lines of OUTPUT that draw the QR code: one block of them."""
    numbers = [n for n, line in enumerate(output.split("\n"))
               if "\x1b" in line or set(line) & set("█▀▄")]
    assert numbers and numbers == list(range(numbers[0], numbers[-1] + 1)), output
    return output.split("\n")[numbers[0]:numbers[-1] + 1]


def photograph(lines, theme, path):
    """Save the QR LINES as a terminal with THEME shows them, as a PNG at PATH."""
    rows = [terminal_cells(line, theme) for line in lines]
    width = max(len(row) for row in rows) + 2 * BORDER
    image = Image.new("RGB", (width * MODULE, (len(rows) + 2 * BORDER) * 2 * MODULE),
                      THEMES[theme][1])
    draw = ImageDraw.Draw(image)
    for y, row in enumerate(rows):
        for x, (char, fg, bg) in enumerate(row):
            assert char in GLYPHS, "not a QR drawing character: %r" % char
            for half, lit in enumerate(GLYPHS[char]):
                left, top = (x + BORDER) * MODULE, ((y + BORDER) * 2 + half) * MODULE
                draw.rectangle([left, top, left + MODULE - 1, top + MODULE - 1],
                               fill=fg if lit else bg)
    image.save(path)
    return path


def decoded(path):
    """What zbarimg reads off the image at PATH (QR codes only), or None."""
    result = subprocess.run(["zbarimg", "--raw", "-q", "-Sdisable", "-Sqrcode.enable",
                             str(path)], capture_output=True, timeout=60)
    if result.returncode == 4:     # zbarimg's "no code found"
        return None
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("utf-8")
    assert text.endswith("\n")
    return text[:-1]


def modules(lines):
    """The QR LINES as rows of modules, True where light."""
    rows = []
    for line in lines:
        glyphs = [GLYPHS[char] for char in re.sub(r"\x1b\[[0-9;]*m", "", line)]
        rows += [[bool(glyph[half]) for glyph in glyphs] for half in (0, 1)]
    return rows


# ---------------------------------------------------------------- the terminal's code

def printed_text(output, totp):
    """The text add-client printed for the client to scan: the otpauth URI,
    or the KNOCKD_ROTATOR_* lines."""
    if totp:
        return re.search(r"otpauth://\S+(?=\))", output).group(0)
    return "".join(line + "\n" for line in output.split("\n")
                   if re.match(r"KNOCKD_ROTATOR_[A-Z0-9_]+=", line))


@pytest.mark.parametrize("totp", [False, True], ids=["secret", "totp"])
def test_the_terminal_code_decodes_on_dark_and_light_themes(enrol, tmp_path, totp):
    need_qr_tools()
    args = ["--totp", "--pin", "--host", "2001:db8::1"] if totp else ["--host", "srv"]
    added = enrol.run("erin", "--firewall", "iptables", *args, input=PIN)
    assert added.returncode == 0, added.stderr
    text = printed_text(added.stdout, totp)
    assert text.startswith("otpauth://totp/" if totp else "KNOCKD_ROTATOR_SECRET_ERIN_SSH=")
    lines = qr_lines(added.stdout)
    for theme in THEMES:
        image = photograph(lines, theme, tmp_path / ("%s.png" % theme))
        assert decoded(image) == text, theme

    # The quiet zone is the standard's 4 modules on every side: the symbol
    # (its corners hold finder patterns) is the box around the dark modules.
    grid = modules(lines)
    dark = [(y, x) for y, row in enumerate(grid) for x, light in enumerate(row) if not light]
    top, left = min(y for y, _ in dark), min(x for _, x in dark)
    size = max(x for _, x in dark) - left + 1
    assert (top, left) == (4, 4) and max(y for y, _ in dark) == top + size - 1
    assert len(grid[0]) == size + 8 and len(grid) >= size + 8
    assert all(grid[y][x] for y in range(size + 8) for x in range(size + 8)
               if not (4 <= y < size + 4 and 4 <= x < size + 4))


def test_the_light_theme_catches_a_code_drawn_in_the_terminal_s_colours(tmp_path):
    """qrencode's UTF8 drawing (the terminal's own colours) reads on a dark
    theme and not on a light one: the photograph tells the themes apart."""
    need_qr_tools()
    text = "KNOCKD_ROTATOR_SECRET_ERIN_SSH=%s\n" % SECRET
    drawn = subprocess.run(["qrencode", "-t", "UTF8", "-m", "4"], input=text.encode(),
                           capture_output=True, check=True).stdout.decode()
    lines = qr_lines(drawn)
    assert decoded(photograph(lines, "dark", tmp_path / "dark.png")) == text
    assert decoded(photograph(lines, "light", tmp_path / "light.png")) is None


# ---------------------------------------------------------------- --qr-png

def test_qr_png_holds_the_printed_text_in_a_0600_file(enrol, tmp_path):
    need_qr_tools()
    png = tmp_path / "erin.png"
    umask = os.umask(0o022)       # the file is 0600 whatever the admin's umask
    try:
        added = enrol.run("erin", "--firewall", "iptables", "--totp", "--pin", "--host", "srv",
                          "--qr-png", png, input=PIN)
    finally:
        os.umask(umask)
    assert added.returncode == 0, added.stderr
    assert oct(os.lstat(png).st_mode & 0o7777) == "0o600"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert decoded(png) == printed_text(added.stdout, totp=True)
    assert added.stdout.endswith("The QR code is in %s too (mode 0600): delete it once "
                                 "scanned.\n" % png)


@pytest.mark.parametrize("case", ["file", "link", "link to a file", "no folder", "a folder",
                                  "empty", "no qrencode"])
def test_a_qr_png_it_cannot_write_changes_nothing(enrol, tmp_path, case):
    png = tmp_path / "erin.png"
    target = tmp_path / "target"
    env = dict(enrol.env)
    if case == "file":
        png.write_bytes(b"someone's file")
    elif case.startswith("link"):
        if case == "link to a file":
            target.write_bytes(b"someone's file")
        os.symlink(target, png)
    elif case == "no folder":
        png = tmp_path / "missing" / "erin.png"
    elif case in ("a folder", "empty"):
        png = str(tmp_path) + "/" if case == "a folder" else ""
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        os.symlink(shutil.which("iptables"), bin_dir / "iptables")
        env["PATH"] = str(bin_dir)
    before = enrol.files()
    result = enrol.run("erin", "--firewall", "iptables", "--qr-png", png, env=env)
    assert result.returncode == {"no qrencode": 3}.get(case, 2), result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --qr-png ")
    assert result.stderr.rstrip().endswith(")") and result.stdout == ""
    assert enrol.files() == before
    if case == "file":
        assert png.read_bytes() == b"someone's file"
    if case.startswith("link"):
        assert os.readlink(png) == str(target)
        assert not target.exists() or target.read_bytes() == b"someone's file"


@pytest.mark.parametrize("case", ["file", "link"])
def test_the_png_never_goes_over_what_appeared_since_the_check(tmp_path, case):
    """Between check_qr_png and write_qr_png a path can appear: O_EXCL and
    O_NOFOLLOW refuse it, with the enrolment left as it is."""
    need(shutil.which("qrencode"), "needs qrencode (run tests/run to install it)")
    png, target = tmp_path / "erin.png", tmp_path / "target"
    if case == "file":
        png.write_bytes(b"someone's file")
    else:
        os.symlink(target, png)
    with pytest.raises(generator.RotatorError) as caught:
        clients_qr.write_qr_png(str(png), "text", dict(os.environ), "erin")
    assert caught.value.code == errors.EXIT_USAGE
    assert str(caught.value).startswith("error: client erin is enrolled (above), but "
                                        "--qr-png %s failed: " % png)
    assert not target.exists()
    if case == "file":
        assert png.read_bytes() == b"someone's file"
    else:
        assert png.is_symlink()


# ---------------------------------------------------------------- the otpauth label

def test_an_ipv6_host_keeps_the_label_s_one_colon():
    uri = clients_qr.otpauth_uri("erin_ssh_ROTATOR", "2001:db8::1", "JBSWY3DPEHPK3PXP")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    label = parts.path[1:]
    assert label.count(":") == 1
    issuer, account = label.split(":")
    assert unquote(issuer) == "knockd-rotator"
    assert unquote(account) == "erin_ssh_ROTATOR@2001:db8::1"
    assert parse_qs(parts.query, strict_parsing=True) == {
        "secret": ["JBSWY3DPEHPK3PXP"], "issuer": ["knockd-rotator"], "algorithm": ["SHA1"],
        "digits": ["6"], "period": ["30"]}
