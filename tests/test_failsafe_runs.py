"""Fail-safe runs: a stage refuses inputs from an upstream stage that did not finish or changed since, checks
them against the sizes/mtimes/hashes its producer recorded (re-reading a file only when those moved), and one
run at a time holds a stage folder (.lock, flock).

Fake stage folders with small files and core.runs.StageRun directly; the CLI paths through pipeline.run.main
with the stage entry points never reached (they fail or are refused before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import core.runs
from core.runs import StageBusy, StageRun, UpstreamError, recorded_hash, stage_lock

ROOT = Path(__file__).resolve().parents[1]


def finished(folder: Path, files: dict[str, bytes], stage: str | None = None) -> Path:
    """A stage folder holding `files`, finished (manifest with its output record)."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    StageRun(folder, stage or folder.name, {}, {}).finish({})
    return folder


def consumer(run: Path, inputs: dict, stage: str = "dpo") -> StageRun:
    return StageRun(run / stage, stage, {"lr": 1}, inputs, run_dir=run)


@pytest.fixture
def run(tmp_path) -> Path:
    return tmp_path / "runs" / "x"


# -- unfinished upstream ----------------------------------------------------------------------------------------
def test_unfinished_upstream_is_refused_naming_the_stage(run):
    (run / "sample").mkdir(parents=True)
    (run / "sample" / "pairs.jsonl").write_text("{}\n")  # an old file: the rerun was killed before its manifest
    with pytest.raises(UpstreamError) as e:
        consumer(run, {"data": run / "sample" / "pairs.jsonl"})
    assert str(e.value) == f"{run / 'sample'}: unfinished (no manifest: the stage did not complete); rerun: make sample"

    (run / "round2" / "sft" / "model").mkdir(parents=True)  # a reward stage on an SFT folder whose run died
    (run / "round2" / "sft" / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(UpstreamError) as e:
        consumer(run, {"model": run / "round2" / "sft" / "model"}, "reward")
    assert str(e.value) == f"{run / 'round2' / 'sft'}: unfinished (manifest not marked complete); rerun: make sft ROUND=2"


def test_rerun_drops_the_manifest_first(run):
    """A producer rerun killed midway leaves its folder unfinished, not complete with half-new outputs."""
    finished(run / "sample", {"pairs.jsonl": b"a\n"})
    consumer(run, {"data": run / "sample" / "pairs.jsonl"})
    StageRun(run / "sample", "sample", {}, {}).start()
    with pytest.raises(UpstreamError, match="sample: unfinished"):
        consumer(run, {"data": run / "sample" / "pairs.jsonl"})


def test_inputs_outside_the_run_and_unstarted_stages_are_as_before(run, tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text("a\n")
    assert consumer(run, {"data": user}).input_hashes == {"data": core.runs.hash_path(user)}
    with pytest.raises(FileNotFoundError, match="missing input data="):  # the stage never ran: no folder
        consumer(run, {"data": run / "sample" / "pairs.jsonl"})


# -- changed since -------------------------------------------------------------------------------------------
def test_manifest_records_outputs_but_not_logs_lock_or_manifest(run):
    (run / "sft" / "logs").mkdir(parents=True)
    (run / "sft" / "logs" / "events").write_text("x")
    (run / "sft" / ".lock").write_text("1")
    finished(run / "sft", {"model/model.safetensors": b"w" * 10, "eval_responses.jsonl": b"{}\n"})
    out = json.loads((run / "sft" / "manifest.json").read_text())["outputs"]
    assert sorted(out) == ["eval_responses.jsonl", "model/model.safetensors"]
    rec = out["model/model.safetensors"]
    st = (run / "sft" / "model" / "model.safetensors").stat()
    assert (rec["size"], rec["mtime_ns"]) == (10, st.st_mtime_ns) and len(rec["sha256"]) == 64


def test_changed_file_is_stale_touched_file_is_not(run):
    pairs = finished(run / "sample", {"pairs.jsonl": b"a\n", "best_of_k.jsonl": b"b\n"}) / "pairs.jsonl"
    key = consumer(run, {"data": pairs}).key()

    st = pairs.stat()
    os.utime(pairs, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched (or copied back): same bytes
    assert consumer(run, {"data": pairs}).key() == key

    pairs.write_bytes(b"z\n")  # same size, other bytes: re-hashed on the mtime mismatch
    with pytest.raises(UpstreamError) as e:
        consumer(run, {"data": pairs})
    assert str(e.value) == f"{pairs}: changed since the sample stage finished; rerun: make sample"


def test_model_folder_with_a_file_added_or_lost_is_stale(run):
    model = finished(run / "sft", {"model/config.json": b"{}", "model/model.safetensors": b"w" * 100}) / "model"
    consumer(run, {"model": model}, "reward")
    (model / "adapter_config.json").write_text("{}")
    with pytest.raises(UpstreamError, match=r"model/adapter_config.json: new since the sft stage finished; rerun: make sft$"):
        consumer(run, {"model": model}, "reward")
    (model / "adapter_config.json").unlink()
    (model / "model.safetensors").unlink()
    with pytest.raises(UpstreamError, match=r"model/model.safetensors: missing since the sft stage finished; rerun: make sft$"):
        consumer(run, {"model": model}, "reward")


def test_whole_stage_folder_input_ignores_logs(run):
    """The eval stage reads whole stage folders: outputs count, logs and checkpoints do not."""
    folder = finished(run / "dpo", {"model/w": b"1", "eval_responses.jsonl": b"{}\n"})
    key = consumer(run, {"r1/dpo": folder}, "eval").key()
    (folder / "logs").mkdir()
    (folder / "logs" / "more").write_text("x")
    assert consumer(run, {"r1/dpo": folder}, "eval").key() == key
    (folder / "eval_responses.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UpstreamError, match="eval_responses.jsonl: changed since the dpo stage finished"):
        consumer(run, {"r1/dpo": folder}, "eval")


def test_a_rerun_producer_makes_its_consumer_out_of_date(run):
    pairs = finished(run / "sample", {"pairs.jsonl": b"a\n"}) / "pairs.jsonl"
    consumer(run, {"data": pairs}).finish({})
    assert consumer(run, {"data": pairs}).is_up_to_date()
    finished(run / "sample", {"pairs.jsonl": b"new pairs\n"})  # the sample stage ran again
    assert not consumer(run, {"data": pairs}).is_up_to_date()


def test_manifest_without_output_record_is_hashed_in_full(run):
    """Runs finished before output records: their inputs hash as they did, so nothing reruns."""
    (run / "sample").mkdir(parents=True)
    (run / "sample" / "pairs.jsonl").write_text("a\n")
    (run / "sample" / "manifest.json").write_text(json.dumps({"complete": True}))
    pairs = run / "sample" / "pairs.jsonl"
    assert consumer(run, {"data": pairs}).input_hashes == {"data": core.runs.hash_path(pairs)}


# -- hashed once --------------------------------------------------------------------------------------------
def test_up_to_date_check_reads_no_input_bytes(run, monkeypatch):
    model = finished(run / "sft", {"model/model.safetensors": os.urandom(1 << 20), "model/config.json": b"{}"}) / "model"
    consumer(run, {"model": model}, "reward").finish({})
    calls = []
    monkeypatch.setattr(core.runs, "file_sha256", lambda p: calls.append(Path(p).name) or "x")
    monkeypatch.setattr(core.runs, "hash_path", lambda p: calls.append(Path(p).name) or "x")
    assert consumer(run, {"model": model}, "reward").is_up_to_date()
    assert recorded_hash(model) == consumer(run, {"model": model}, "reward").input_hashes["model"]  # the sampler's key
    assert calls == []
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(UpstreamError):  # the patched hash differs from the record: re-read, this file only
        consumer(run, {"model": model}, "reward")
    assert calls == ["config.json"]


# -- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,upstream", [("dpo", "sample/pairs.jsonl"), ("reward", "sft/model/model.safetensors")])
def test_cli_refuses_an_unfinished_upstream_in_one_line(tmp_path, capsys, stage, upstream):
    from pipeline.run import main

    base = tmp_path / "default"
    finished(base / "prepare", {"data/preference.jsonl": b"{}\n", "data/eval_preference.jsonl": b"{}\n",
                                "data/eval_prompts.jsonl": b"{}\n"})
    finished(base / upstream.split("/")[0], {upstream.split("/", 1)[1]: b"old\n"})
    StageRun(base / upstream.split("/")[0], "", {}, {}).start()  # rerun, then killed: no manifest
    assert main([str(ROOT / "recipes/default.yaml"), f"output_dir={tmp_path}", "--stage", stage]) == 2
    err = capsys.readouterr().err
    name = upstream.split("/")[0]
    assert err.splitlines() == [f"error: {base / name}: unfinished (no manifest: the stage did not complete); rerun: make {name}"]
    assert not (base / stage).exists()  # refused before anything was written


# -- the lock -------------------------------------------------------------------------------------------------
HOLD = "import sys, time\nfrom core.runs import stage_lock\nwith stage_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"


@pytest.fixture
def holder(tmp_path):
    """Another process holding runs/default/prepare/.lock."""
    folder = tmp_path / "default" / "prepare"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, folder
    proc.kill()
    proc.wait()


def test_second_run_is_refused_naming_the_pid_then_takes_over_a_dead_holder(holder):
    proc, folder = holder
    with pytest.raises(StageBusy) as e:
        with stage_lock(folder):
            pass
    assert str(e.value).startswith(f"{folder}: another run is writing this stage (pid {proc.pid} on ")
    proc.kill()  # kill -9: no cleanup ran, the kernel dropped the lock
    proc.wait()
    with stage_lock(folder):
        assert (folder / ".lock").read_text().split()[0] == str(os.getpid())


def test_cli_second_run_is_one_line_and_other_ranks_are_not_refused(holder, tmp_path, capsys, monkeypatch):
    import pipeline.run

    proc, folder = holder
    assert pipeline.run.main([str(ROOT / "recipes/default.yaml"), f"output_dir={tmp_path}", "--stage", "prepare"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {folder}: another run is writing this stage (pid {proc.pid} on ")
    assert not (folder / "manifest.json").exists()

    # rank 1 of a launched stage runs alongside its rank 0, which holds the lock
    monkeypatch.setitem(pipeline.run.STAGES, "prepare", lambda recipe, out, inputs: {"ran": 1})
    monkeypatch.setenv("RANK", "1")
    recipe = pipeline.run.load_recipe(ROOT / "recipes/default.yaml", [f"output_dir={tmp_path}"])
    assert pipeline.run.run_stage(recipe, "prepare") == {"ran": 1}
