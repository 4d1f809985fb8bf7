"""The training loop: resume after SIGKILL, SIGTERM, unreadable checkpoints, multi-host."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_unlearn import config, train
from jax_unlearn.data import PairedBatches

WORKER = str(Path(__file__).parent / "train_worker.py")
BASE = {"batch_size": 8, "save_every": 2, "keep": 5, "optim": {"lr": 0.01, "schedule": "constant"},
        "combiner": {"name": "sago"}, "objective": {"name": "npo", "beta": 0.5}}


def worker(out: Path, env: dict | None = None, **overrides) -> subprocess.Popen:
    cfg = {**BASE, **overrides}
    return subprocess.Popen([sys.executable, WORKER, str(out), json.dumps(cfg)], env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while logged_steps(out) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"no {n} steps within {timeout}s"
        time.sleep(0.05)


def weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / "model" / "model.safetensors")


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run."""
    out = tmp_path_factory.mktemp("reference")
    result = finish(worker(out, max_steps=8))
    assert result == {"steps_done": 8, "interrupted": False, "resumed_from": None, "distributed": False}
    return out


def test_sigkill_midway_then_rerun_is_bit_identical(reference_run, tmp_path):
    proc = worker(tmp_path, max_steps=8)
    wait_for_steps(proc, tmp_path, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()
    logged_before = logged_steps(tmp_path)
    result = finish(worker(tmp_path, max_steps=8))
    assert result["steps_done"] == 8 and result["resumed_from"] in (4, 6)
    assert_bit_identical(weights(tmp_path), weights(reference_run))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # recomputed steps are logged once
    superseded = tmp_path / "metrics.superseded.jsonl"  # their first lines: moved there, not lost
    moved = superseded.read_text().splitlines() if superseded.exists() else []
    assert all(json.loads(line)["step"] > result["resumed_from"] for line in moved if line.endswith("}"))  # whole lines
    assert len(steps) + len(moved) == logged_before + 8 - result["resumed_from"]


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    proc = worker(tmp_path, max_steps=10_000, save_every=10_000)
    wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=120)
    assert result["interrupted"] is True
    done = result["steps_done"]
    assert 3 <= done < 10_000
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [done]
    assert logged_steps(tmp_path) == done
    assert not (tmp_path / "model").exists()  # no export of an unfinished run


def _tiny_data():
    from step_fixtures import make_batch

    return ({k: np.asarray(v) for k, v in make_batch(11, rows=16).items()},
            {k: np.asarray(v) for k, v in make_batch(12, rows=24).items()})


def _config(out: Path, **kw) -> config.TrainConfig:
    base = dict(progress=False, batch_size=8, save_every=2, keep=5, optim=config.OptimConfig(lr=0.01),
                combiner=config.CombinerConfig(name="sago"), objective=config.ObjectiveConfig(name="npo", beta=0.5))
    return config.TrainConfig(output_dir=str(out), **{**base, **kw})


# Orbax leaves some reads of the unreadable checkpoint pending when its restore fails; they report to
# an event loop that is closed by then (harmless: the checkpoint is moved aside).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_latest_checkpoint_falls_back_and_deletes_nothing(reference_run, tmp_path, caplog):
    from step_fixtures import tiny_model

    forget, retain = _tiny_data()
    first = train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=6))
    assert first.steps_done == 6
    ckpt = tmp_path / "checkpoints" / "6"
    # truncate every array data file to half (orbax may spread the arrays over several files and
    # read only the byte ranges it needs, so cutting one file does not always break the restore)
    data_files = [p for p in ckpt.rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data_files
    truncated = {}
    for victim in data_files:
        truncated[victim] = victim.read_bytes()[: victim.stat().st_size // 2]
        victim.write_bytes(truncated[victim])
    with caplog.at_level(logging.WARNING, logger="jax_unlearn.train"):
        second = train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=8))
    assert second.resumed_from == 4 and second.steps_done == 8
    assert any("unreadable" in r.message for r in caplog.records)
    moved = list((tmp_path / "checkpoints.unreadable").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6.")
    # moved as it was: the truncated files are still there, still truncated
    for victim, cut in truncated.items():
        assert (moved[0] / victim.relative_to(ckpt)).stat().st_size == len(cut)
    assert_bit_identical(weights(tmp_path), weights(reference_run))


def test_finished_run_is_not_retrained_and_keeps_its_export(reference_run, tmp_path):
    from step_fixtures import tiny_model

    forget, retain = _tiny_data()
    first = train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=4))
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    again = train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=4))
    assert again.resumed_from == 4 and again.steps_done == 4
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.steps_done == 4


