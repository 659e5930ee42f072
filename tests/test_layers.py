"""The package's layer drawing, checked: a package imports only its own layer and the ones below.

core < nn < {modelio, assets} < data < measure < train < compress < {recipes, report} < search < cli.
Function-level imports count too: a lazy import is still an arrow.
"""

import ast
from pathlib import Path

import lmslim

LAYERS = [{"core", "__version__"}, {"nn"}, {"modelio", "assets"}, {"data"}, {"measure"}, {"train"}, {"compress"},
          {"recipes", "report"}, {"search"},
          {"cli", "__main__"}]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
ROOT = Path(lmslim.__file__).parent


def _imports(file: Path):
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmslim":
            parts = node.module.split(".")
            yield from ([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("lmslim."))


def test_no_import_points_up_the_layers():
    upward = []
    for file in sorted(ROOT.rglob("*.py")):
        rel = file.relative_to(ROOT)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own not in RANK:
            continue
        for target in _imports(file):
            if target in RANK and RANK[target] > RANK[own]:
                upward.append(f"{rel} imports lmslim.{target}")
    assert not upward, "imports pointing up the layer drawing:\n" + "\n".join(upward)


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to the layer drawing"
