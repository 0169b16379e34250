"""The dashboard: one self-contained HTML page per run, and an index page comparing the runs.

    python -m evals.dashboard [runs_root]                  # every run's report/index.html + runs_root/index.html
    python -m evals.dashboard runs --serve 8000            # ... then serve them on 127.0.0.1 (make dashboard):
                                                           # runs_root/index.html and <run>/report/* only

`build(run_dir)` gathers a run's files into one JSON document (`collect`), embeds it in
evals/dashboard_template.html and writes runs/<name>/report/index.html; `build_index(runs_root)` writes
runs_root/index.html. The page draws its charts with its own inline script into inline SVG: no library, no
fetch, no font or file from elsewhere (its Content-Security-Policy forbids every request). Each chart's
container has data-chart="<name>" and, once drawn, data-drawn="1" ("empty", with a message, when its data
is absent). Text from the data reaches the page through textContent only.

What it reads (every file is optional; a figure that is missing or null shows as "n/a"):
    report/metrics.json                    figures by stage and round (the eval stage's output; read first)
    <stage dir>/metrics.json               a stage's own figures, under the report's, and its policy samples
    <stage dir>/train_log.jsonl            training curves (sft, reward, dpo of every round)
    <reward dir>/eval_rewards.json         held-out pairs' rewards: the reliability plot
    <sample dir>/rewards.json              best/mean/worst candidate reward per prompt: the histograms
    <sample dir>/candidates/shard-00000.jsonl   the first prompts' K candidates: the sample table
    <sample dir>/manifest.json             the selection settings, to mark chosen/rejected as sampling did
"""

from __future__ import annotations

import argparse
import functools
import http
import http.server
import json
import math
import sys
import urllib.parse
from pathlib import Path

from data.default_task import judge
from data.io import atomic_open

TEMPLATE = Path(__file__).with_name("dashboard_template.html")
ROUND_STAGES = ("sft", "reward", "sampling", "dpo")
DIR_NAMES = {"sampling": "sample"}
MAX_CURVE_POINTS = 400
SAMPLE_PROMPTS = 4  # prompts per round in the sample table
POLICY_SAMPLES = 6  # responses per policy
HIST_BINS = 24
CAL_BUCKETS = 5

# Policy figures: (key, column title).
POLICY_COLUMNS = [("gold_score", "gold"), ("pass_rate", "pass rate"), ("win_rate_vs_sft_rm", "win vs SFT (RM)"),
                  ("win_rate_vs_sft_gold", "win vs SFT (gold)"), ("kl_to_sft", "KL to SFT"),
                  ("kl_to_reference", "KL to reference"), ("mean_reward", "mean reward"),
                  ("mean_length", "mean length"), ("stop_rate", "stop rate"), ("reward_length_corr", "reward-length r")]
ROUND_COLUMNS = [("reward", "rm_accuracy", "RM accuracy"), ("sampling", "random_of_k_gold_score", "random-of-K gold"),
                 ("sampling", "best_of_k_gold_score", "best-of-K gold"), ("sampling", "oracle_of_k_gold_score", "oracle-of-K gold"),
                 ("sampling", "reward_best_mean", "reward best"), ("sampling", "reward_mean", "reward mean"),
                 ("sampling", "reward_worst_mean", "reward worst"), ("sampling", "pairs", "pairs"),
                 ("sampling", "truncated_share", "truncated share"), ("sampling", "reward_length_corr", "reward-length r")]


