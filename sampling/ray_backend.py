"""Rejection sampling on a Ray cluster (`sampling.backend: ray`): one actor per vLLM engine, shards handed out
as actors free up, every shard file written by the driver.

    driver (sampling.sample.main, this module's `run`)     actors, anywhere in the cluster (EngineActor)
      plan, shards, resume by shard (as local)              one vLLM engine + the reward model (load_engines)
      hands the next unfinished shard to an idle actor  ->  sample_shard: generate + score, the local code path
      writes each returned shard atomically (data/io)   <-  the shard's records, through Ray's object store
      progress over prompts, metrics (ray_*)

- No shared filesystem for outputs: records come back to the driver and only the driver writes, so a shard on
  disk is whole or absent and resume-by-shard works unchanged. Only the model folders (policy, reward model)
  must be readable at the same path on every node, with this checkout and its virtualenv.
- Same candidates as the local backend: same engine arguments (engine_kwargs), per-prompt seeds, same shards;
  which actor ran a shard changes nothing.
- Placement: one placement group per engine with one STRICT_PACK bundle: `tensor_parallel` GPUs (+ CPUs) on GPU
  clusters, CPUs only on CPU clusters; the actor holds the whole bundle, so its engine's tensor-parallel workers
  are its own children on the GPUs Ray gave it, as a local worker's are (engine_kwargs pins vLLM's "mp" executor).
- Faults: an actor that dies (killed, OOM, node lost) fails its shard (max_task_retries=0: Ray never re-runs a
  shard behind the driver's back); the driver hands the shard out again and counts it (`ray_retries`). The actor
  comes back through Ray's max_restarts; once those are spent (or after `ray.kill`) the driver starts a new one in
  the same placement group. A driver killed with kill -9 leaves whole shards only: a rerun resumes from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass

import ray
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.config import ConfigError, SamplingConfig
from core.tracking import progress
from data.io import write_jsonl
from sampling.engine import SHARD_FMT, engine_env, load_engines, sample_shard, with_device

MAX_RESTARTS = 3  # Ray's restarts of one actor: a new process, its engine loaded again
MAX_REPLACEMENTS = 2  # new actors per engine once Ray's restarts are spent (or after ray.kill)
MAX_SHARD_TRIES = 3  # a shard that lost its actor this often stops the stage (rerun to resume): a crash it causes
# lost actors: the actor died (killed, OOM-killed, its node lost) - its shard is handed out again
FAULTS = (RayActorError, OutOfMemoryError)


class EngineActor:
    """One vLLM engine and the reward model in a Ray actor: what a local worker process holds."""

    def __init__(self, spec: dict):
        self.cfg, self.fmt, self.llm, self.rm = load_engines(spec)

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def sample(self, idx: int, entries: list[dict]) -> list[dict]:
        return sample_shard(self.llm, self.rm, idx, entries, self.cfg, self.fmt)


def engine_shape(nodes: list[dict], cfg: SamplingConfig) -> tuple[dict, int]:
    """(one engine's bundle, how many such bundles the alive nodes hold). `nodes`: each node's resources. GPU
    clusters: `tensor_parallel` GPUs (with `engines_per_gpu` > 1, that fraction of one GPU, which Ray packs onto
    shared GPUs) and `cpus_per_engine` (or 1) CPUs an engine; CPU clusters: `cpus_per_engine` CPUs, or the
    largest node's: one engine per node (a vLLM-CPU engine uses every core it is given, so two on one node
    would only share them), none on a smaller head node. A bundle is one node's: engines per node, summed
    (4 GPUs of 2 nodes hold no tensor_parallel=4 engine)."""
    if any(n.get("GPU", 0) >= 1 for n in nodes):
        share = cfg.tensor_parallel if cfg.engines_per_gpu == 1 else round(1 / cfg.engines_per_gpu, 4)
        bundle = {"GPU": share, "CPU": cfg.cpus_per_engine or 1}
        # counted in whole GPUs, never GPUs // share: in floating point 1 // (1 / 3) is 2.0
        return bundle, sum(min(int(n.get("GPU", 0) // cfg.tensor_parallel) * cfg.engines_per_gpu,
                               int(n.get("CPU", 0) // bundle["CPU"])) for n in nodes)
    cpus = [int(n["CPU"]) for n in nodes if n.get("CPU", 0) >= 1]
    bundle = {"CPU": cfg.cpus_per_engine or max(cpus, default=1)}
    return bundle, sum(int(n.get("CPU", 0) // bundle["CPU"]) for n in nodes)


def connect(cfg: SamplingConfig) -> None:
    """Join the recipe's Ray cluster, or start a local instance with this machine's resources."""
    try:
        if cfg.ray_address is None:  # "local": never an unrelated cluster found through RAY_ADDRESS
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an instance of our own reports nowhere
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as e:
        raise ConfigError(f"sampling.ray_address={cfg.ray_address!r}: cannot reach a Ray cluster ({str(e).splitlines()[0]}); "
                          "start one with `ray start --head`, or leave ray_address unset for a local instance") from None


def run(todo: list[tuple[int, list[dict]]], spec: dict, cand_dir, cfg: SamplingConfig, on_done=None,
        on_dispatch=None) -> dict:
    """Sample the `todo` shards on Ray; each shard file written as it lands (`on_done(shard indices)` after).
    Returns the backend's metrics. Uses the Ray instance this process is connected to, if any (and leaves it
    up), else `connect`s and shuts down after. `on_dispatch(shard index, actor)`: called after each hand-out."""
    ours = not ray.is_initialized()
    if ours:
        connect(cfg)
    try:
        return _Driver(todo, spec, cand_dir, cfg, on_done, on_dispatch).run()
    finally:
        if ours:
            ray.shutdown()


@dataclass
class _Slot:
    """One engine: its placement group, its actor (replaced when lost for good) and what it did."""

    rank: int
    pg: object
    actor: object = None
    info: dict | None = None
    state: str = "starting"  # starting | idle | busy | dead
    starts: int = 0  # processes that came up (the first, Ray's restarts, replacements)
    replacements: int = 0
    shards: int = 0
    prompts: int = 0
    tokens: int = 0
    gen_seconds: float = 0.0


class _Driver:
    def __init__(self, todo, spec, cand_dir, cfg: SamplingConfig, on_done, on_dispatch):
        self.todo, self.cand_dir, self.cfg, self.on_done, self.on_dispatch = todo, cand_dir, cfg, on_done, on_dispatch
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.bundle, fits = engine_shape(nodes, cfg)
        where = f"the Ray cluster ({len(nodes)} node(s): {ray.cluster_resources().get('CPU', 0):g} CPUs, " \
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs)"
        if fits == 0:
            raise ConfigError(f"sampling: {where} has no node with one engine's {self.bundle} "
                              "(sampling.tensor_parallel, sampling.cpus_per_engine)")
        if cfg.engines > fits:
            raise ConfigError(f"sampling.engines={cfg.engines}: {where} holds {fits} engine(s) of {self.bundle}")
        self.n = min(cfg.engines or fits, len(todo))
        cpu = "GPU" not in self.bundle
        self.spec = with_device(spec, cpu=cpu)
        # the driver's vLLM settings (KV cache size, logging, ...) hold for every engine, wherever it runs
        self.env = engine_env({k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "PYTHONPATH"})
        self.queue = deque(todo)
        self.pending: dict = {}  # ObjectRef -> (slot, shard or None: a readiness probe)
        self.tries: Counter = Counter()
        self.retries = 0
        self.slots: list[_Slot] = []

    # -- actors ------------------------------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        opts = dict(num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), max_restarts=MAX_RESTARTS,
                    max_task_retries=0,  # a lost shard comes back to the driver, which hands it out and counts it
                    runtime_env={"env_vars": self.env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(slot.pg, placement_group_bundle_index=0))
        slot.actor = ray.remote(EngineActor).options(**opts).remote({**self.spec, "rank": slot.rank})
        self._probe(slot)

    def _probe(self, slot: _Slot) -> None:
        """Ask the actor who it is: answered once its engine is up (after a restart too), fails if it is gone."""
        slot.state = "starting"
        self.pending[slot.actor.info.remote()] = (slot, None)

    def _lost(self, slot: _Slot, shard, err: Exception) -> None:
        if isinstance(err, RayActorError) and err.actor_init_failed:  # its engine cannot start: a restart won't help
            raise RuntimeError(f"sampling actor {slot.rank}: engine failed to start: {err}")
        if shard is not None:
            idx = shard[0]
            self.retries += 1
            self.tries[idx] += 1
            if self.tries[idx] >= MAX_SHARD_TRIES:
                raise RuntimeError(f"sampling shard {idx}: its actor died {self.tries[idx]} times ({type(err).__name__}); "
                                   "rerun to resume from the shards written")
            self.queue.appendleft(shard)
            print(f"[sampling ray] actor {slot.rank} lost with shard {idx} ({type(err).__name__}): shard handed out again",
                  file=sys.stderr, flush=True)
            self._probe(slot)  # Ray restarts it if it may
        elif slot.replacements < MAX_REPLACEMENTS:  # its probe failed: gone for good, a new one in its placement group
            slot.replacements += 1
            ray.kill(slot.actor)
            print(f"[sampling ray] actor {slot.rank} gone ({type(err).__name__}): starting a new one", file=sys.stderr, flush=True)
            self._start(slot)
        else:
            slot.state = "dead"

    def _dispatch(self) -> None:
        for slot in self.slots:
            if slot.state == "idle" and self.queue:
                shard = self.queue.popleft()
                self.pending[slot.actor.sample.remote(*shard)] = (slot, shard)
                slot.state = "busy"
                if self.on_dispatch is not None:
                    self.on_dispatch(shard[0], slot.actor)

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        try:
            self.slots = [_Slot(rank, placement_group([self.bundle], strategy="STRICT_PACK")) for rank in range(self.n)]
            # engines that may share a GPU start one after another (sample.start_after says why); Ray decides
            # which GPU an actor gets, so each waits for the one before it
            unstarted = deque(self.slots[1:] if "GPU" in self.bundle and self.cfg.engines_per_gpu > 1 else [])
            for slot in self.slots[:1] if unstarted else self.slots:
                self._start(slot)
            done: list[int] = []
            with progress(total=sum(len(e) for _, e in self.todo), desc="sampling prompts", unit="prompt") as bar:
                while self.queue or any(shard is not None for _, shard in self.pending.values()):
                    self._dispatch()
                    if not self.pending:
                        raise RuntimeError(f"sampling: every Ray actor is gone, {len(self.queue)} shard(s) left; "
                                           "rerun to resume from the shards written")
                    ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                    for ref in ready:
                        slot, shard = self.pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except FAULTS as e:
                            self._lost(slot, shard, e)
                            continue
                        except RayTaskError as e:  # a bug or bad input: the same on any actor
                            raise RuntimeError(f"sampling actor {slot.rank} failed on shard {shard and shard[0]}: {e}; "
                                               "rerun to resume from the shards written") from None
                        slot.state = "idle"
                        if shard is None:
                            slot.info, slot.starts = result, slot.starts + 1
                            if unstarted:
                                self._start(unstarted.popleft())
                            continue
                        self._dispatch()  # keep the actor busy while its shard is written
                        idx, entries = shard
                        write_jsonl(self.cand_dir / SHARD_FMT.format(idx), result)
                        cands = [c for r in result for c in r["candidates"]]
                        slot.shards, slot.prompts = slot.shards + 1, slot.prompts + len(result)
                        slot.tokens += sum(c["num_tokens"] for c in cands)
                        slot.gen_seconds += sum(r["gen_seconds"] for r in result)
                        done.append(idx)
                        bar.update(len(entries))
                        if self.on_done is not None:
                            self.on_done(sorted(done))
        finally:
            for slot in self.slots:  # quietly: a failed cleanup must not hide why the loop ended
                with contextlib.suppress(Exception):
                    if slot.actor is not None:
                        ray.kill(slot.actor)
                    remove_placement_group(slot.pg)
        return self.metrics(time.perf_counter() - t0)

    def metrics(self, wall: float) -> dict:
        actors = [{"actor": s.rank, "node": (s.info or {}).get("host"), "node_id": (s.info or {}).get("node_id"),
                   "shards": s.shards, "prompts": s.prompts, "generated_tokens": s.tokens,
                   "generation_seconds": round(s.gen_seconds, 3),
                   "tokens_per_s": round(s.tokens / s.gen_seconds, 2) if s.gen_seconds else None,
                   "restarts": max(0, s.starts - 1)} for s in self.slots]
        return {"engines": self.n, "ray_retries": self.retries, "ray_restarts": sum(a["restarts"] for a in actors),
                "ray_nodes": len({a["node_id"] for a in actors if a["node_id"]}), "ray_engine": self.bundle,
                "ray_actors": actors, "ray_wall_seconds": round(wall, 2)}
