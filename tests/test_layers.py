"""The import rules that keep the layers apart (as torchtune's test_import_recipes does):

- the library (`core/`) imports neither `stages`, `registry` nor `app`;
- a stage imports the library only (never another stage, the registry or the app layer);
- no two library modules import each other, directly or through others.

Every import counts, including those inside functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("app", "core", "registry", "stages")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its body ("from core import x" -> core.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in LAYERS:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in LAYERS}


def graph(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def test_library_imports_no_stage_registry_or_app():
    offenders = {module: sorted(i for i in deps if i.split(".")[0] != "core")
                 for module, deps in graph("core").items()}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_stages_import_only_the_library():
    offenders = {}
    for module, deps in graph("stages").items():
        bad = sorted(i for i in deps if i.split(".")[0] != "core")
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_no_import_cycle_inside_the_library():
    edges = graph("core")
    modules = set(edges)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in edges.get(todo.pop(), set()) & modules:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = sorted(m for m in modules if m in reachable(m))
    assert cycles == []


def test_the_rules_see_function_level_imports(tmp_path):
    """The checker itself: an import inside a function counts."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from stages.stage1_explicit_instructions import STAGE\n"
                      "    import registry.stages\n    from core import io\n")
    assert imports_of(sample) == {"stages.stage1_explicit_instructions", "registry.stages",
                                  "core.io"}
