"""The layout of aibutler.py: its parts (split by `# === Title ===` banners) are
layered, and data flows downward. A part may use names defined in its own part
or in a part above it, never a name defined in a part below it.

The layering is static (aibutler.py parsed with `ast`); the waitress internals
the serving part relies on are checked on a real waitress server."""

import ast
import pathlib
import re

import aibutler

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "aibutler.py"
BANNER = re.compile(r"^# === (.+?) =+$")
PREAMBLE = "preamble"


# --- scopes: which reads are of module-level names -------------------------------

class _Scope:
    """A scope, as Python's compiler sees it: what it binds, what it declares
    global or nonlocal, and the names read in it (resolved once it is complete,
    since a name bound anywhere in a function is local throughout it)."""

    def __init__(self, kind, parent=None):
        self.kind = kind  # "module", "function", "class" or "comprehension"
        self.parent = parent
        self.bound, self.globals, self.nonlocals = set(), set(), set()
        self.reads = []  # (name, line)

    def is_module_level(self, name):
        scope = self
        while scope.kind != "module":
            if scope is self or scope.kind != "class":  # a class body's names are
                if name in scope.globals:               # not seen by the scopes in it
                    return True
                if name in scope.bound or name in scope.nonlocals:
                    return False
            scope = scope.parent
        return True


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


class _Walker:
    """One pass over a top-level statement: its scopes, bindings and reads."""

    def __init__(self):
        self.scopes = []
        self.globals = set()  # every name some function declares `global`

    def new_scope(self, kind, parent=None):
        scope = _Scope(kind, parent)
        self.scopes.append(scope)
        return scope

    def visit(self, node, scope):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                scope.reads.append((node.id, node.lineno))
            else:
                scope.bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self.function(node, scope)
        elif isinstance(node, ast.ClassDef):
            scope.bound.add(node.name)
            for child in node.decorator_list + node.bases + node.keywords:
                self.visit(child, scope)
            inner = self.new_scope("class", scope)
            for stmt in node.body:
                self.visit(stmt, inner)
        elif isinstance(node, _COMPREHENSIONS):
            self.visit(node.generators[0].iter, scope)  # runs in the enclosing scope
            inner = self.new_scope("comprehension", scope)
            for i, generator in enumerate(node.generators):
                self.visit(generator.target, inner)
                if i:
                    self.visit(generator.iter, inner)
                for condition in generator.ifs:
                    self.visit(condition, inner)
            for element in ([node.key, node.value] if isinstance(node, ast.DictComp)
                            else [node.elt]):
                self.visit(element, inner)
        elif isinstance(node, ast.NamedExpr):
            target = scope  # a walrus in a comprehension binds outside it
            while target.kind == "comprehension":
                target = target.parent
            target.bound.add(node.target.id)
            self.visit(node.value, scope)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            scope.reads.append((node.target.id, node.target.lineno))  # x += 1 reads x
            scope.bound.add(node.target.id)
            self.visit(node.value, scope)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            scope.bound.update(alias.asname or alias.name.split(".")[0]
                               for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Global):
            scope.globals.update(node.names)
            self.globals.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            scope.nonlocals.update(node.names)
        else:
            name = getattr(node, "name", None)  # except ... as name, match patterns
            if isinstance(name, str):
                scope.bound.add(name)
            rest = getattr(node, "rest", None)  # match {**rest}
            if isinstance(rest, str):
                scope.bound.add(rest)
            for child in ast.iter_child_nodes(node):
                self.visit(child, scope)

    def function(self, node, scope):
        arguments = node.args
        every_arg = (getattr(arguments, "posonlyargs", []) + arguments.args
                     + arguments.kwonlyargs
                     + [a for a in (arguments.vararg, arguments.kwarg) if a])
        # Decorators, defaults and annotations run in the enclosing scope.
        outer = arguments.defaults + [d for d in arguments.kw_defaults if d is not None]
        outer += [a.annotation for a in every_arg if a.annotation is not None]
        if not isinstance(node, ast.Lambda):
            scope.bound.add(node.name)
            outer += node.decorator_list + ([node.returns] if node.returns else [])
        for child in outer:
            self.visit(child, scope)
        inner = self.new_scope("function", scope)
        inner.bound.update(a.arg for a in every_arg)
        for stmt in (node.body if isinstance(node.body, list) else [node.body]):
            self.visit(stmt, inner)

    def statement(self, stmt):
        """(names the top-level statement defines, [(name, line)] module-level reads)."""
        self.scopes = []
        module = self.new_scope("module")
        self.visit(stmt, module)
        reads = [(name, line) for scope in self.scopes for name, line in scope.reads
                 if scope.is_module_level(name)]
        return module.bound, reads


# --- the checker ---------------------------------------------------------------

def split_parts(source):
    """[(title, [top-level statements])], the preamble first."""
    tree = ast.parse(source)
    banners = [(number, match.group(1).strip())
               for number, line in enumerate(source.splitlines(), 1)
               for match in [BANNER.match(line)] if match]
    parts = [(PREAMBLE, [])] + [(title, []) for _, title in banners]
    starts = [number for number, _ in banners]
    for stmt in tree.body:
        first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
        inside = [n for n in starts if first < n <= stmt.end_lineno]
        assert not inside, f"banner on line {inside[0]} is inside the statement at line {first}"
        index = sum(1 for n in starts if n < first)
        parts[index][1].append(stmt)
    return parts


