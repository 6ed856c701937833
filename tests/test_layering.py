"""The layers hold: `edgexfer.runtime` (runtime/) imports nothing from `edgexfer.exporters` (exporters/) or the
training package (edgexfer/), and `edgexfer.exporters` nothing from the training package. Every import of every
module is read with `ast`, top-level and inside functions, `importlib.import_module`/`__import__`/`find_spec`
with a literal name included; nothing is imported to check it. The root package `edgexfer` (edgexfer/__init__.py:
the version only, and the one a bundle writes) is shared by all three.

The upper layer lends the lower one what it needs instead (the training commands join the runtime's command tree
through `command_tree`; bench's reference, verify's test split and bundle's end-to-end writer through `Lent`)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (the import name of its package, its layer: an import may point at its own layer or a lower one)
PACKAGES = {"runtime": ("edgexfer.runtime", 0), "exporters": ("edgexfer.exporters", 1), "edgexfer": ("edgexfer", 2)}
LAYER_NAMES = {0: "runtime", 1: "exporters", 2: "the training package"}
# (importing module, imported module) pairs known to break the rule, each removed when it is fixed: none, the
# layers hold (the last, exporters/quantize.py importing edgexfer.bounds, went with the one guard, 95c7e25).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Every module of the three packages by its import name (`edgexfer.runtime.cli` for runtime/cli.py)."""
    out = {}
    for folder, (package, _) in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> int | None:
    """The layer of an imported module; None for the root package `edgexfer` itself and for other projects."""
    if module == "edgexfer":
        return None
    for package, rank in sorted(PACKAGES.values(), key=lambda p: -len(p[0])):
        if module == package or module.startswith(package + "."):
            return rank
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file: `import a.b`, `from a import b` (a.b when a.b is a
    module, else a), relative imports resolved, and the calls that import a literal name."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[:len(here) - node.level + 1], *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__", "find_spec"):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations() -> list[tuple[str, str, str]]:
    known = modules()
    out = []
    for module, path in known.items():
        mine = layer(module)
        for line, target in imports(module, path, known):
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                out.append((module, target, f"{path.relative_to(ROOT)}:{line}: {module} ({LAYER_NAMES[mine]}) "
                                            f"imports {target} ({LAYER_NAMES[theirs]})"))
    return out


def test_no_module_imports_upward():
    new = [where for module, target, where in violations() if (module, target) not in KNOWN_VIOLATIONS]
    assert not new, "imports from a higher layer:\n" + "\n".join(new)


def test_known_violations_are_still_there():
    """A fixed violation leaves KNOWN_VIOLATIONS, so that it cannot come back unnoticed."""
    found = {(module, target) for module, target, _ in violations()}
    assert not KNOWN_VIOLATIONS - found, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - found)}"


def test_the_root_package_imports_nothing_of_ours():
    """edgexfer/__init__.py is what every layer shares (and what a bundle rewrites): it must not pull a layer in."""
    known = modules()
    own = [t for _, t in imports("edgexfer", ROOT / "edgexfer" / "__init__.py", known) if t.startswith("edgexfer")]
    assert not own, own


def test_the_check_sees_function_level_and_dynamic_imports(tmp_path):
    """The checker itself: an upward import inside a function, a relative one and a literal import_module count."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from edgexfer.pipeline import x\n    from .. import guard\n"
                   "    importlib.import_module('edgexfer.exporters.e2e')\n    from edgexfer import __version__\n")
    known = {"edgexfer.guard": Path("guard.py"), "edgexfer.pipeline": Path("pipeline.py")}
    got = [t for _, t in imports("edgexfer.runtime.m", src, known)]
    assert got == ["edgexfer.pipeline", "edgexfer.guard", "edgexfer.exporters.e2e", "edgexfer"]
    assert [layer(t) for t in got] == [2, 2, 1, None]


def test_the_training_commands_join_the_runtime_tree_without_changing_it():
    """The full tree is a new group built from the runtime's (no command of the runtime's is patched), and the
    names the runtime alone knows the training commands by are theirs."""
    from edgexfer import cli as training
    from edgexfer.runtime import cli as runtime

    assert tuple(runtime.cli.commands) == runtime.COMMANDS
    assert tuple(training.cli.commands) == (*runtime.COMMANDS, *runtime.TRAINING)
    assert tuple(c.name for c in training.TRAINING_COMMANDS) == runtime.TRAINING
    assert all(training.cli.commands[n] is runtime.cli.commands[n] for n in runtime.COMMANDS)
    assert all("invoke" not in vars(c) for c in training.cli.commands.values())  # no instance monkeypatch
