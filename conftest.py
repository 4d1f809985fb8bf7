"""Test setup, before anything imports jax (the worker processes and the subprocesses the tests
start inherit it): 8 fake CPU devices; XLA:CPU's backend optimisation level 0 (the tests' tiny
programs run in milliseconds while LLVM's optimisation of them took a fifth of the suite's wall
time: 13.1 -> 10.6 min with -n 2 on the 2-core EPYC; what a program computes does not change, only
how fast its machine code runs); and one XLA compilation
cache per test session (a fresh temporary folder), so the many runs of the same small programs
compile once."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_unlearn_tests_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# Files whose tests take longest, scheduled first: with `-n 2 --dist loadfile` a long file that
# starts last runs alone on one core while the other idles (measured: `pytest -n 2 --durations=30`).
LONG_FIRST = ("tests/test_train.py", "tests/test_bench.py", "tests/test_readme.py", "tests/test_train_lora.py",
              "tests/test_objectives_grid.py", "tests/test_plan.py", "tests/test_models_generate.py",
              "tests/test_objectives_cli.py", "tests/test_scale.py", "tests/test_train_combiners.py")


def pytest_collection_modifyitems(items):
    """Stable reorder: the files of `LONG_FIRST` first, in that order; every file's tests keep
    their own order (some tests reuse what an earlier one in the file cached)."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
