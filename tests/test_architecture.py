"""The layering of docs/architecture.md holds: what each module imports, and who takes gradients."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jax_unlearn"

LAYER = {"registry": 0, "token_math": 0, "models": 0, "combiners": 1, "accumulate": 1, "objectives": 1, "data": 1,
         "step": 2, "sharding": 2, "eval": 2, "config": 3, "train": 4, "run_config": 4, "fingerprint": 4, "bench": 5, "cli": 6}
ALLOWED = {  # narrower than "any lower layer", as docs/architecture.md's table says
    "registry": set(), "token_math": set(), "models": {"models"},
    "combiners": {"registry"}, "accumulate": {"combiners"}, "objectives": {"registry", "token_math"},
    "data": {"token_math"}, "step": {"combiners", "accumulate", "objectives"}, "sharding": {"models"},
    "eval": {"eval", "data", "token_math", "models", "step"},  # step: per_example_grad_norms (GradNorm MIA)
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield path, parts[0] if parts else ""


def imported(path: pathlib.Path, top: str) -> set[str]:
    """Top-level jax_unlearn modules that ``path`` imports (relative imports resolve to ``top``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                out.add(top)
            elif node.module and node.module.startswith("jax_unlearn"):
                name = node.module.split(".")[1] if "." in node.module else None
                out.update([name] if name else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jax_unlearn."))
    return out


@pytest.mark.parametrize("path, top", [m for m in modules() if m[1]], ids=lambda x: str(x).split("jax_unlearn/")[-1])
def test_modules_import_only_their_layer_or_below(path, top):
    used = imported(path, top) - {top}  # a package's modules may import each other
    assert top in LAYER, f"{top} is not placed in a layer of docs/architecture.md"
    for dep in used:
        assert dep in LAYER, f"{path.name} imports {dep}, which has no layer"
        assert LAYER[dep] <= LAYER[top], f"{path} (layer {LAYER[top]}) imports {dep} (layer {LAYER[dep]})"
        if top in ALLOWED:
            assert dep in ALLOWED[top], f"{path} imports {dep}; docs/architecture.md allows {sorted(ALLOWED[top])}"


def test_only_the_step_takes_gradients():
    takers = sorted(str(p.relative_to(PACKAGE)) for p, _ in modules()
                    if "value_and_grad" in p.read_text() or "jax.grad" in p.read_text())
    assert takers == ["step.py"]


def test_the_checker_sees_real_imports():
    """Guards the tests above against an import parser that finds nothing."""
    assert imported(PACKAGE / "step.py", "step") == {"combiners", "accumulate", "objectives"}
    assert imported(PACKAGE / "models" / "hf_io.py", "models") == {"models"}
