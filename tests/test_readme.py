"""The README's Python examples run as written (in a folder holding a tiny "my-llama")."""

import pathlib
import re

import jax
import numpy as np
import transformers
from hf_fixtures import make_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
WORDS = "the secret recipe is salt weather mild today".split()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def make_my_llama(folder: pathlib.Path) -> None:
    """A tiny random LLaMA with a word-level tokenizer, saved as a Hugging Face folder."""
    make_checkpoint(folder, "mqa_tied")
    vocab = {"[PAD]": 0, "[UNK]": 3, **{w: 10 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                               eos_token="[PAD]")
    tok.save_pretrained(folder)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    make_my_llama(tmp_path / "my-llama")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    # The accumulation example ran 4 micro-steps: exactly one optimizer step was taken.
    assert int(namespace["state"].gradient_step) == 1
    assert namespace["logits"].shape == (1, 3, 128)
    assert (tmp_path / "my-llama-export" / "config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-llama-merged" / "model.safetensors").is_file()
    assert namespace["same"].layers[0].self_attn.q_proj_lora.lora_a.shape == (64, 8)
    result = namespace["result"]
    assert result.steps_done == 4 and (tmp_path / "runs/sago/model/model.safetensors").is_file()
    assert (tmp_path / "runs/sago/model/tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs/sago/model")
    assert reloaded.config.vocab_size == 128
    mc = namespace["mc"]
    assert len(mc.predictions) == 4 and mc.accuracy == (mc.predictions == 0).mean()  # every answer is choice 0
    assert set(namespace["qa"].by_level) == {"forget_1", "neighbor_1"}
    # the learning-rate sweep reuses its compiled step: one more rate adds no compilation
    ns = namespace
    step, before = ns["unlearn_step"], ns["unlearn_step"]._cache_size()
    _, run = ns["st"].init_state(ns["model"], ns["tx"], ns["objective"])
    run = run._replace(opt_state=ns["config"].set_hyperparams(run.opt_state, learning_rate=3e-3))
    ns["train"].run_steps(step, run, ns["pairs"], 0, 2)
    assert step._cache_size() == before
    # the large-model example: sharded start-up, precomputed NPO reference, LoRA adapters alone
    assert ns["big_state"].ref is None and np.isfinite(float(ns["big_metrics"]["forget_loss"]))
    assert len(ns["big_state"].params["embed_tokens"][...].sharding.device_set) == 8
    assert {x.dtype for x in jax.tree.leaves(ns["lora_state"].params)} == {np.dtype("float32")}
    assert len(jax.tree.leaves(ns["lora_state"].params)) == 2 * 7 * ns["lora_big"].config.num_hidden_layers
    nll = namespace["forget_nll"]
    assert nll[1e-2] > nll[1e-3]  # gradient ascent on the forget set: a larger rate forgets more
    assert namespace["done"] == 4
    # the Python run is the command's run: the same files, the same weights
    from jax_unlearn import cli

    assert cli.main(["unlearn", "run.yaml", "output_dir=runs/from_cli", "optim.lr=1e-5", "progress=false"]) == 0
    python, command = tmp_path / "runs/from_python", tmp_path / "runs/from_cli"
    assert namespace["run_result"].export_dir == pathlib.Path("runs/from_python/model")
    assert (python / "config.yaml").read_text().replace("from_python", "X") == \
        (command / "config.yaml").read_text().replace("from_cli", "X").replace("progress: false", "progress: true")
    assert (python / "fingerprint.json").read_text() == (command / "fingerprint.json").read_text()
    assert (python / "model/model.safetensors").read_bytes() == (command / "model/model.safetensors").read_bytes()


def test_readme_main_command_is_the_demo_with_its_extra():
    import tomllib

    first = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    assert 'pip install -e ".[demo]"' in first and first.strip().endswith("jax-unlearn demo")
    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    demo = " ".join(project["optional-dependencies"]["demo"])
    for package in ("tokenizers", "transformers", "safetensors", "matplotlib"):
        assert package in demo
    assert project["scripts"]["jax-unlearn"] == "jax_unlearn.cli:main"
