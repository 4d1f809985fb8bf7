"""The layering of docs/architecture.md holds: what each module imports, and who takes gradients."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jax_unlearn"

LAYER = {"registry": 0, "head_grad": 0, "token_math": 0, "models": 0, "combiners": 1, "accumulate": 1, "token_losses": 1,
         "objectives": 1, "data": 1, "step": 2, "sharding": 2, "eval": 2, "config": 3, "train": 4, "fingerprint": 4,
         "run": 5, "plan": 5, "bench": 6, "cli": 7}
ALLOWED = {  # narrower than "any lower layer", as docs/architecture.md's table says
    "registry": set(), "head_grad": set(), "token_math": {"head_grad"}, "models": {"models", "head_grad"},
    "combiners": {"registry"}, "accumulate": {"combiners"}, "token_losses": {"token_math"},
    "objectives": {"registry", "token_math", "token_losses"},
    "data": {"token_math"}, "step": {"combiners", "accumulate", "objectives", "head_grad"}, "sharding": {"models"},
    "eval": {"eval", "data", "token_math", "models", "step", "objectives"},  # step: per_example_grad_norms (GradNorm
    # MIA), make_step (the relearning attack); objectives: nll (the relearning loss)
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
    assert imported(PACKAGE / "step.py", "step") == {"combiners", "accumulate", "objectives", "head_grad"}
    assert imported(PACKAGE / "models" / "hf_io.py", "models") == {"models"}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("jax_unlearn", *parts))


def module_imports(path: pathlib.Path) -> set[tuple[str, str | None]]:
    """``(module, name or None)`` for every import of a jax_unlearn module by ``path``, at any
    depth (lazy imports inside functions included), relative imports resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.startswith("jax_unlearn"):
                for a in node.names:
                    out.add((base, a.name))
        elif isinstance(node, ast.Import):
            out.update((a.name, None) for a in node.names if a.name.startswith("jax_unlearn"))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the jax_unlearn modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    paths = {module_name(p): p for p, _ in modules()}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for base, item in module_imports(path):
            target = f"{base}.{item}" if item and f"{base}.{item}" in paths else base
            if target != name and target in paths:
                deps.add(target)
        graph[name] = deps
    return graph


def test_no_import_circle_between_modules():
    """No module reaches itself through imports (lazy ones included), e.g. models.hf_io <-> models.lora;
    a package's ``__init__`` re-exporting its modules is not a circle."""
    graph = import_graph()
    packages = {n for n in graph if any(m.startswith(n + ".") for m in graph)}
    edges = {n: {d for d in deps if d not in packages} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_no_private_name_is_imported_from_another_module():
    """Neither ``from x import _name`` nor ``module._name`` on another of our modules."""
    known = set(import_graph())
    for path, _ in modules():
        aliases = set()
        for base, item in module_imports(path):
            assert not (item and item.startswith("_") and not item.startswith("__")), \
                f"{path.relative_to(PACKAGE)} imports the private name {item} from {base}"
            if item and f"{base}.{item}" in known:
                aliases.add(item)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.alias) and node.asname and any(node.name.endswith(a) for a in aliases):
                aliases.add(node.asname)
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{path.relative_to(PACKAGE)}:{node.lineno} uses the private name "
                                     f"{node.value.id}.{node.attr}")


def test_the_checkers_see_a_circle_and_a_private_import(tmp_path, monkeypatch):
    """Controls for the two tests above, on a throw-away package laid out like ours."""
    pkg = tmp_path / "jax_unlearn"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "models" / "b.py").write_text("from .a import _helper\n")
    (pkg / "models" / "c.py").write_text("from . import b as bee\n\ndef g():\n    return bee._read_into\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"import circle: jax_unlearn.models.a -> jax_unlearn.models.b"):
        test_no_import_circle_between_modules()
    with pytest.raises(AssertionError, match="private name _helper"):
        test_no_private_name_is_imported_from_another_module()
    (pkg / "models" / "b.py").write_text("x = 1\n")
    with pytest.raises(AssertionError, match=r"c.py:4 uses the private name bee._read_into"):
        test_no_private_name_is_imported_from_another_module()


RUN_PATH = ["run.py", "train", "cli.py"]  # `jax-unlearn unlearn` from its arguments to the step


def test_functions_of_the_run_path_are_short():
    """No function of the run's path (the application layer, the loop and its parts, the CLI's
    commands) is over 80 lines, docstring included; the parser's declarations are not a path."""
    long = []
    for entry in RUN_PATH:
        paths = sorted((PACKAGE / entry).rglob("*.py")) if (PACKAGE / entry).is_dir() else [PACKAGE / entry]
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name != "build_parser":
                    if node.end_lineno - node.lineno + 1 > 80:
                        long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
