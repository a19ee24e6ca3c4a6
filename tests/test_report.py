"""The study report (``cast_lightning.study``) from a stored experiments.json (schema 2): files, self-contained HTML
whose numbers equal report.json, verdicts computed from the numbers (CAST beating random skipping and not), every
map variant compared to random, Spearman and its bootstrap (scipy) against hand computations."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from scipy.stats import rankdata

from cast_lightning.conflict import ConflictMap, combine_scores
from cast_lightning.errors import CastError
from cast_lightning.study.analysis import build_report, diagnosis_validity
from cast_lightning.study.render import write_report
from cast_lightning.study.statistics import bootstrap_spearman, spearman
from cast_lightning.study.utility import task_utilities, utility_score

DATA = Path(__file__).resolve().parent / "data" / "report"
SKILLS = ["add", "reverse", "sort", "count", "facts"]
PROVENANCE = {"created": "2025-02-02T00:00:00+00:00", "git_commit": "feedface", "versions": {"python": "3"},
              "machine": {"platform": "test"}}  # report-time provenance for build_report (no git / torch probe)


def stored_experiments() -> dict:
    return json.loads((DATA / "experiments.json").read_text())  # its paths are relative to DATA


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    written = write_report(stored_experiments(), out)
    paths = {name: str(out / path) for name, path in written.items()}
    return paths, json.loads(Path(paths["json"]).read_text()), written


class Tables(HTMLParser):
    """Collects every <table id=...> as header + rows of cell texts, and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.links: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append((tag, name, attrs[name]))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), {"header": [], "rows": []})
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row and not self._table["header"]:
                self._table["header"] = self._row
            else:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def parse_html(path) -> Tables:
    parser = Tables()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def cell_stat(text: str) -> dict:
    """'0.9083 ± 0.0144' -> {mean, std}; '0.1000' -> {mean, std None}; 'n/a' -> {mean None, std None}."""
    text = text.strip()
    if text == "n/a":
        return {"mean": None, "std": None}
    mean, _, std = text.partition(" ± ")
    return {"mean": float(mean), "std": float(std) if std else None}


# --- files ----------------------------------------------------------------------------------------------------------


