"""The dashboard (evals/dashboard.py): its data assembly on a fixture run of 2 rounds, and the page itself,
opened in headless Chromium (Debian's `chromium`, installed here when missing) through the DevTools
protocol: it must load with no console error, no page error and no network request, and draw every chart.
The screenshot lands next to the report (report/screenshot.png)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from data import default_task
from core.config import SamplingConfig
from evals import dashboard
from sampling.sample import write_outputs

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
EVIL = "</script><script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
K = 4


# -- a plausible run folder of two rounds ------------------------------------------------------------------
def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, recs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _log(path: Path, rng, keys, steps=60) -> None:
    _jsonl(path, [{"step": s, **{k: round(f(s) + rng.gauss(0, 0.02), 5) for k, f in keys.items()}} for s in range(0, steps, 3)])


def _policy(rng, gold, samples=True) -> dict:
    m = {"gold_score": gold, "pass_rate": gold * 0.8, "mean_length": rng.uniform(3, 9), "stop_rate": 0.98,
         "gold_by_category": {"color": gold, "sound": gold, "opposite": gold}, "steps": 60, "first_loss": 3.0,
         "final_loss": 0.5, "wall_seconds": 12.0, "win_rate_vs_sft_rm": rng.uniform(0.5, 0.8),
         "win_rate_vs_sft_gold": rng.uniform(0.5, 0.8), "kl_to_sft": rng.uniform(0.1, 3), "mean_reward": rng.gauss(0, 1),
         "reward_length_corr": rng.uniform(-0.3, 0.3)}
    if samples:
        m["samples"] = [{"prompt": "Omar wonders: what color is a banana?", "response": "yellow", "gold": 1.0},
                        {"prompt": "Lena asks: what is the opposite of hot?", "response": EVIL, "gold": 0.0}]
    return m


def candidates(rng, prompt: dict, i: int) -> list[dict]:
    """K candidates: right, chatty, wrong answers; in some prompts the highest reward is a truncated one,
    in one every candidate is truncated."""
    user = prompt["prompt"][-1]["content"]
    answer = default_task.parse_prompt(user)[1]
    texts = [answer, f"Sure! Here it is: {answer}", "purple", EVIL if i == 1 else "no idea"]
    cands = [{"k": j, "text": t, "reward": round(rng.gauss(1.0 - j * 0.5, 0.3), 4), "truncated": False,
              "num_tokens": len(t.split()) + 1, "completion_ids": [5, 6, 7], "finish_reason": "stop"} for j, t in enumerate(texts)]
    if i == 2:  # the best reward on a truncated candidate
        cands[3].update(reward=9.0, truncated=True, finish_reason="length")
    if i == 3:
        for c in cands:
            c.update(truncated=True, finish_reason="length")
    return cands


def write_run(root: Path, name: str = "demo", rounds: int = 2, seed: int = 0) -> Path:
    rng = random.Random(seed)
    run = root / name
    data = default_task.generate(seed, 8, 8, 8, 8, 12)
    prep = _policy(rng, 0.03)
    _write(run / "prepare" / "metrics.json", prep)
    report = {"schema": 1, "recipe": name, "source": "recipes/default.yaml", "created": "2026-11-22T23:00:00Z",
              "rounds_planned": rounds, "rounds_completed": rounds, "rounds": [],
              "judge": {"reward_model": f"round{rounds}/reward" if rounds > 1 else "reward", "sft_policy": "sft", "seconds": 1.0}}
    for r in range(1, rounds + 1):
        d = (lambda s: s) if r == 1 else (lambda s, r=r: f"round{r}/{s}")
        stages = {}
        # SFT
        _log(run / d("sft") / "train_log.jsonl", rng, {"train/loss": lambda s: 3 * math.exp(-s / 15) + 0.4,
                                                       "train/lr": lambda s: 1e-3, "train/grad_norm": lambda s: 2.0})
        stages["sft"] = {**_policy(rng, 0.25 + 0.1 * r), "dir": d("sft")}
        if r == 1:  # the reference of the win rates and KLs (as evals/report.py leaves it)
            for k in ("win_rate_vs_sft_rm", "win_rate_vs_sft_gold", "kl_to_sft"):
                del stages["sft"][k]
        # reward model
        _log(run / d("reward") / "train_log.jsonl", rng, {"train/loss": lambda s: 0.69 * math.exp(-s / 30),
                                                          "train/accuracy": lambda s: min(1, 0.5 + s / 80)})
        pairs = [{"id": f"e{i}", "category": c, "type": t, "r_better": round(rng.gauss(1, 1), 4), "r_worse": round(rng.gauss(0, 1), 4)}
                 for i in range(60) for c, t in [(rng.choice(["color", "sound", "opposite"]), rng.choice(["edited>chosen", "chosen>rejected", "edited>rejected"]))]]
        _write(run / d("reward") / "eval_rewards.json", pairs)
        rm = {"rm_accuracy": 0.8 + 0.05 * r, "eval_pairs": 60, "steps": 60, "final_loss": 0.3,
              "rm_accuracy_by_pair": {"chosen>rejected": 0.9, "edited>chosen": 0.6, "edited>rejected": 0.95},
              "rm_accuracy_by_category": {"color": 0.8, "opposite": 0.85, "sound": 0.9},
              "calibration": [{"bucket": b, "abs_gap_min": b * 0.5, "abs_gap_max": b * 0.5 + 0.5, "n": 12, "accuracy": 0.6 + b * 0.08} for b in range(5)]}
        _write(run / d("reward") / "metrics.json", rm)
        stages["reward"] = {**rm, "dir": d("reward")}
        # rejection sampling
        recs = [{"id": p["id"], "category": p["category"], "prompt": p["prompt"], "prompt_ids": [1, 2], "shard": 0,
                 "candidates": candidates(rng, p, i)} for i, p in enumerate(data["prompts"])]
        _jsonl(run / d("sample") / "candidates" / "shard-00000.jsonl", recs)
        write_outputs(run / d("sample"), recs, SamplingConfig(k=K))  # best_of_k, pairs and selections.jsonl
        rw = [[c["reward"] for c in rec["candidates"]] for rec in recs]
        _write(run / d("sample") / "rewards.json", {"reward_distribution": {"ids": [x["id"] for x in recs], "best": [max(x) for x in rw],
                                                                            "mean": [sum(x) / K for x in rw], "worst": [min(x) for x in rw]}})
        _write(run / d("sample") / "manifest.json", {"complete": True, "config": {"seed": 0, "sampling": {"k": K, "rejected": "worst", "min_reward_gap": 0.0, "seed": 0}}})
        samp = {"prompts": len(recs), "k": K, "candidates": K * len(recs), "generated_tokens": 7 * K * len(recs),
                "reward_mean": 0.2, "reward_best_mean": 1.1, "reward_worst_mean": -0.6, "pairs": 10, "truncated_share": 0.1,
                "best_of_k_gold_score": 0.6 + 0.05 * r, "random_of_k_gold_score": 0.4, "oracle_of_k_gold_score": 0.9,
                "reward_length_corr": 0.12}
        _write(run / d("sample") / "metrics.json", samp)
        stages["sampling"] = {**samp, "dir": d("sample")}
        if r >= 2:
            stages["sft"]["dir"] = d("sft")
        # DPO
        _log(run / d("dpo") / "train_log.jsonl", rng, {
            "train/loss": lambda s: 0.9 * math.exp(-s / 20) + 0.2, "train/rewards/margins": lambda s: s / 20,
            "train/rewards/accuracies": lambda s: min(1, 0.5 + s / 50), "train/rewards/chosen": lambda s: -s / 100,
            "train/rewards/rejected": lambda s: -s / 30, "train/nll": lambda s: 0.5, "train/dpo": lambda s: 0.6})
        stages["dpo"] = {**_policy(rng, 0.4 + 0.1 * r), "kl_to_reference": rng.uniform(0.1, 2), "dir": d("dpo")}
        for s in ("sft", "dpo"):
            _write(run / stages[s]["dir"] / "metrics.json", {k: v for k, v in stages[s].items() if k != "dir"})
            stages[s].pop("samples")  # the report leaves the samples in the stage folders
        report["rounds"].append({"round": r, "stages": stages})
    report["stages"] = {"prepare": {**{k: v for k, v in prep.items() if k != "samples"}, "dir": "prepare"}, **report["rounds"][-1]["stages"]}
    _write(run / "report" / "metrics.json", report)
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "demo", rounds=2)
    # a run that stopped early: old report schema, no gold judge, no sampling or DPO, no logs
    sparse = root / "sparse"
    _write(sparse / "sft" / "metrics.json", {"steps": 3, "final_loss": 1.2})
    _write(sparse / "report" / "metrics.json", {"recipe": "sparse", "stages": {"sft": {"steps": 3, "gold_score": None}},
                                                "rounds": [{"sft": {"steps": 3, "gold_score": None}}]})
    return root


# -- data assembly ---------------------------------------------------------------------------------------
def test_mark_candidates_shows_what_sampling_chose(runs):
    sample = runs / "demo" / "round2" / "sample"
    recs = [json.loads(line) for line in (sample / "candidates" / "shard-00000.jsonl").read_text().splitlines()]
    sels = {s["id"]: s for s in map(json.loads, (sample / "selections.jsonl").read_text().splitlines())}
    table = dashboard.mark_candidates(recs[:4], sels)
    for rec, row in zip(recs, table):
        roles = [c["role"] for c in row["candidates"]]
        sel = sels[rec["id"]]
        assert row["note"] == (sel["dropped"] or "")
        if sel["chosen"] is None:
            assert roles == [""] * K and row["note"] == "all_truncated"
            continue
        assert roles.index("chosen") == sel["chosen"] and roles.count("chosen") == 1
        assert roles.count("rejected") == (sel["rejected"] is not None)
        usable = [c for c in rec["candidates"] if not c["truncated"]]
        assert rec["candidates"][sel["chosen"]] is max(usable, key=lambda c: c["reward"])  # best non-truncated
    assert table[2]["candidates"][3]["truncated"] == "yes" and table[2]["candidates"][3]["role"] == ""  # 9.0 but truncated
    assert [c["gold"] for c in table[0]["candidates"]] == ["1.0", "0.5", "0.0", "0.0"]
    # the dashboard never re-decides: other selections give other roles
    moved = dashboard.mark_candidates(recs[:1], {recs[0]["id"]: {"chosen": 3, "rejected": 0, "dropped": None}})
    assert [c["role"] for c in moved[0]["candidates"]] == ["rejected", "", "", "chosen"]


def test_collect_gathers_every_panel(runs):
    doc = dashboard.collect(runs / "demo")
    assert doc["run"]["rounds_done"] == 2 and doc["run"]["rounds_planned"] == 2
    pol = doc["tables"][0]
    assert [r[0] for r in pol["rows"]] == ["base", "SFT r1", "DPO r1", "SFT r2", "DPO r2"]
    assert [r[1] for r in pol["rows"]][1:] == ["sft", "dpo", "round2/sft", "round2/dpo"]
    assert pol["rows"][0][pol["columns"].index("KL to reference")] == "n/a"  # the base model has no reference
    assert pol["rows"][1][pol["columns"].index("win vs SFT (RM)")] == "n/a"  # SFT r1 is the reference
    assert doc["run"]["judge"] == "round2/reward"
    curves = {c["name"]: c for c in doc["charts"]["curves"]}
    assert [s["label"] for s in curves["curve-dpo-loss"]["series"]] == ["round 1", "round 2"]
    assert [s["label"] for s in curves["curve-dpo-rewards"]["series"]] == ["chosen round 1", "rejected round 1", "chosen round 2", "rejected round 2"]
    assert curves["curve-reward-accuracy"]["series"][0]["points"][0][0] == 0.0
    hists = [c for c in doc["charts"]["rewards"]]
    assert [h["name"] for h in hists] == ["reward-dist-r1", "reward-dist-r2"]
    assert all(sum(s["counts"]) == 12 for h in hists for s in h["series"])  # every prompt in every series
    rm = {c["name"]: c for c in doc["charts"]["rm"]}
    assert [g["label"] for g in rm["rm-accuracy-by-pair"]["groups"]][0] == "all"
    cal = rm["rm-calibration"]["series"][0]["points"]
    assert len(cal) == 5 and sum(p[2] for p in cal) == 60 and all(0.5 <= p[0] <= 1 for p in cal)
    assert cal == sorted(cal)  # confidence grows with |gap|
    gold = next(c for c in doc["charts"]["policies"] if c["name"] == "gold")
    assert gold["ref"][0]["y"] == 0.03 and gold["groups"][1]["values"][2] == pytest.approx(0.7)
    samples = doc["samples"]
    assert [s["round"] for s in samples] == [1, 2] and all(len(s["prompts"]) == dashboard.SAMPLE_PROMPTS for s in samples)
    assert doc["policy_samples"][0]["policy"] == "base" and doc["policy_samples"][0]["rows"][1][1] == EVIL


def test_missing_figures_show_na_and_never_crash(runs, tmp_path):
    doc = dashboard.collect(runs / "sparse")  # old schema, no gold judge, stopped after SFT
    assert doc["run"]["rounds_done"] == 1
    row = doc["tables"][0]["rows"][0]
    assert row[0] == "SFT r1" and set(row[2:]) == {"n/a"}
    assert doc["tables"][1]["rows"] == [["1"] + ["n/a"] * len(dashboard.ROUND_COLUMNS)]
    charts = [c for group in doc["charts"].values() for c in group]
    assert all(not c.get("series") or not any(s.get("points") or s.get("counts") for s in c["series"] if isinstance(s, dict)) for c in charts)
    assert doc["samples"] == []
    assert dashboard.show_number(None) == dashboard.show_number(float("nan")) == dashboard.show_number("0.5") == dashboard.show_number(True) == "n/a"
    assert dashboard.show_number(0.5) == "0.500" and dashboard.show_number(7) == "7"
    # an empty folder, and files that are torn or of the wrong shape
    empty = tmp_path / "runs2" / "empty"
    (empty / "sft").mkdir(parents=True)
    (empty / "sft" / "train_log.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n{"step": 1, "train/lo')
    (empty / "report").mkdir()
    (empty / "report" / "metrics.json").write_text("[1, 2]")
    doc = dashboard.collect(empty)
    assert doc["charts"]["curves"][0]["series"][0]["points"] == [[0.0, 1.0]]
    assert dashboard.build(empty).exists()


def test_render_embeds_data_safely(runs):
    page = dashboard.build(runs / "demo").read_text()
    assert "window.__pwned = 1</script>" not in page and "<img src=x" not in page
    data = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["policy_samples"][0]["rows"][1][1] == EVIL
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from elsewhere
    assert "innerHTML" not in page
    assert not list((runs / "demo" / "report").glob(".*.tmp"))  # atomic write left no temp file


def test_index_and_cli(runs):
    doc = dashboard.index_doc(runs)
    assert [r["name"] for r in doc["runs"]] == ["demo", "sparse"]
    assert doc["runs"][0]["href"] == "./demo/report/index.html"
    rows = {r[0]: r[1:] for r in doc["rows"]}
    assert rows["recipe"] == ["recipes/default.yaml", "n/a"] and rows["rounds"] == ["2", "1"] and rows["r2 DPO gold"][1] == "n/a" and rows["r1 RM accuracy"] == ["0.850", "n/a"]
    res = subprocess.run([sys.executable, "-m", "evals.dashboard", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (runs / "index.html").exists() and (runs / "demo" / "report" / "index.html").exists() and (runs / "sparse" / "report" / "index.html").exists()
    missing = subprocess.run([sys.executable, "-m", "evals.dashboard", str(runs / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_serve_on_localhost(runs):
    proc = subprocess.Popen([sys.executable, "-m", "evals.dashboard", str(runs), "--serve", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"http://127\.0\.0\.1:\d+/index\.html", line):
                url = m.group(0)
                break
        assert url, "the server printed no URL"
        assert b'id="dashboard-data"' in urllib.request.urlopen(url, timeout=10).read()
        assert b"demo: post-training dashboard" in urllib.request.urlopen(url.replace("index.html", "demo/report/index.html"), timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_make_dashboard_target():
    res = subprocess.run(["make", "-n", "dashboard", "PORT=8123"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "-m evals.dashboard runs --serve 8123" in res.stdout


# -- the page in headless Chromium -------------------------------------------------------------------------
def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (as root, or with sudo)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        pytest.fail(f"{CHROMIUM} is missing and this user can neither apt-get (not root) nor sudo: install Debian's chromium package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = prefix + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    res = subprocess.run(apt + ["install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:  # package lists may be missing on a fresh machine
        subprocess.run(apt + ["update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        res = subprocess.run(apt + ["install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"could not install Debian's chromium with apt-get (exit {res.returncode}):\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}")
    return CHROMIUM


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket; no driver binary, no browser download)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
             "--remote-debugging-port=0"]

    def __init__(self, binary: str, profile: Path):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile.parent / "chromium.log", "w")
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start: {(profile.parent / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        self.stack = contextlib.ExitStack()  # websockets >= 17 wants connect() used as a context manager
        self.ws = self.stack.enter_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=20))
        self.n, self.events = 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:
            m = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.time())))
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, session: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=max(0.01, deadline - time.time()))))

    def open(self, url: str, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            self.send(m, session=sid)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, sid)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, sid)
        self.wait_for("Page.loadEventFired", sid)
        return Page(self, sid)

    def close(self) -> None:
        if getattr(self, "stack", None):
            self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Page:
    def __init__(self, browser: Browser, sid: str):
        self.b, self.sid = browser, sid

    def eval(self, expr: str):
        res = self.b.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, self.sid)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, browser log errors (CSP, failed loads) and network requests."""
        self.eval("1")  # flush the events queued so far
        out = []
        for e in self.b.events:
            if e.get("sessionId") != self.sid:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent" and not p.get("request", {}).get("url", "").startswith(("file:", "data:", "about:")):
                out.append("network: " + p["request"]["url"])
        return out

    def screenshot(self, path: Path, max_height: int = 8000) -> None:
        import base64

        h = min(max_height, int(self.eval("document.documentElement.scrollHeight")))
        shot = self.b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                      "clip": {"x": 0, "y": 0, "width": 1280, "height": h, "scale": 1}}, self.sid)
        path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(ensure_chromium(), tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


CHART_STATES = """JSON.stringify([...document.querySelectorAll('[data-chart]')].map(e => [e.dataset.chart, e.dataset.drawn || '',
  e.querySelectorAll('svg polyline, svg rect, svg path').length, e.querySelector('.empty') ? e.querySelector('.empty').textContent : '']))"""


def test_run_page_in_chromium(runs, browser):
    dashboard.build_all(runs)
    page = browser.open((runs / "demo" / "report" / "index.html").as_uri())
    assert page.eval("document.body.dataset.ready") == "1"
    states = json.loads(page.eval(CHART_STATES))
    names = [s[0] for s in states]
    assert {"gold", "curve-sft-loss", "curve-dpo-margins", "reward-dist-r1", "reward-dist-r2", "rm-accuracy-by-pair",
            "rm-calibration", "win-rates", "kl", "lengths", "length-corr"} <= set(names)
    assert len(names) == len(set(names))
    for name, drawn, marks, _ in states:
        assert drawn == "1" and marks > 0, f"chart {name} not drawn ({drawn!r}, {marks} marks)"
    page.screenshot(runs / "demo" / "report" / "screenshot.png")
    assert page.problems() == []
    # data reached the page as text, never as markup
    assert page.eval("window.__pwned === undefined") and EVIL in page.eval("document.body.innerText")
    assert page.eval("document.querySelectorAll('#samples img').length") == 0
    assert page.eval("document.querySelectorAll('tr.chosen').length") == 2 * 3  # 4 prompts a round, one all truncated
    assert page.eval("document.querySelectorAll('tr.rejected').length") == 2 * 3
    png = (runs / "demo" / "report" / "screenshot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_sparse_page_and_index_in_chromium(runs, browser):
    dashboard.build_all(runs)
    page = browser.open((runs / "sparse" / "report" / "index.html").as_uri())
    states = json.loads(page.eval(CHART_STATES))
    assert states and all(drawn == "empty" and msg for _, drawn, _, msg in states), states
    assert "n/a" in page.eval("document.querySelector('#summary').innerText")
    assert page.problems() == []
    index = browser.open((runs / "index.html").as_uri())
    states = json.loads(index.eval(CHART_STATES))
    assert [s[0] for s in states] == ["runs-gold", "runs-win-rates"] and all(s[1] == "1" and s[2] > 0 for s in states)
    assert index.eval("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))") == \
        ["./demo/report/index.html", "./sparse/report/index.html"]
    assert index.problems() == []
    index.screenshot(runs / "index.png")


if __name__ == "__main__":  # screenshot a built page (docs/dashboard.png): python -m tests.test_dashboard PAGE.html OUT.png [HEIGHT]
    import tempfile

    b = Browser(ensure_chromium(), Path(tempfile.mkdtemp()) / "profile")
    try:
        p = b.open(Path(sys.argv[1]).resolve().as_uri())
        print("charts:", json.loads(p.eval(CHART_STATES)), "\nproblems:", p.problems())
        p.screenshot(Path(sys.argv[2]), max_height=int(sys.argv[3]) if len(sys.argv) > 3 else 8000)
    finally:
        b.close()