def test_bad_data_and_config_are_rejected(tmp_path):
    from step_fixtures import tiny_model

    forget, retain = _tiny_data()
    empty = {k: v[:0] for k, v in retain.items()}
    with pytest.raises(ValueError, match="retain set is empty"):
        train.unlearn(tiny_model(), forget, empty, _config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="forget set has 16 rows, fewer than batch_size=32"):
        PairedBatches(forget, retain, 32, 0)
    ragged = dict(forget, labels=forget["labels"][:3])
    with pytest.raises(ValueError, match="forget set: 'labels' has 3 rows"):
        PairedBatches(ragged, retain, 4, 0)
    with pytest.raises(ValueError, match="batch_size=4 must be divisible by the mesh's data x fsdp = 8"):
        train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=2, batch_size=4))
    with pytest.raises(ValueError, match="'batch_size'=8 is not divisible by 'micro_batches'=3"):
        train.unlearn(tiny_model(), forget, retain, _config(tmp_path, max_steps=2, micro_batches=3))
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        config.build_schedule(config.OptimConfig(schedule="step"), 10)


def test_batches_are_a_function_of_the_step():
    forget, retain = _tiny_data()
    data = PairedBatches(forget, retain, 4, seed=3)
    assert data.steps_per_epoch == 4
    seen = np.concatenate([data(t)[0]["input_ids"] for t in range(4)])
    assert sorted(map(tuple, seen)) == sorted(map(tuple, forget["input_ids"]))  # one epoch visits every row once
    again = PairedBatches(forget, retain, 4, seed=3)
    for t in (0, 5, 9):
        for a, b in zip(data(t), again(t)):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(data(0)[0]["input_ids"], data(4)[0]["input_ids"])  # epochs reshuffle


