"""Read PACKAGE_ROOTS out of setup.py without running setup()."""

import ast

from conftest import REPO


def package_roots() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PACKAGE_ROOTS":
            return ast.literal_eval(node.value)
    raise AssertionError("PACKAGE_ROOTS not found in setup.py")
