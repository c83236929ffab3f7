"""The package's layout holds: the core imports no engine, no module imports
itself through others, and modules and functions stay a size a reader holds
in mind (docs/DESIGN.md, "Layout")."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "knockd_rotator"
MODULE_LINES_MAX = 800
# A function's lines, from its `def` to its last line, docstring and comments included.
FUNCTION_LINES_MAX = 60
# Functions over FUNCTION_LINES_MAX, each with why it is not split.
LONG_FUNCTIONS = {
    # In the shared block, which must stay byte-identical to the client's.
    "knockd_rotator.core.generator.read_settings",
}


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name, path):
    """The package's modules that module NAME imports (a `from P import M`
    of a module M counts as M)."""
    known = modules()
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                whole = base + "." + alias.name
                found.add(whole if whole in known else base)
    return {module for module in found if module in known and module != name}


def test_core_imports_no_engine():
    wrong = {(name, imported) for name, path in modules().items()
             if name.startswith("knockd_rotator.core")
             for imported in imports(name, path)
             if imported.startswith("knockd_rotator.engines")}
    assert not wrong


# The modules that drive one engine: its rotation, its enrolment (with the
# knockd doors' firewall commands) and the command line that dispatches to
# it.  Every other module outside an engine reaches it through its package
# only (engines.chosen(), the seam).
DRIVERS = {
    "knockd_rotator.engines.knockd": {"knockd_rotator.cli", "knockd_rotator.rotation",
                                      "knockd_rotator.clients.knockd",
                                      "knockd_rotator.clients.firewalls"},
    "knockd_rotator.engines.nftables": {"knockd_rotator.cli", "knockd_rotator.rotation",
                                        "knockd_rotator.clients.nftables"},
}


def test_only_its_drivers_reach_into_an_engine():
    wrong = {(name, imported) for name, path in modules().items()
             for imported in imports(name, path)
             for engine, drivers in DRIVERS.items()
             if imported.startswith(engine + ".") and not name.startswith(engine)
             and name not in drivers}
    assert not wrong


def test_no_import_cycles():
    graph = {name: imports(name, path) for name, path in modules().items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_modules_are_short():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()
            if len(path.read_text().splitlines()) > MODULE_LINES_MAX}
    assert not long


def function_lengths():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield "%s.%s" % (name, node.name), node.end_lineno - node.lineno + 1


def test_functions_are_short():
    long = {name: lines for name, lines in function_lengths()
            if lines > FUNCTION_LINES_MAX and name not in LONG_FUNCTIONS}
    assert not long


def test_long_functions_listed_are_still_long():
    lengths = dict(function_lengths())
    assert not [name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= FUNCTION_LINES_MAX]


def test_the_checks_see_a_cycle_and_a_core_import(tmp_path, monkeypatch):
    """The import walk finds what it must refuse, in a package made for it."""
    package = tmp_path / "knockd_rotator"
    (package / "core").mkdir(parents=True)
    (package / "engines").mkdir()
    for folder in (package, package / "core", package / "engines"):
        (folder / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from knockd_rotator.engines import b\n")
    (package / "engines" / "b.py").write_text("from knockd_rotator.core.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imports("knockd_rotator.core.a", package / "core" / "a.py") == {
        "knockd_rotator.engines.b"}
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "import cycle" in str(exc)
    else:
        raise AssertionError("the cycle a -> b -> a was not seen")
