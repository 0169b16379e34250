"""The house: folders import downward only. Read from the source with `ast` (imports inside functions count).

    data -> core -> alignment, reward, sampling -> evals -> pipeline        (bottom to top)

A module may import its own floor or any floor below, never one above; the folders of one floor form no
circle. README.md "The code" states the same order.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [["data"], ["core"], ["alignment", "reward", "sampling"], ["evals"], ["pipeline"]]
LEVEL = {pkg: i for i, floor in enumerate(FLOORS) for pkg in floor}


def imports_of(path: Path) -> set[str]:
    """Top-level project packages a module imports, wherever the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(LEVEL)


def package_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for pkg in LEVEL:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for dep in imports_of(path) - {pkg}:
                edges.setdefault((pkg, dep), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_package_is_on_a_floor():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(LEVEL), "a new package needs its floor in FLOORS and in README.md"


def test_no_import_runs_up():
    up = {f"{a} -> {b} ({', '.join(files)})" for (a, b), files in package_edges().items() if LEVEL[b] > LEVEL[a]}
    assert not up


def test_no_circles_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert not [p for p in LEVEL if reaches(p, p)]


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from pipeline.run import main\n")  # hidden inside a function: still found
    assert imports_of(bad) == {"pipeline"} and LEVEL["pipeline"] > LEVEL["data"]