def test_schedules():
    cfg = config.OptimConfig(lr=1.0, warmup_ratio=0.2, schedule="linear")
    s = config.build_schedule(cfg, 10)
    np.testing.assert_allclose([float(s(t)) for t in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    c = config.build_schedule(config.OptimConfig(lr=1.0, schedule="cosine"), 10)
    np.testing.assert_allclose([float(c(t)) for t in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_evaluate_and_export_as_one_process(tmp_path):
    """`jax-unlearn unlearn` with evaluations during the run and after it and the export, run by 2
    processes x 4 devices (jax.distributed) and by 1 process x 8 devices: the same exported
    weights, the same evaluations in metrics.jsonl and eval.json (written by process 0 alone)."""
    from cli_fixtures import make_workspace
    from step_fixtures import assert_moves_close

    from jax_unlearn import cli

    ws = make_workspace(tmp_path / "ws")
    # Adam with eps=1 is Lipschitz in the gradient (update ~ lr*m/(sqrt(v)+1)), so float32
    # reassociation in the collectives stays float32-small in the weights; with eps=1e-8 a
    # near-zero gradient coordinate would turn that noise into a full-size, CPU-dependent update.
    args = [str(ws / "run.yaml"), "max_steps=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "optim.lr=0.5",
            "optim.eps=1.0", "optim.schedule=constant", "optim.warmup_ratio=0", "eval.every=2", f"eval.mc=[{ws / 'mc.jsonl'}]",
            f"eval.qa=[{ws / 'qa.jsonl'}]", f"eval.perplexity=[{ws / 'holdout.jsonl'}]"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["unlearn", *args, f"output_dir={one}"]) == 0  # this process: 8 devices
    port, procs = _free_port(), []
    for pid in range(2):
        env = os.environ.copy()
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from jax_unlearn.cli import main; sys.exit(main(sys.argv[1:]))",
             "unlearn", *args, f"output_dir={two}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        assert "done: 4/4 steps" in out
    start = load_file(ws / "base" / "model.safetensors")
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() == start.keys()
    assert_moves_close(b, a, start)
    moved = {k: np.abs(a[k] - start[k]).max() / (np.finfo(np.float32).eps * np.abs(start[k]).max()) for k in a}
    assert min(moved.values()) > 100, moved  # every tensor moved well beyond float32 rounding

    def evaluations(out: Path) -> list[dict]:
        from jax_unlearn.eval.suite import flatten

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final = {k: v for k, v in json.loads((out / "eval.json").read_text()).items() if k != "model"}
        return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/mc/mc/accuracy" in r] + [
            flatten(final)]

    got, want = evaluations(two), evaluations(one)
    assert len(want) == 4 and all(any("perplexity" in k for k in r) for r in want)  # steps 0, 2, 4, the export
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want):  # float32 models whose weights agree to float32 reassociation noise
        assert g == pytest.approx(w, rel=1e-4)


def test_end_to_end_from_text_and_qa_files(tmp_path):
    """Files -> tokenizer -> data sets -> unlearn -> exported folder that reloads."""
    from flax import nnx
    from tokenizer_fixtures import make_tokenizer

    from jax_unlearn import data, objectives
    from jax_unlearn.models import CausalLM, ModelConfig, load_hf

    tok = data.load_tokenizer(make_tokenizer(tmp_path / "tok"))
    (tmp_path / "forget.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [
        "Anthrax spores survive for decades in soil.", "The spores of anthrax survive in soil for decades."] * 8))
    (tmp_path / "retain.json").write_text(json.dumps([
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "Who attends Hogwarts?", "answer": "Harry Potter"}] * 8))
    forget, retain = data.load_unlearning_sets(tmp_path / "forget.jsonl", tmp_path / "retain.json", tok, max_length=16)
    assert forget["input_ids"].shape[1] == retain["input_ids"].shape[1] == 16
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    rows = lambda d: {k: jnp.asarray(v[:8]) for k, v in d.items()}
    before = float(objectives.nll(model, rows(forget))[0]), float(objectives.nll(model, rows(retain))[0])
    result = train.unlearn(model, forget, retain, _config(tmp_path / "run", max_steps=6, save_every=3), tokenizer=tok)
    reloaded = load_hf(result.export_dir)
    after = float(objectives.nll(reloaded, rows(forget))[0]), float(objectives.nll(reloaded, rows(retain))[0])
    assert after[0] > before[0] and after[1] < before[1]
    assert (result.export_dir / "tokenizer.json").is_file()


def test_a_rerun_resumes_only_the_same_run_and_changes_nothing_otherwise(reference_run, tmp_path):
    import shutil

    from step_fixtures import tiny_model

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    snapshot = lambda: {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = snapshot()
    forget, retain = _tiny_data()
    with pytest.raises(train.ResumeError, match=r"optim.lr: 0.01 -> 0.02"):
        train.unlearn(tiny_model(), forget, retain, _config(run, max_steps=8, optim=config.OptimConfig(lr=0.02)))
    with pytest.raises(train.ResumeError, match=r"model.weights: 'bits:"):
        train.unlearn(tiny_model(seed=1), forget, retain, _config(run, max_steps=8))
    with pytest.raises(train.ResumeError, match=r"data.retain.tokens"):
        train.unlearn(tiny_model(), forget, {k: v[:16] for k, v in retain.items()}, _config(run, max_steps=8))
    with pytest.raises(train.ResumeError, match=r"'max_steps' gives 6 steps, but .* step 8"):
        train.unlearn(tiny_model(), forget, retain, _config(run, max_steps=6))
    assert snapshot() == before
    again = train.unlearn(tiny_model(), forget, retain, _config(run, max_steps=8, save_every=4, log_every=2))
    assert again.resumed_from == 8 and again.steps_done == 8  # how often it saves or logs does not define it