def test_all_files_produced(rendered):
    paths, data, written = rendered
    assert set(paths) == {"json", "markdown", "html", "pareto", "utility_drop", "conflict_map", "validity"}
    assert written["json"] == "report.json" and written["html"] == "report.html"  # relative to output_dir
    for name, path in paths.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, name
        if path.endswith(".png"):
            assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert data["warnings"] == []  # every run's metrics equal its stored results file
    assert len(data["runs"]) == 28 and len(data["variants"]) == 10
    assert data["plots"] == {"pareto": "pareto.png", "utility_drop": "utility_drop.png", "validity": "validity.png",
                             "conflict_map": "conflict_map.png"}
    assert data["provenance"]["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert data["provenance"]["seeds"] == [0, 1, 2]
    assert data["provenance"]["experiments"]["machine"]["platform"] == "test fixture"
    assert set(data["provenance"]["report"]) == {"created", "git_commit", "versions", "machine"}  # provenance.collect()
    assert data["provenance"]["report"]["versions"]["scipy"]
    assert data["inputs"]["plan"]["skip_ratios"] == [0.1, 0.25]
    assert all(r["results_sha256"] and len(r["results_sha256"]) == 64 for r in data["runs"])
    markdown = Path(paths["markdown"]).read_text()
    assert "| variant | seeds | refusal rate |" in markdown and "![Safety vs utility](pareto.png)" in markdown
    assert data["verdict"]["sentence"] in markdown and data["validity"]["sentence"] in markdown


def test_html_is_self_contained(rendered):
    paths, _, _ = rendered
    parsed = parse_html(paths["html"])
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags
    images = [value for tag, name, value in parsed.links if tag == "img"]
    assert len(images) == 4 and len(parsed.links) == 4  # only the embedded images, no external src/href
    for value in images:
        assert value.startswith("data:image/png;base64,")
        assert base64.b64decode(value.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = Path(paths["html"]).read_text()
    assert "http://" not in text and "https://" not in text and "url(" not in text


# --- every number in the HTML is in report.json ----------------------------------------------------------------------

SUMMARY_COLUMNS = {"refusal rate": "refusal_rate", "over-refusal rate": "over_refusal_rate", "utility": "utility",
                   "utility drop": "utility_drop", "heads skipped": "n_skipped", "fit seconds": "fit_seconds"}


def test_html_main_table_equals_json(rendered):
    paths, data, _ = rendered
    table = parse_html(paths["html"]).tables["summary"]
    assert table["header"][:2] == ["variant", "seeds"]
    assert set(SUMMARY_COLUMNS) <= set(table["header"])
    variants = {v["label"]: v for v in data["variants"]}
    assert [row[0] for row in table["rows"]] == [v["label"] for v in data["variants"]]
    checked = 0
    for row in table["rows"]:
        variant = variants[row[0]]
        cells = dict(zip(table["header"], row))
        assert int(cells["seeds"]) == variant["n_seeds"]
        assert (cells["Pareto"] == "yes") == variant["pareto_optimal"]
        for column, key in SUMMARY_COLUMNS.items():
            shown = cell_stat(cells[column])
            assert shown["mean"] == variant[key]["mean"], (row[0], column)
            assert shown["std"] == variant[key]["std"], (row[0], column)
            checked += shown["mean"] is not None
    assert checked >= 55
    # and the summary statistics are the stated statistics of the per-run numbers
    cast = variants["CAST (product) @ 0.1"]
    runs = [r for r in data["runs"] if r["label"] == "CAST (product) @ 0.1"]
    values = [r["metrics"]["safety.refusal_rate"] for r in runs]
    mean = sum(values) / 3
    assert cast["refusal_rate"]["mean"] == round(mean, 4)
    assert cast["refusal_rate"]["std"] == round(math.sqrt(sum((v - mean) ** 2 for v in values) / 2), 4)


def test_html_other_tables_equal_json(rendered):
    paths, data, _ = rendered
    tables = parse_html(paths["html"]).tables
    # comparisons
    rows = tables["comparisons"]["rows"]
    assert len(rows) == len(data["comparisons"]) == 6
    for row, comparison in zip(rows, data["comparisons"]):
        cells = dict(zip(tables["comparisons"]["header"], row))
        assert float(cells["skip ratio"]) == comparison["skip_ratio"]
        assert cell_stat(cells["advantage"]) == {k: comparison["advantage"][k] for k in ("mean", "std")}
        assert [float(x) for x in cells["per seed"].split(", ")] == comparison["advantage_per_seed"]
        assert cells["outcome"] == comparison["outcome"]
    # per-task utility
    variants = {v["label"]: v for v in data["variants"]}
    header = tables["tasks"]["header"]
    assert header[1:] == data["tasks"] == sorted(f"cast_world_{s}" for s in SKILLS)
    for row in tables["tasks"]["rows"]:
        for task, cell in zip(header[1:], row[1:]):
            assert cell_stat(cell) == {k: variants[row[0]]["tasks"][task][k] for k in ("mean", "std")}
    # validity
    for row in tables["validity"]["rows"]:
        method = data["validity"]["methods"][row[0]]
        assert cell_stat(row[1]) == {k: method["rho"][k] for k in ("mean", "std")}
        assert [float(x) for x in row[2].split(", ")] == method["rho_per_seed"]
        assert float(row[3]) == method["pooled_rho"]
        low, high = (float(x) for x in row[4].strip("[]").split(", "))
        assert (low, high) == (method["pooled_interval"]["low"], method["pooled_interval"]["high"])
    # every run: the displayed 4 decimals of report.json's numbers
    for row, run in zip(tables["runs"]["rows"], data["runs"]):
        assert row[0] == run["label"] and int(row[1]) == run["seed"]
        assert float(row[2]) == round(run["refusal_rate"], 4) and float(row[4]) == round(run["utility"], 4)


def test_run_numbers_trace_to_results_files(rendered):
    _, data, _ = rendered
    experiments = stored_experiments()
    given = {(r["variant"], r["skip_ratio"], r["seed"]): r for r in experiments["runs"]}
    for run in data["runs"]:
        source = given[(run["variant"], run["skip_ratio"], run["seed"])]
        for key in ("run_dir", "config", "results", "results_sha256"):
            assert run[key] == source[key], key  # copied from experiments.json, paths as given (relative)
        raw = (DATA / run["results"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == run["results_sha256"]
        stored = json.loads(raw)
        assert stored["metrics"] == run["metrics"]
        skills = [stored["metrics"][f"utility.cast_world_{s}.exact_match"] for s in SKILLS]
        assert run["utility"] == pytest.approx(sum(skills) / 5, abs=1e-12)
    base = next(r for r in data["runs"] if r["variant"] == "base")
    for run in data["runs"]:
        assert run["utility_drop"] == pytest.approx(base["utility"] - run["utility"], abs=1e-12)


# --- verdicts --------------------------------------------------------------------------------------------------------


def test_stored_verdicts(rendered):
    paths, data, _ = rendered
    at = {(c["variant"], c["skip_ratio"]): c for c in data["comparisons"]}
    win, tie = at[("cast", 0.1)], at[("cast", 0.25)]
    assert win["outcome"] == "better" and win["beats_random"]
    assert win["sentence"].startswith("CAST (product) beats random skipping at skip ratio 0.1: it loses less utility")
    assert tie["outcome"] == "no clear difference" and not tie["beats_random"]
    assert tie["sentence"].startswith("CAST (product) does not beat random skipping at skip ratio 0.25")
    # hand-computed from the per-run utilities: advantage per seed = drop(random) - drop(CAST)
    runs = {(r["variant"], r["skip_ratio"], r["seed"]): r for r in data["runs"]}
    advantage = [runs[("random", 0.1, s)]["utility_drop"] - runs[("cast", 0.1, s)]["utility_drop"] for s in (0, 1, 2)]
    mean = sum(advantage) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in advantage) / 2)
    assert win["advantage"]["mean"] == round(mean, 4) and win["advantage"]["std"] == round(std, 4)
    assert f"advantage {mean:.4f} ± {std:.4f} over 3 paired seeds" in win["sentence"]
    assert data["verdict"]["beats_random_at"] == [0.1] and data["verdict"]["does_not_beat_at"] == [0.25]
    assert data["verdict"]["sentence"] == (
        "CAST (product) beats random skipping in 1 of 2 comparisons (skip ratio 0.1) and does not at skip ratio 0.25."
    )
    html_text = Path(paths["html"]).read_text()
    assert data["verdict"]["sentence"] in html_text and win["sentence"] in html_text


def world_metrics(utility: float, refusal: float = 0.9) -> dict:
    return {"safety.refusal_rate": refusal, "safety.over_refusal_rate": 0.1,
            **{f"utility.cast_world_{s}.exact_match": utility for s in SKILLS}}


def run_entry(variant: str, seed: int, metrics: dict, ratio: float = 0.0, score: str | None = None) -> dict:
    name = f"{variant}-r{ratio:g}-s{seed}"
    return {"variant": variant, "score": score, "skip_ratio": ratio, "seed": seed, "skip_heads": [],
            "run_dir": f"runs/{name}", "config": f"runs/{name}/config.yaml", "checkpoint": f"runs/{name}/final.ckpt",
            "results": f"runs/{name}/eval.json", "results_sha256": "0" * 64, "metrics": metrics, "leaf_tasks": None,
            "fit_seconds": None}


def synthetic(cast_utilities, random_utilities, base=0.8, ratio=0.1, others=None) -> dict:
    """An experiments.json (schema 2) without files: base, then per seed full FT, CAST and random skipping;
    ``others``: {variant: utilities per seed} for further map variants at the same ratio."""
    runs = [run_entry("base", 0, world_metrics(base, 0.1))]
    for seed, (c, r) in enumerate(zip(cast_utilities, random_utilities)):
        runs.append(run_entry("full", seed, world_metrics(0.6)))
        runs.append(run_entry("cast", seed, world_metrics(c), ratio, "product"))
        runs.append(run_entry("random", seed, world_metrics(r), ratio, "random"))
    for variant, utilities in (others or {}).items():
        runs += [run_entry(variant, seed, world_metrics(u), ratio, variant) for seed, u in enumerate(utilities)]
    return {"schema_version": 2, "plan": {}, "base_model": {"path": "base_model", "key": "k"}, "diagnosis": None,
            "runs": runs, "single_head": [], "provenance": {"git_commit": "abc"}}


def test_verdict_cast_beats_random():
    data = build_report(synthetic([0.75, 0.74, 0.73], [0.65, 0.64, 0.63]), PROVENANCE)  # drops 0.05.. vs 0.15..
    (row,) = data["comparisons"]
    assert row["outcome"] == "better" and row["advantage"]["mean"] == 0.1 and row["advantage"]["std"] == 0.0
    assert row["sentence"].startswith("CAST (product) beats random skipping at skip ratio 0.1")
    assert "utility drop 0.0600 ± 0.0100 vs 0.1600 ± 0.0100" in row["sentence"]
    assert data["verdict"]["sentence"] == "CAST (product) beats random skipping at every tested skip ratio (0.1)."


def test_verdict_cast_does_not_beat_random():
    # within the spread: advantages 0.02, -0.03, 0.01 -> mean 0, std 0.0265
    data = build_report(synthetic([0.70, 0.66, 0.68], [0.68, 0.69, 0.67]), PROVENANCE)
    (row,) = data["comparisons"]
    assert row["outcome"] == "no clear difference" and not row["beats_random"]
    assert row["advantage"]["mean"] == 0.0 and row["advantage"]["std"] == 0.0265
    assert row["sentence"].startswith(
        "CAST (product) does not beat random skipping at skip ratio 0.1: the difference is within the spread over seeds"
    )
    assert data["verdict"]["sentence"] == "CAST (product) does not beat random skipping at any tested skip ratio (0.1)."
    # clearly worse: random skipping keeps more utility
    data = build_report(synthetic([0.60, 0.59, 0.58], [0.70, 0.70, 0.70]), PROVENANCE)
    (row,) = data["comparisons"]
    assert row["outcome"] == "worse" and row["advantage"]["mean"] == -0.11
    assert "does not beat random skipping at skip ratio 0.1: it loses more utility" in row["sentence"]
    # one seed: no spread, no verdict
    data = build_report(synthetic([0.75], [0.65]), PROVENANCE)
    assert data["comparisons"][0]["outcome"] == "inconclusive"
    assert "cannot be judged: one seed gives no spread" in data["comparisons"][0]["sentence"]
    assert data["verdict"]["sentence"] == (
        "CAST (product) vs random skipping cannot be judged at skip ratio 0.1: one seed gives no spread (run two or more seeds)."
    )


# --- statistics by hand ----------------------------------------------------------------------------------------------


def test_spearman_hand_cases():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([0.1, 5, 7, 100], [1, 2, 3, 4]) == pytest.approx(1.0)  # ranks only
    # ties: y ranks [1, 2, 3.5, 5, 3.5]; sum dx*dy = 8, sum dx^2 = 10, sum dy^2 = 9.5
    assert list(rankdata([5, 6, 7, 8, 7])) == [1, 2, 3.5, 5, 3.5]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(spearman([1, 2, 3], [2, 2, 2]))  # constant: undefined
    assert math.isnan(spearman([1, 2], [1, 2]))  # fewer than 3 pairs
    assert spearman([1, 2, float("nan"), 3, None], [3, 1, 5, 2, 4]) == pytest.approx(-0.5)  # non-finite pairs dropped


def test_spearman_ties_on_both_sides_by_hand():
    # x ranks [1.5, 1.5, 3, 4], y ranks [1, 3, 3, 3]: dx = [-1, -1, 0.5, 1.5], dy = [-1.5, 0.5, 0.5, 0.5]
    # sum dx*dy = 1.5 - 0.5 + 0.25 + 0.75 = 2, sum dx^2 = 4.5, sum dy^2 = 3 -> 2 / sqrt(13.5)
    assert spearman([1, 1, 2, 3], [0, 5, 5, 5]) == pytest.approx(2 / math.sqrt(13.5), abs=1e-12)


def test_bootstrap_interval_by_hand():
    # A strictly increasing relation: every resample with two distinct points has rho = 1; resamples drawing one
    # point only are undefined and dropped, so the interval is exactly [1, 1].
    result = bootstrap_spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert (result["low"], result["high"], result["method"]) == (1.0, 1.0, "percentile")
    assert 0 < result["iters"] <= result["resamples"] == 1000
    # the same seed gives the same interval; an undefined correlation gives none
    x, y = [0.1, 0.5, 0.3, 0.2, 0.9, 0.4], [0.2, 0.25, 0.25, 0.1, 0.5, 0.3]
    assert bootstrap_spearman(x, y) == bootstrap_spearman(x, y)
    assert -1 <= bootstrap_spearman(x, y)["low"] <= spearman(x, y) <= bootstrap_spearman(x, y)["high"] <= 1
    assert bootstrap_spearman([1, 2], [1, 2]) == {"low": None, "high": None, "iters": 0, "resamples": 1000,
                                                  "method": "percentile"}
    assert bootstrap_spearman([1, 2, 3], [5, 5, 5])["low"] is None  # every resample constant: undefined


def hand_map(oc) -> ConflictMap:
    model = {"name": "hand", "architecture": "llama", "num_layers": 1, "num_heads": 4, "num_kv_heads": 4, "head_dim": 2}
    fs = [[1.0, 1.0, 1.0, 1.0]]
    return ConflictMap(model=model, oc=oc, fs=fs, score=combine_scores(oc, fs, "product"), skip=[[0, 0]],
                       options={"score": "product"})


def validity_inputs(benefits_by_seed: dict[int, list[float]]):
    runs = [{"variant": "full", "seed": s, "utility": 0.5, "refusal_rate": 0.9} for s in benefits_by_seed]
    single = [{"head": [0, h], "seed": s, "metrics": {"utility.cast_world_add.exact_match": 0.5 + b,
                                                      "safety.refusal_rate": 0.9}}
              for s, benefits in benefits_by_seed.items() for h, b in enumerate(benefits)]
    return single, runs


def test_validity_spearman_hand_case():
    single, runs = validity_inputs({0: [0.4, 0.3, 0.2, 0.1], 1: [0.4, 0.2, 0.3, 0.1]})
    result = diagnosis_validity(single, runs, hand_map([[0.4, 0.3, 0.2, 0.1]]))
    product = result["methods"]["product"]
    assert product["rho_per_seed"] == [1.0, 0.8]  # seed 1 swaps heads 1 and 2: 1 - 6 * 2 / 60
    assert product["rho"]["mean"] == 0.9 and product["rho"]["std"] == round(math.sqrt(0.02), 4)
    # pooled: mean benefits [0.4, 0.25, 0.25, 0.1] -> ranks [4, 2.5, 2.5, 1]: 4.5 / sqrt(5 * 4.5)
    assert product["pooled_rho"] == round(4.5 / math.sqrt(22.5), 4)
    assert product["outcome"] == "predictive"
    assert result["methods"]["oc"]["rho_per_seed"] == [1.0, 0.8]
    assert result["methods"]["fs"]["rho_per_seed"] == [None, None] and result["methods"]["fs"]["outcome"] == "undefined"
    assert [h["benefit"]["mean"] for h in result["heads"]] == [0.4, 0.25, 0.25, 0.1]
    assert result["sentence"].startswith("The product conflict score predicts the measured benefit of skipping a head")
    assert "Spearman rho 0.9000 ± 0.1414 over 2 seeds" in result["sentence"]
    # reported as measured when the score gets it backwards
    single, runs = validity_inputs({0: [0.1, 0.2, 0.3, 0.4], 1: [0.1, 0.3, 0.2, 0.4]})
    result = diagnosis_validity(single, runs, hand_map([[0.4, 0.3, 0.2, 0.1]]))
    assert result["methods"]["product"]["rho"]["mean"] == -0.9
    assert result["methods"]["product"]["outcome"] == "inversely related"
    assert result["sentence"].startswith("The product conflict score does not predict the benefit of skipping a head")


def test_stored_validity(rendered):
    _, data, _ = rendered
    validity = data["validity"]
    assert validity["available"] and validity["n_heads"] == 6 and validity["seeds"] == [0, 1, 2]
    assert set(validity["methods"]) == {"product", "weighted", "rank", "oc", "fs", "random"}
    for method in validity["methods"].values():
        assert len(method["rho_per_seed"]) == 3 and method["rho"]["n"] == 3
        low, high = method["pooled_interval"]["low"], method["pooled_interval"]["high"]
        assert -1 <= low <= high <= 1
    # the stored benefits are utility(single head) - utility(full, same seed), recomputed here
    experiments = stored_experiments()
    full = {r["seed"]: utility_score(r["metrics"]) for r in experiments["runs"] if r["variant"] == "full"}
    head = validity["heads"][0]
    mine = [e for e in experiments["single_head"] if e["head"] == head["head"]]
    assert head["benefit_per_seed"] == [round(utility_score(e["metrics"]) - full[e["seed"]], 4) for e in mine]
    # each single-head run traces to its results file, copied from experiments.json
    assert len(validity["runs"]) == 18
    for run in validity["runs"]:
        assert hashlib.sha256((DATA / run["results"]).read_bytes()).hexdigest() == run["results_sha256"]
    # the pooled rho is scipy's Spearman of the map scores against the seed-mean benefits, recomputed here
    cmap = ConflictMap.from_json(DATA / "conflict_map.json")
    assert data["inputs"]["diagnosis_map"] == "conflict_map.json"
    assert data["inputs"]["diagnosis_map_sha256"] == hashlib.sha256((DATA / "conflict_map.json").read_bytes()).hexdigest()
    scores = combine_scores(cmap.oc, cmap.fs, "product")
    x = [float(scores[h["head"][0]][h["head"][1]]) for h in validity["heads"]]
    y = [sum(utility_score(e["metrics"]) - full[e["seed"]] for e in experiments["single_head"] if e["head"] == h["head"]) / 3
         for h in validity["heads"]]
    assert validity["methods"]["product"]["pooled_rho"] == round(spearman(x, y), 4)


# --- utility definition ----------------------------------------------------------------------------------------------


def test_utility_score_definition():
    metrics = {**world_metrics(0.0), "utility.cast_world_add.exact_match": 0.5, "utility.cast_world_facts.exact_match": 1.0,
               "utility.cast_world_utility.exact_match": 0.9, "safety.refusal_rate": 0.3}
    assert utility_score(metrics) == pytest.approx(0.3)  # (0.5 + 0 + 0 + 0 + 1) / 5: the group aggregate not counted
    assert utility_score(metrics, leaf_tasks=["cast_world_add", "cast_world_facts"]) == pytest.approx(0.75)
    other = {"utility.arc.acc": 0.4, "utility.arc.acc_norm": 0.5, "utility.gsm8k.exact_match.strict-match": 0.2,
             "utility.gsm8k.exact_match.flexible-extract": 0.3, "utility.mmlu.acc": 0.6, "utility.mmlu_anatomy.acc": 0.7,
             "utility.arc.acc_stderr": 0.01}
    assert task_utilities(other) == {"arc": 0.5, "gsm8k": 0.3, "mmlu_anatomy": 0.7}
    assert math.isnan(utility_score({"safety.refusal_rate": 1.0}))


# --- every map variant against random skipping ------------------------------------------------------------------------


def test_rank_and_weighted_are_reported_and_compared_to_random():
    experiments = synthetic([0.75, 0.74, 0.73], [0.65, 0.64, 0.63],
                            others={"rank": [0.70, 0.69, 0.71], "weighted": [0.66, 0.64, 0.65], "oc": [0.7, 0.7, 0.7]})
    data = build_report(experiments, PROVENANCE)
    labels = [v["label"] for v in data["variants"]]
    assert labels == ["base model", "full fine-tuning", "CAST (product) @ 0.1", "random skip @ 0.1", "OC-only @ 0.1",
                      "CAST (rank) @ 0.1", "CAST (weighted) @ 0.1"]  # plan.VARIANTS order
    rows = {c["variant"]: c for c in data["comparisons"]}
    assert list(rows) == ["cast", "oc", "rank", "weighted"]  # every map variant but random, same ratio
    # hand-computed: advantage = drop(random) - drop(variant) = utility(variant) - utility(random), per seed
    rank = rows["rank"]
    advantage = [0.70 - 0.65, 0.69 - 0.64, 0.71 - 0.63]
    mean = sum(advantage) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in advantage) / 2)
    assert rank["advantage"]["mean"] == round(mean, 4) and rank["advantage"]["std"] == round(std, 4)
    assert rank["advantage_per_seed"] == [round(a, 4) for a in advantage] and rank["outcome"] == "better"
    assert rank["sentence"].startswith("CAST (rank) beats random skipping at skip ratio 0.1")
    assert rows["weighted"]["outcome"] == "no clear difference"  # advantages 0.01, 0, 0.02: within the spread
    assert rows["weighted"]["sentence"].startswith("CAST (weighted) does not beat random skipping at skip ratio 0.1")
    # the headline verdict stays about CAST (product)
    assert data["verdict"]["sentence"] == "CAST (product) beats random skipping at every tested skip ratio (0.1)."
    assert data["verdict"]["sentences"] == [rows["cast"]["sentence"]]