def layering_violations(source):
    """[(using part, line, name, defining part)] for every read, in a part, of a
    module-level name first defined in a part below it, in line order.

    A part defines the names its top-level statements bind: def and class names,
    assignment targets (tuples included), imports. A name that functions only set
    through `global` (falcon and waitress, set by load_web_stack()) counts as
    defined in the preamble. A part uses a name when code anywhere in its
    statements (function and class bodies, defaults, decorators, an attribute
    access `Store.x`...) reads it as a module-level name: not as a parameter,
    a local, a comprehension variable or a name its class body binds."""
    parts = split_parts(source)
    walker = _Walker()
    first_defined = {}  # name -> index of the first part that defines it
    reads = []  # (part index, name, line)
    for index, (_, body) in enumerate(parts):
        for stmt in body:
            defined, stmt_reads = walker.statement(stmt)
            for name in defined:
                first_defined.setdefault(name, index)
            reads += [(index, name, line) for name, line in stmt_reads]
    for name in walker.globals:
        first_defined.setdefault(name, 0)
    found = [(parts[index][0], line, name, parts[first_defined[name]][0])
             for index, name, line in reads
             if first_defined.get(name, -1) > index]
    return sorted(found, key=lambda violation: violation[1])


def describe(violations):
    return "\n".join(f"  part {using!r}, line {line}: uses {name!r}, defined in part {defining!r}"
                     for using, line, name, defining in violations)


# --- the tests -------------------------------------------------------------------

def test_parts_only_use_names_defined_above():
    source = SOURCE.read_text(encoding="utf-8")
    parts = split_parts(source)
    assert len(parts) > 2, "no `# === Title ===` banners found in aibutler.py"
    assert all(body for _, body in parts), "a part with no statements: is a banner misread?"
    violations = layering_violations(source)
    assert not violations, (
        f"{len(violations)} use(s) of a name defined in a part further down aibutler.py "
        "(data must flow downward: move the definition up, or restructure):\n"
        + describe(violations))


SYNTHETIC = '''\
import os

def lazy():
    global late_module
    late_module = os

# === Upper ===================================================================

@decorate_later
def upper(parameter_shadow, default=LOWER_CONSTANT):
    local_shadow = 1
    values = [comp_shadow for comp_shadow in range(3)]
    late_module.sep
    return Helper.make(), parameter_shadow, local_shadow, values, os.sep, upper

class Upper:
    attribute_shadow = 1
    def method(self):
        return attribute_shadow

# === Lower ===================================================================

parameter_shadow = local_shadow = comp_shadow = 0
LOWER_CONSTANT = attribute_shadow = 2

def decorate_later(function):
    return function

class Helper:
    @staticmethod
    def make():
        return upper
'''


def test_the_checker_catches_a_name_from_a_part_below():
    parts = split_parts(SYNTHETIC)
    assert [title for title, _ in parts] == [PREAMBLE, "Upper", "Lower"]
    assert layering_violations(SYNTHETIC) == [
        ("Upper", 9, "decorate_later", "Lower"),
        ("Upper", 10, "LOWER_CONSTANT", "Lower"),
        ("Upper", 14, "Helper", "Lower"),
        # a class body's names are not seen from its methods: this reads the global
        ("Upper", 19, "attribute_shadow", "Lower"),
    ]
    assert "'Helper', defined in part 'Lower'" in describe(layering_violations(SYNTHETIC))


def test_the_checker_sees_violations_in_the_real_file():
    """The real file with its first part (after the preamble) moved to the end:
    the later parts' uses of its names must now be reported."""
    lines = SOURCE.read_text(encoding="utf-8").splitlines(keepends=True)
    banners = [i for i, line in enumerate(lines) if BANNER.match(line.rstrip("\n"))]
    first, second = banners[0], banners[1]
    moved = "".join(lines[:first] + lines[second:] + ["\n"] + lines[first:second])
    title = BANNER.match(lines[first].rstrip("\n")).group(1)
    violations = layering_violations(moved)
    assert violations and all(defining == title for _, _, _, defining in violations)


def test_every_waitress_internal_the_daemon_uses_is_there():
    """aibutler.WAITRESS_INTERNALS names what the serving part reads of waitress
    beyond its public API; each must exist on the installed waitress (CI runs
    Debian's 2.1 and pip's newest 3.x), on a real server and a real connection
    with half a request received."""
    import socket

    import waitress

    server = waitress.create_server(lambda environ, start: [], host="127.0.0.1", port=0)
    client = socket.create_connection(("127.0.0.1", server.effective_port))
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers not finished
        channels = []
        for _ in range(50):
            server.asyncore.loop(timeout=0.1, map=server._map, use_poll=True, count=1)
            channels = [c for c in server._map.values() if getattr(c, "request", None)]
            if channels:
                break
        assert channels, "the server never received the half request"
        objects = {"server": server, "server.asyncore": server.asyncore,
                   "server.task_dispatcher": server.task_dispatcher,
                   "channel": channels[0], "channel.request": channels[0].request}
        missing = [f"{owner}.{name}" for owner, names in aibutler.WAITRESS_INTERNALS.items()
                   for name in names if not hasattr(objects[owner], name)]
        assert missing == [], f"waitress {waitress.__name__} lacks: {missing}"
    finally:
        client.close()
        server.close()
        server.task_dispatcher.shutdown(timeout=1)