# -- reading ------------------------------------------------------------------------------------------------
def _json(path: Path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """Records of a JSONL file (a torn or bad line is skipped), at most `limit`."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except OSError:
        pass
    return out


def number(v) -> float | None:
    """v as a finite float, else None (missing, null, NaN, a string, a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def show_number(v, digits: int = 3) -> str:
    """A figure as table text: "n/a" when missing or not a finite number."""
    x = number(v)
    if x is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{x:.{digits}f}"


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def default_dir(stage: str, r: int) -> str:
    name = DIR_NAMES.get(stage, stage)
    return name if r <= 1 else f"round{r}/{name}"


def stage_figures(run_dir: Path, stage: str, r: int, reported: dict | None) -> dict | None:
    """A stage's figures: its own metrics.json overlaid with the report's; None if the report does not
    name it and its folder does not exist (a folder alone, e.g. a stage still training, gives {"dir"})."""
    reported = reported if isinstance(reported, dict) else None
    rel = str((reported or {}).get("dir") or default_dir(stage, r))
    if reported is None and not (run_dir / rel).is_dir():
        return None
    own = _json(run_dir / rel / "metrics.json")
    figs = {k: v for k, v in (own if isinstance(own, dict) else {}).items() if k != "data"}
    figs.update(reported or {})
    figs["dir"] = rel
    return figs


def load_rounds(run_dir: Path, report: dict) -> tuple[dict | None, list[dict]]:
    """(base model figures, [{"round", "stages": {stage: figures}}]) from the report (new or old schema)
    and the folders on disk."""
    reported: dict[int, dict] = {}
    for i, item in enumerate(report.get("rounds") if isinstance(report.get("rounds"), list) else []):
        if isinstance(item, dict) and isinstance(item.get("stages"), dict):  # schema 1
            r = number(item.get("round"))
            reported[int(r) if r is not None and r >= 1 else i + 1] = item["stages"]
        elif isinstance(item, dict):  # the first report: a list of stage dicts
            reported[i + 1] = item
    top = report.get("stages") if isinstance(report.get("stages"), dict) else {}
    if not reported and top:
        reported[1] = top
    on_disk = {1} if any((run_dir / default_dir(s, 1)).is_dir() for s in ROUND_STAGES) else set()
    on_disk |= {int(p.name[5:]) for p in run_dir.glob("round*") if p.is_dir() and p.name[5:].isdigit()}
    rounds = []
    for r in sorted(set(reported) | on_disk):
        stages = {s: f for s in ROUND_STAGES if (f := stage_figures(run_dir, s, r, reported.get(r, {}).get(s))) is not None}
        samp = stages.get("sampling")
        if samp and number(samp.get("mean_length")) is None:  # candidates' mean length: generated tokens / candidates
            g, c = number(samp.get("generated_tokens")), number(samp.get("candidates"))
            samp["mean_length"] = g / c if g is not None and c else None
        rounds.append({"round": r, "stages": stages})
    return stage_figures(run_dir, "prepare", 1, top.get("prepare")), rounds


# -- charts and tables (plain data; the page's script draws them) ------------------------------------------
def _curve(path: Path, key: str) -> list[list[float]]:
    pts = [[float(rec["step"]), y] for rec in _jsonl(path) if number(rec.get("step")) is not None
           and (y := number(rec.get(key))) is not None]
    if len(pts) > MAX_CURVE_POINTS:
        stride = math.ceil(len(pts) / MAX_CURVE_POINTS)
        pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    return pts


CURVES = [  # (stage, chart name, title, [(log key, series label)])
    ("sft", "curve-sft-loss", "SFT loss", [("train/loss", "")]),
    ("reward", "curve-reward-loss", "Reward model loss", [("train/loss", "")]),
    ("reward", "curve-reward-accuracy", "Reward model train accuracy", [("train/accuracy", "")]),
    ("dpo", "curve-dpo-loss", "DPO loss (DPO + NLL)", [("train/loss", "")]),
    ("dpo", "curve-dpo-margins", "DPO reward margin (chosen - rejected)", [("train/rewards/margins", "")]),
    ("dpo", "curve-dpo-accuracies", "DPO reward accuracy", [("train/rewards/accuracies", "")]),
    ("dpo", "curve-dpo-rewards", "DPO implicit rewards", [("train/rewards/chosen", "chosen "), ("train/rewards/rejected", "rejected ")]),
    ("dpo", "curve-dpo-nll", "DPO NLL of the chosen", [("train/nll", "")]),
]


def curve_charts(run_dir: Path, rounds: list[dict]) -> list[dict]:
    charts = []
    for stage, name, title, keys in CURVES:
        series = []
        for rd in rounds:
            f = rd["stages"].get(stage)
            if f is None:
                continue
            for key, prefix in keys:
                pts = _curve(run_dir / f["dir"] / "train_log.jsonl", key)
                if pts:
                    series.append({"label": f"{prefix}round {rd['round']}", "points": pts})
        charts.append({"kind": "line", "name": name, "title": title, "x_label": "step", "series": series,
                       "empty": "no training log"})
    return charts


def histogram(values: list[float], bins: int = HIST_BINS) -> tuple[list[float], list[int]]:
    lo, hi = min(values), max(values)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    return edges, counts


def reward_dist_charts(run_dir: Path, rounds: list[dict]) -> list[dict]:
    charts = []
    for rd in rounds:
        f = rd["stages"].get("sampling")
        dist = (_json(run_dir / f["dir"] / "rewards.json") or {}).get("reward_distribution") if f else None
        cols = {k: [x for v in (dist or {}).get(k) or [] if (x := number(v)) is not None] for k in ("worst", "mean", "best")}
        spec = {"kind": "hist", "name": f"reward-dist-r{rd['round']}", "title": f"Round {rd['round']}: candidates' reward per prompt",
                "x_label": "reward (this round's reward model)", "series": [], "empty": "no rewards.json"}
        allv = [v for vs in cols.values() for v in vs]
        if allv:
            edges, _ = histogram(allv)
            spec["edges"] = edges
            for k, vs in cols.items():
                counts = [0] * HIST_BINS
                for v in vs:
                    counts[min(HIST_BINS - 1, max(0, int((v - edges[0]) / (edges[-1] - edges[0]) * HIST_BINS)))] += 1
                spec["series"].append({"label": f"{k} of K", "counts": counts})
        charts.append(spec)
    return charts or [{"kind": "hist", "name": "reward-dist", "title": "Candidates' reward per prompt", "series": [],
                       "empty": "no sampling stage"}]


def calibration(run_dir: Path, figs: dict) -> list[list[float]]:
    """Reliability points [confidence, accuracy, pairs]: held-out pairs in quantile buckets of |gap|; the
    confidence is the Bradley-Terry probability sigmoid(|gap|) that the higher-scored response is better."""
    pairs = _json(run_dir / figs["dir"] / "eval_rewards.json")
    gaps = [b - w for p in pairs if isinstance(p, dict) and (b := number(p.get("r_better"))) is not None
            and (w := number(p.get("r_worse"))) is not None] if isinstance(pairs, list) else []
    sig = lambda g: 1 / (1 + math.exp(-min(abs(g), 50)))  # noqa: E731
    if gaps:
        order = sorted(gaps, key=abs)
        k = max(1, min(CAL_BUCKETS, len(order)))
        sel = [order[b * len(order) // k : (b + 1) * len(order) // k] for b in range(k)]
        return [[sum(map(sig, s)) / len(s), sum(g > 0 for g in s) / len(s), len(s)] for s in sel if s]
    out = []
    for b in figs.get("calibration") or []:  # the stage's buckets: confidence at the bucket's middle
        lo, hi, acc = (number(b.get(k)) if isinstance(b, dict) else None for k in ("abs_gap_min", "abs_gap_max", "accuracy"))
        if None not in (lo, hi, acc):
            out.append([sig((lo + hi) / 2), acc, b.get("n")])
    return out


def reward_model_charts(run_dir: Path, rounds: list[dict]) -> list[dict]:
    rms = [(rd["round"], rd["stages"]["reward"]) for rd in rounds if "reward" in rd["stages"]]
    series = [f"round {r}" for r, _ in rms]

    def bars(name, title, field):
        groups = ["all"] if field == "rm_accuracy_by_pair" else []
        for _, f in rms:
            groups += [g for g in (f.get(field) or {}) if g not in groups]
        return {"kind": "bar", "name": name, "title": title, "series": series, "y_range": [0, 1], "ref": [{"y": 0.5, "label": "chance"}],
                "groups": [{"label": g, "values": [number(f.get("rm_accuracy")) if g == "all" else number((f.get(field) or {}).get(g))
                                                   for _, f in rms]} for g in groups], "empty": "no reward model figures"}

    cal = {"kind": "line", "name": "rm-calibration", "title": "Reward model calibration (held-out pairs)", "diagonal": True,
           "x_label": "confidence sigmoid(|gap|)", "y_label": "accuracy", "x_range": [0.5, 1], "y_range": [0, 1], "dots": True,
           "series": [{"label": f"round {r}", "points": pts} for r, f in rms if (pts := calibration(run_dir, f))],
           "empty": "no calibration figures"}
    return [bars("rm-accuracy-by-pair", "Reward model accuracy by pair type", "rm_accuracy_by_pair"),
            bars("rm-accuracy-by-category", "Reward model accuracy by category", "rm_accuracy_by_category"), cal]


def policies(base: dict | None, rounds: list[dict]) -> list[tuple[str, dict]]:
    """(label, figures) of every evaluated policy, in pipeline order."""
    out = [("base", base)] if base else []
    for rd in rounds:
        for s in ("sft", "dpo"):
            if s in rd["stages"]:
                out.append((f"{s.upper()} r{rd['round']}", rd["stages"][s]))
    return out


def policy_charts(base: dict | None, rounds: list[dict]) -> list[dict]:
    pols = policies(base, rounds)
    samp = [(f"cand. r{rd['round']}", rd["stages"]["sampling"]) for rd in rounds if "sampling" in rd["stages"]]

    def bars(name, title, keys, rows, **kw):
        return {"kind": "bar", "name": name, "title": title, "series": [t for _, t in keys], **kw,
                "groups": [{"label": lab, "values": [number(f.get(k)) for k, _ in keys]} for lab, f in rows]}

    series = ["SFT", "random-of-K", "best-of-K (DPO's chosen data)", "oracle-of-K", "DPO"]
    gold = {"kind": "bar", "name": "gold", "title": "Gold score by stage and round", "series": series, "y_range": [0, 1],
            "ref": [{"y": number(base.get("gold_score")), "label": "base model"}] if base and number(base.get("gold_score")) is not None else [],
            "groups": [{"label": f"round {rd['round']}", "values": [
                number(rd["stages"].get(s, {}).get(k)) for s, k in (("sft", "gold_score"), ("sampling", "random_of_k_gold_score"),
                                                                      ("sampling", "best_of_k_gold_score"), ("sampling", "oracle_of_k_gold_score"),
                                                                      ("dpo", "gold_score"))]} for rd in rounds],
            "empty": "no gold judge figures"}
    return [
        gold,
        bars("win-rates", "Win rate against the SFT policy (ties count half)",
             [("win_rate_vs_sft_rm", "reward model"), ("win_rate_vs_sft_gold", "gold judge")], pols,
             y_range=[0, 1], ref=[{"y": 0.5, "label": "even"}], empty="no win rates (the eval stage computes them)"),
        bars("kl", "KL divergence of the policy (nats per response)",
             [("kl_to_sft", "to SFT"), ("kl_to_reference", "to its DPO reference")], pols, empty="no KL figures"),
        bars("mean-reward", "Mean reward of the responses (final RM)", [("mean_reward", "mean reward")], pols,
             empty="no reward figures"),
        bars("lengths", "Mean response length (tokens)", [("mean_length", "mean length")], pols + samp, empty="no length figures"),
        bars("length-corr", "Reward-length correlation (Pearson r)", [("reward_length_corr", "r")], pols + samp,
             y_range=[-1, 1], empty="no correlation figures"),
    ]


def summary_tables(base: dict | None, rounds: list[dict]) -> list[dict]:
    pols = policies(base, rounds)
    return [
        {"title": "Policies", "columns": ["policy", "folder"] + [t for _, t in POLICY_COLUMNS],
         "rows": [[lab, f.get("dir", "")] + [show_number(f.get(k)) for k, _ in POLICY_COLUMNS] for lab, f in pols]},
        {"title": "Reward model and rejection sampling, by round", "columns": ["round"] + [t for _, _, t in ROUND_COLUMNS],
         "rows": [[str(rd["round"])] + [show_number(rd["stages"].get(s, {}).get(k)) for s, k, _ in ROUND_COLUMNS] for rd in rounds]},
    ]


def _user_text(messages) -> str:
    if isinstance(messages, str):
        return messages
    return next((m.get("content", "") for m in reversed(messages or []) if isinstance(m, dict) and m.get("role") == "user"), "")


def mark_candidates(records: list[dict], selections: dict[str, dict]) -> list[dict]:
    """The sample table of some prompts: every candidate with its reward, gold score (default task only),
    length, truncated flag and role ("chosen", "rejected" or ""), as the sampling stage decided them
    (its selections.jsonl: id -> {"chosen", "rejected", "dropped"})."""
    out = []
    for r in records:
        cands = [c for c in r.get("candidates") or [] if isinstance(c, dict)]
        if not cands:
            continue
        sel = selections.get(str(r.get("id"))) or {}
        user = _user_text(r.get("prompt"))
        rows = []
        for j, c in enumerate(cands):
            gold = judge(user, str(c.get("text", "")))
            rows.append({"k": j, "text": str(c.get("text", "")), "reward": show_number(c.get("reward")),
                         "gold": show_number(gold, 1) if gold is not None else "n/a", "tokens": show_number(c.get("num_tokens")),
                         "truncated": "yes" if c.get("truncated") else "",
                         "role": "chosen" if j == sel.get("chosen") else "rejected" if j == sel.get("rejected") else ""})
        out.append({"id": str(r.get("id")), "prompt": user, "note": sel.get("dropped") or "", "candidates": rows})
    return out


def sample_tables(run_dir: Path, rounds: list[dict]) -> list[dict]:
    out = []
    for rd in rounds:
        f = rd["stages"].get("sampling")
        if f is None:
            continue
        sample_dir = run_dir / f["dir"]
        sc = ((_json(sample_dir / "manifest.json") or {}).get("config") or {}).get("sampling") or {}
        shards = sorted((sample_dir / "candidates").glob("shard-*.jsonl"))
        recs = _jsonl(shards[0], SAMPLE_PROMPTS) if shards else []
        sels = {str(s.get("id")): s for s in _jsonl(sample_dir / "selections.jsonl") if isinstance(s, dict)}
        rule = {"rejected": sc.get("rejected") if sc.get("rejected") in ("worst", "random") else "worst",
                "min_gap": number(sc.get("min_reward_gap")) or 0.0, "seed": int(number(sc.get("seed")) or 0)}
        out.append({"round": rd["round"], "rule": rule, "prompts": mark_candidates(recs, sels)})
    return out


def policy_samples(base: dict | None, rounds: list[dict]) -> list[dict]:
    return [{"policy": lab, "rows": [[str(s.get("prompt", "")), str(s.get("response", "")), show_number(s.get("gold"), 1)]
                                     for s in (f.get("samples") or [])[:POLICY_SAMPLES] if isinstance(s, dict)]}
            for lab, f in policies(base, rounds) if f.get("samples")]


# -- the run page and the index -------------------------------------------------------------------------
def collect(run_dir) -> dict:
    """Everything the run's page shows, as one JSON-able document."""
    run_dir = Path(run_dir)
    report = _json(run_dir / "report" / "metrics.json") or {}
    report = report if isinstance(report, dict) else {}
    base, rounds = load_rounds(run_dir, report)
    charts = {"curves": curve_charts(run_dir, rounds), "rewards": reward_dist_charts(run_dir, rounds),
              "rm": reward_model_charts(run_dir, rounds), "policies": policy_charts(base, rounds)}
    return _clean({
        "page": "run",
        "run": {"name": run_dir.name, "recipe": report.get("recipe", run_dir.name), "source": report.get("source"),
                "created": report.get("created"), "schema": report.get("schema"), "rounds_planned": report.get("rounds_planned"),
                "rounds_done": len(rounds), "has_report": bool(report),
                "judge": (report.get("judge") or {}).get("reward_model") if isinstance(report.get("judge"), dict) else None},
        "tables": summary_tables(base, rounds),
        "charts": charts,
        "samples": sample_tables(run_dir, rounds),
        "policy_samples": policy_samples(base, rounds),
    })


def render(doc: dict, title: str) -> str:
    """The template with `doc` embedded as JSON (safe inside <script>: <, > and & escaped)."""
    data = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    html_title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return TEMPLATE.read_text(encoding="utf-8").replace("{{TITLE}}", html_title).replace("{{DATA}}", data)


def _write(path: Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    path.chmod(0o644)  # a page to serve (mkstemp makes 0600)
    return path


def build(run_dir) -> Path:
    """Write runs/<name>/report/index.html; returns its path."""
    run_dir = Path(run_dir)
    return _write(run_dir / "report" / "index.html", render(collect(run_dir), f"{run_dir.name}: post-training dashboard"))


def is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "report" / "metrics.json").exists() or (path / "prepare").is_dir()
                              or any((path / default_dir(s, 1)).is_dir() for s in ROUND_STAGES))


def index_doc(runs_root) -> dict:
    """Key figures of every run under runs_root, one column per run."""
    runs = []
    for d in sorted(p for p in Path(runs_root).iterdir() if is_run(p)):
        report = _json(d / "report" / "metrics.json")
        report = report if isinstance(report, dict) else {}
        base, rounds = load_rounds(d, report)
        figs = {"recipe": report.get("source"), "created": report.get("created"), "rounds": len(rounds),
                "base gold": (base or {}).get("gold_score")}
        for rd in rounds:
            st, r = rd["stages"], rd["round"]
            for s, k, lab in (("sft", "gold_score", "SFT gold"), ("reward", "rm_accuracy", "RM accuracy"),
                              ("sampling", "best_of_k_gold_score", "best-of-K gold"), ("dpo", "gold_score", "DPO gold"),
                              ("dpo", "win_rate_vs_sft_rm", "DPO win vs SFT (RM)"), ("dpo", "win_rate_vs_sft_gold", "DPO win vs SFT (gold)"),
                              ("dpo", "kl_to_sft", "DPO KL to SFT"), ("dpo", "mean_length", "DPO mean length")):
                figs[f"r{r} {lab}"] = st.get(s, {}).get(k)
        last = rounds[-1]["stages"] if rounds else {}
        runs.append({"name": d.name, "href": "./" + urllib.parse.quote(d.name) + "/report/index.html", "figs": figs,
                     "final": [number((base or {}).get("gold_score")), number(last.get("sft", {}).get("gold_score")),
                               number(last.get("sampling", {}).get("best_of_k_gold_score")), number(last.get("dpo", {}).get("gold_score")),
                               number(last.get("dpo", {}).get("win_rate_vs_sft_rm")), number(last.get("dpo", {}).get("win_rate_vs_sft_gold"))]})
    keys = []
    for run in runs:
        keys += [k for k in run["figs"] if k not in keys]
    rows = [[k] + [str(run["figs"][k]) if k in ("recipe", "created") and run["figs"].get(k) else show_number(run["figs"].get(k)) for run in runs]
            for k in keys]
    charts = [{"kind": "bar", "name": "runs-gold", "title": "Gold score by run (final round)", "y_range": [0, 1],
               "series": ["base", "SFT", "best-of-K", "DPO"], "groups": [{"label": r["name"], "values": r["final"][:4]} for r in runs],
               "empty": "no gold figures"},
              {"kind": "bar", "name": "runs-win-rates", "title": "DPO win rate against SFT (final round)", "y_range": [0, 1],
               "ref": [{"y": 0.5, "label": "even"}], "series": ["reward model", "gold judge"],
               "groups": [{"label": r["name"], "values": r["final"][4:]} for r in runs], "empty": "no win rates"}]
    return _clean({"page": "index", "runs": [{"name": r["name"], "href": r["href"]} for r in runs], "rows": rows,
                   "charts": {"runs": charts}})


def build_index(runs_root) -> Path:
    """Write runs_root/index.html comparing every run found; returns its path."""
    return _write(Path(runs_root) / "index.html", render(index_doc(runs_root), "post-training runs"))


def build_all(runs_root) -> list[Path]:
    root = Path(runs_root)
    paths = [build(d) for d in sorted(root.iterdir()) if is_run(d)] if root.is_dir() else []
    return paths + [build_index(root)]


def served_file(root: Path, url_path: str) -> Path | None:
    """The file a dashboard URL may serve, or None (404): runs_root/index.html ("/" too) and the files of a run's
    report folder (runs_root/<run>/report/<file>: its page, metrics.json, screenshot), nothing else. runs/ also
    holds models, checkpoints and data, which a page never links to; a symlink is followed only to such a
    file inside the root (the path is checked after resolving, so report/x -> ../../model/... is refused)."""
    rel = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path).strip("/") or "index.html"
    real_root = Path(root).resolve()
    try:
        real = (real_root / rel).resolve(strict=True)
        parts = real.relative_to(real_root).parts
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, or outside the root
        return None
    if not (parts == ("index.html",) or (len(parts) == 3 and parts[1] == "report")):
        return None
    return real if real.is_file() else None


class ReportHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler limited to `served_file`: everything else is a 404, folders are never listed."""

    def translate_path(self, path: str) -> str:
        found = served_file(Path(self.directory), path)
        return str(found) if found is not None else ""

    def send_head(self):
        if not self.translate_path(self.path):
            self.send_error(http.HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()


def make_server(root: Path, port: int) -> http.server.ThreadingHTTPServer:
    """The dashboard's server on 127.0.0.1:`port` (0: a free one), serving only report pages from `root`."""
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(ReportHandler, directory=str(root)))


def serve(root: Path, port: int) -> None:
    with make_server(root, port) as httpd:
        print(f"serving {root} at http://127.0.0.1:{httpd.server_address[1]}/index.html (Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_root", nargs="?", default="runs")
    ap.add_argument("--serve", type=int, metavar="PORT", help="then serve runs_root on 127.0.0.1:PORT")
    args = ap.parse_args(argv)
    root = Path(args.runs_root)
    if not root.is_dir():
        print(f"error: {root}: no such folder (run `make pipeline` first)", file=sys.stderr)
        return 2
    for p in build_all(root):
        print(f"wrote {p}")
    if args.serve is not None:
        serve(root, args.serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