def test_rank_and_weighted_in_the_rendered_report(tmp_path):
    experiments = synthetic([0.75, 0.74, 0.73], [0.65, 0.64, 0.63],
                            others={"rank": [0.70, 0.69, 0.71], "weighted": [0.66, 0.64, 0.65], "lora": [0.6, 0.6, 0.6]})
    written = write_report(experiments, tmp_path)
    assert set(written) == {"json", "markdown", "html", "pareto", "utility_drop"}  # no map: no heatmap, no validity
    data = json.loads((tmp_path / written["json"]).read_text())
    tables = parse_html(tmp_path / written["html"]).tables
    assert [row[0] for row in tables["summary"]["rows"]] == [v["label"] for v in data["variants"]]
    assert "CAST (rank) @ 0.1" in [row[0] for row in tables["summary"]["rows"]]
    assert "lora @ 0.1" in [v["label"] for v in data["variants"]]  # an unknown variant: fallback label and colour
    compared = [row[0] for row in tables["comparisons"]["rows"]]
    assert compared == ["CAST (product)", "CAST (rank)", "CAST (weighted)", "lora"]
    markdown = (tmp_path / written["markdown"]).read_text()
    assert "| CAST (weighted) | 0.1 |" in markdown


# --- report.json: paths and inputs -----------------------------------------------------------------------------------


