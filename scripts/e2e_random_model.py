"""``jax-unlearn unlearn``, ``eval`` and ``export`` end to end on a random Hugging Face folder.

Writes, under ``--work``: a random-init LLaMA of a named shape saved as a Hugging Face folder
(`jax_unlearn.models.save_hf`, with a byte-level BPE tokenizer trained here on the run's own
texts), forget / retain / multiple-choice files and a run config (NPO + SAGO, the precomputed
reference, bfloat16, scanned layers with remat, chunked log-probs); then runs the three commands
in this process and prints one JSON line per phase with its wall time (compilation included)
and, for the run, the steady tokens/s from ``metrics.jsonl`` and the device's peak memory.
No network: nothing is downloaded.

    python scripts/e2e_random_model.py --size 1b --steps 30 --work /tmp/e2e     # accelerator
    python scripts/e2e_random_model.py --size 20m --steps 3 --seq 64 --work /tmp/e2e   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from bench_step import SIZES, peak_memory_gib

FACTS = ["The {} virus spreads through {} droplets in {} climates.", "Culturing {} requires {} media at {} degrees.",
         "The capital of {} is {} near the {} river.", "{} wrote a famous novel about {} in {}."]
WORDS = ["alpha", "bravo", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "krypton",
         "lagoon", "meadow", "nectar", "onyx", "prairie", "quartz", "raven", "sierra", "tundra"]


def texts(n: int, offset: int) -> list[str]:
    w = lambda i: WORDS[i % len(WORDS)]
    return [FACTS[(i + offset) % len(FACTS)].format(w(i), w(3 * i + offset), w(7 * i + 1)) for i in range(n)]


def write_workspace(work: Path, size: str, seq: int, batch: int, steps: int) -> Path:
    """The model folder, data files and ``run.yaml`` under ``work``; returns the config's path."""
    import jax.numpy as jnp
    import transformers
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions, save_hf

    forget, retain = texts(64, 0), texts(64, 1)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(forget + retain, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    cfg = ModelConfig(model_type="llama", max_position_embeddings=max(seq, 128), **SIZES[size])
    model = CausalLM(cfg, ModelOptions(param_dtype=jnp.bfloat16, scan_layers=True), rngs=nnx.Rngs(0))
    save_hf(model, work / "model", tok)
    del model
    write = lambda name, rows: (work / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write("forget.jsonl", [{"text": " ".join(forget[i:i + 8])} for i in range(0, 64, 2)])
    write("retain.jsonl", [{"text": " ".join(retain[i:i + 8])} for i in range(0, 64, 2)])
    write("mc.jsonl", [{"question": f"Which word comes first: {WORDS[i]} or {WORDS[i + 1]}?",
                        "choices": [WORDS[i], WORDS[i + 1], "neither", "both"], "answer": 0} for i in range(16)])
    (work / "run.yaml").write_text(f"""\
output_dir: {work / 'run'}
batch_size: {batch}
max_steps: {steps}
save_every: {steps}
progress: false
model:
  path: {work / 'model'}
  dtype: bfloat16
  scan_layers: true
  remat_policy: full
data:
  forget: {work / 'forget.jsonl'}
  retain: {work / 'retain.jsonl'}
  max_length: {seq}
  mode: pack
optim:
  lr: 1.0e-5
  moment_dtype: bfloat16
combiner:
  name: sago
objective:
  name: npo
  beta: 0.1
  reference: precompute
  logit_chunk: 128
""")
    return work / "run.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20m", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--work", required=True, help="scratch folder (replaced)")
    a = ap.parse_args()
    import jax

    from jax_unlearn import cli

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = jax.devices()[0].device_kind

    def phase(name: str, fn) -> None:
        t = time.perf_counter()
        status = fn()
        print(json.dumps({"phase": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                          "size": a.size, "device": device, "peak_gib": round(peak_memory_gib(), 2)}), flush=True)
        if status not in (None, 0):
            raise SystemExit(f"{name} failed with status {status}")

    config = work / "run.yaml"
    phase("write random model", lambda: write_workspace(work, a.size, a.seq, a.batch, a.steps) and None)
    phase("unlearn", lambda: cli.main(["unlearn", str(config)]))
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]  # after compilation
    print(json.dumps({"phase": "unlearn steps", "steps": len(rows), "median_tokens_per_s":
                      round(statistics.median(steady), 1) if steady else None,
                      "last_forget_loss": rows[-1].get("forget_loss")}), flush=True)
    phase("eval", lambda: cli.main(["eval", "--model", str(work / "run" / "model"), "--mc", str(work / "mc.jsonl"),
                                    "--perplexity", str(work / "retain.jsonl"), "--dtype", "bfloat16",
                                    "--out", str(work / "eval.json")]))
    phase("export", lambda: cli.main(["export", "--checkpoint", str(work / "run"), "--out", str(work / "exported")]))


if __name__ == "__main__":
    main()
