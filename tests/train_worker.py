"""Runs one small unlearning job in its own process (for kill / signal / multi-host tests).

    python tests/train_worker.py OUTPUT_DIR '{"max_steps": 8, ...}'   # TrainConfig fields

Builds the tiny model and data sets of step_fixtures from fixed seeds, so every process
starts from the same model and data.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from jax_unlearn import sharding as sh

    distributed = sh.maybe_initialize_distributed()
    import numpy as np
    from step_fixtures import make_batch, tiny_model

    from jax_unlearn import config, train

    out, overrides = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    nested = {"optim": config.OptimConfig, "combiner": config.CombinerConfig, "objective": config.ObjectiveConfig,
              "mesh": sh.MeshConfig}
    kwargs = {k: nested[k](**v) if k in nested else v for k, v in overrides.items()}
    cfg = config.TrainConfig(output_dir=out, progress=False, **kwargs)
    forget = {k: np.asarray(v) for k, v in make_batch(11, rows=16).items()}
    retain = {k: np.asarray(v) for k, v in make_batch(12, rows=24).items()}
    result = train.unlearn(tiny_model(), forget, retain, cfg)
    print(json.dumps({"steps_done": result.steps_done, "interrupted": result.interrupted,
                      "resumed_from": result.resumed_from, "distributed": distributed}), flush=True)


if __name__ == "__main__":
    main()
