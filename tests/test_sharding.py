"""`sharding.maybe_initialize_distributed`: which environments start a multi-host run."""

import jax
import pytest


@pytest.mark.parametrize("value, hosts", [
    ("t1v-n-0,t1v-n-1", ["t1v-n-0", "t1v-n-1"]), ("10.0.0.2, 10.0.0.3", ["10.0.0.2", "10.0.0.3"]),
    ("", []), ("WARNING: could not determine TPU worker hostnames or IP addresses, please set env var "
               "`TPU_WORKER_HOSTNAMES` manually, otherwise libtpu.so may not properly initialize.", [])])
def test_only_host_names_in_tpu_worker_hostnames_start_a_multi_host_run(monkeypatch, value, hosts):
    """libtpu, installed on a machine without TPUs (the `plan` extra), writes a warning sentence
    with a comma into TPU_WORKER_HOSTNAMES: that is no slice of two hosts."""
    from jax_unlearn import sharding as sh

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", value)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: started.append(1))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert sh.tpu_worker_hostnames() == hosts
    assert sh.maybe_initialize_distributed() == (len(hosts) > 1) and len(started) == (len(hosts) > 1)