def _strings(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


def test_report_json_holds_no_absolute_path(rendered, tmp_path):
    paths, data, _ = rendered
    text = Path(paths["json"]).read_text()
    assert str(Path(paths["json"]).parent) not in text and str(DATA) not in text and str(Path.home()) not in text
    for value in _strings(data):
        assert not Path(value).is_absolute() and not value.startswith("/") and ":\\" not in value, value
    assert data["runs"][0]["results"] == "results/base_s0.json" and data["plots"]["pareto"] == "pareto.png"
    # an absolute path given in experiments.json is copied as given, and flagged
    experiments = stored_experiments()
    experiments["runs"][0]["results"] = str(tmp_path / "eval.json")
    warnings = build_report(experiments, PROVENANCE)["warnings"]
    assert any("is an absolute path" in w and "results" in w for w in warnings)


def test_report_reads_no_results_file(tmp_path, monkeypatch):
    """Everything comes from experiments.json: the report is the same without the results files on disk."""
    monkeypatch.chdir(tmp_path)  # the fixture's relative paths resolve nowhere from here
    experiments = stored_experiments()
    for run in experiments["runs"]:
        run["results"] = "gone/" + run["results"]
    first = build_report(experiments, PROVENANCE)
    assert first["warnings"] == []
    del experiments["runs"][1]["results_sha256"]
    data = build_report(experiments, PROVENANCE)
    assert [r["utility"] for r in data["runs"]] == [r["utility"] for r in first["runs"]]
    assert data["warnings"] == [f"run {data['runs'][1]['label']} seed {data['runs'][1]['seed']} has no results file "
                                "and hash in experiments.json: its numbers cannot be traced"]
    # leaf tasks come from experiments.json too: the group aggregate is not a leaf, so it is never counted
    experiments["runs"][0]["leaf_tasks"] = ["cast_world_add", "cast_world_facts"]
    base = build_report(experiments, PROVENANCE)["runs"][0]
    assert base["variant"] == "base" and list(base["tasks"]) == ["cast_world_add", "cast_world_facts"]


def test_bad_experiments_are_one_line_errors():
    with pytest.raises(CastError, match="schema version 1"):
        build_report({"schema_version": 1, "runs": []})
    with pytest.raises(CastError, match="schema version None"):
        build_report({"runs": [{"variant": "base", "seed": 0, "metrics": {}}]})
    with pytest.raises(CastError, match="no 'runs' list"):
        build_report({"schema_version": 2})
    with pytest.raises(CastError, match="no runs"):
        build_report({"schema_version": 2, "runs": []})
    with pytest.raises(CastError, match="lacks metrics"):
        build_report({"schema_version": 2, "runs": [{"variant": "base", "seed": 0}]})
    with pytest.raises(CastError, match="run 0 lacks variant, seed"):
        build_report({"schema_version": 2, "runs": [{"metrics": {}}]})
    with pytest.raises(CastError, match="single_head entry 0 lacks seed"):
        build_report({"schema_version": 2, "runs": [{"variant": "base", "seed": 0, "metrics": {}}],
                      "single_head": [{"head": [0, 1], "metrics": {}}]})


def test_unwritable_output_is_refused_before_anything_is_computed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CastError, match="cannot write"):
        write_report({"schema_version": 2}, blocker / "report")  # the output check comes before validation


