"""The layout's rules as tests (docs/ARCHITECTURE.md): which package may import which, and module size.

Imports are read from the source with ``ast`` (every ``import`` statement, also those inside functions), so a rule
breaks the moment someone writes the import, whether or not a test executes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "ddk_offline"
KERNELS = ROOT / "kernels" / "ddk_kernels"
MAX_LINES = 400

# package (relative to ddk_offline/) -> ddk_offline sub-packages it must never import
FORBIDDEN = {
    "format": ("dump", "distillation", "commands", "bench"),
    "runtime": ("format", "dump", "distillation", "commands", "bench"),
    "dump": ("distillation", "commands", "bench"),
    "distillation": ("dump", "commands", "bench"),
    "bench": ("dump", "distillation", "commands"),
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[1:] if rel.parts[0] == "kernels" else rel.parts)
    return ".".join(parts[:-1] if parts[-1] != "__init__" else parts[:-1])


def _library_files():
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", sorted(FORBIDDEN.items()))
def test_package_boundaries(package, forbidden):
    files = sorted((LIBRARY / package).rglob("*.py"))
    assert files, f"ddk_offline/{package} is missing"
    broken = []
    for f in files:
        for name in imported_modules(f, _package_of(f)):
            for other in forbidden:
                if name == f"ddk_offline.{other}" or name.startswith(f"ddk_offline.{other}."):
                    broken.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not broken, "layout rule broken (docs/ARCHITECTURE.md):\n" + "\n".join(sorted(set(broken)))


def test_kernels_never_import_ddk_offline():
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    broken = [
        f"{f.relative_to(ROOT)} imports {name}"
        for f in files
        for name in imported_modules(f, _package_of(f))
        if name == "ddk_offline" or name.startswith("ddk_offline.")
    ]
    assert not broken, "\n".join(broken)


def test_no_library_module_over_the_size_limit():
    too_long = {
        str(f.relative_to(ROOT)): n
        for f in [*_library_files(), *sorted(KERNELS.rglob("*.py"))]
        if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_the_rules_see_imports_inside_functions(tmp_path):
    # The checker itself: a lazy import inside a function counts, a relative import is resolved.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ddk_offline.distillation import trainer\n\nfrom ..format import schema\n")
    names = imported_modules(src, "ddk_offline.dump")
    assert "ddk_offline.distillation.trainer" in names and "ddk_offline.format.schema" in names