# --- the command (needs the lead's cast_lightning/study/commands.py) -------------------------------------------------


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "world"
STUDY = ["--config", str(CONFIGS / "demo.yaml"), "--fit_config", str(CONFIGS / "fit.yaml"),
         "--diagnose_config", str(CONFIGS / "diagnose.yaml")]


@pytest.fixture
def fake_stages(monkeypatch):
    """``stages.run_study`` faked: it returns the stored experiments (nothing is built or trained)."""
    calls = []

    def run_study(plan, *args, **kwargs):
        calls.append(plan)
        return stored_experiments()

    monkeypatch.setattr("cast_lightning.study.stages.run_study", run_study)
    return calls


def test_cast_report_cli_runs_stages_then_writes_report(fake_stages, tmp_path, capsys):
    from cast_lightning.cli import main

    assert main(["report", *STUDY, "--output_dir", str(tmp_path)]) == 0
    (plan,) = fake_stages  # the stages ran (faked), then the report was written from their experiments
    assert plan.variants == ["base", "full", "cast", "random"] and plan.output_dir == str(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    captured = capsys.readouterr()
    assert data["verdict"]["sentence"] in captured.out + captured.err
    assert {"report.md", "report.html", "pareto.png"} <= {p.name for p in tmp_path.iterdir()}


def test_cast_report_cli_rejects_a_bad_plan_first(fake_stages, tmp_path, capsys):
    from cast_lightning.cli import main

    assert main(["report", *STUDY, "--output_dir", str(tmp_path), "--variants", "[cast, lora]"]) == 2
    assert "unknown variant" in capsys.readouterr().err and not fake_stages
