"""`cast report` rendering from small stored results files: files, self-contained HTML whose numbers equal
report.json, verdicts computed from the numbers (CAST beating random skipping and not), Spearman by hand."""

from __future__ import annotations

import base64
import json
import math
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cast_lightning.conflict import ConflictMap, combine_scores
from cast_lightning.errors import CastError
from cast_lightning.report import (
    build_report,
    diagnosis_validity,
    rankdata,
    render_report,
    report,
    spearman,
    task_utilities,
    utility_score,
)

DATA = Path(__file__).resolve().parent / "data" / "report"
SKILLS = ["add", "reverse", "sort", "count", "facts"]


def stored_experiments() -> dict:
    experiments = json.loads((DATA / "experiments.json").read_text())
    experiments["output_dir"] = str(DATA)  # results paths in it are relative to the experiments folder
    return experiments


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = render_report(stored_experiments(), out)
    return paths, json.loads(Path(paths["json"]).read_text())


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
    paths, data = rendered
    assert set(paths) == {"json", "markdown", "html", "pareto", "utility_drop", "conflict_map", "validity"}
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
    assert data["provenance"]["config"]["skip_ratios"] == [0.1, 0.25]
    assert all(r["results_sha256"] and len(r["results_sha256"]) == 64 for r in data["runs"])
    markdown = Path(paths["markdown"]).read_text()
    assert "| variant | seeds | refusal rate |" in markdown and "![Safety vs utility](pareto.png)" in markdown
    assert data["verdict"]["sentence"] in markdown and data["validity"]["sentence"] in markdown


def test_html_is_self_contained(rendered):
    paths, _ = rendered
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
    paths, data = rendered
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
    paths, data = rendered
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
    # every run: the displayed 4 decimals of report.json's numbers
    for row, run in zip(tables["runs"]["rows"], data["runs"]):
        assert row[0] == run["label"] and int(row[1]) == run["seed"]
        assert float(row[2]) == round(run["refusal_rate"], 4) and float(row[4]) == round(run["utility"], 4)


def test_run_numbers_trace_to_results_files(rendered):
    _, data = rendered
    for run in data["runs"]:
        stored = json.loads(Path(run["results"]).read_text())
        assert stored["metrics"] == run["metrics"]
        skills = [stored["metrics"][f"utility.cast_world_{s}.exact_match"] for s in SKILLS]
        assert run["utility"] == pytest.approx(sum(skills) / 5, abs=1e-12)
    base = next(r for r in data["runs"] if r["variant"] == "base")
    for run in data["runs"]:
        assert run["utility_drop"] == pytest.approx(base["utility"] - run["utility"], abs=1e-12)


# --- verdicts --------------------------------------------------------------------------------------------------------


def test_stored_verdicts(rendered):
    paths, data = rendered
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


def synthetic(cast_utilities, random_utilities, base=0.8, ratio=0.1) -> dict:
    runs = [{"variant": "base", "score": None, "skip_ratio": 0.0, "seed": 0, "metrics": world_metrics(base, 0.1)}]
    for seed, (c, r) in enumerate(zip(cast_utilities, random_utilities)):
        runs.append({"variant": "full", "score": None, "skip_ratio": 0.0, "seed": seed, "metrics": world_metrics(0.6)})
        runs.append({"variant": "cast", "score": "product", "skip_ratio": ratio, "seed": seed, "metrics": world_metrics(c)})
        runs.append({"variant": "random", "score": "random", "skip_ratio": ratio, "seed": seed, "metrics": world_metrics(r)})
    return {"output_dir": None, "base_model": "m", "diagnosis_map": None, "config": {}, "runs": runs, "single_head": [],
            "provenance": {"git_commit": "abc"}}


def test_verdict_cast_beats_random():
    data = build_report(synthetic([0.75, 0.74, 0.73], [0.65, 0.64, 0.63]))  # drops 0.05.. vs 0.15..
    (row,) = data["comparisons"]
    assert row["outcome"] == "better" and row["advantage"]["mean"] == 0.1 and row["advantage"]["std"] == 0.0
    assert row["sentence"].startswith("CAST (product) beats random skipping at skip ratio 0.1")
    assert "utility drop 0.0600 ± 0.0100 vs 0.1600 ± 0.0100" in row["sentence"]
    assert data["verdict"]["sentence"] == "CAST (product) beats random skipping at every tested skip ratio (0.1)."


def test_verdict_cast_does_not_beat_random():
    # within the spread: advantages 0.02, -0.03, 0.01 -> mean 0, std 0.0265
    data = build_report(synthetic([0.70, 0.66, 0.68], [0.68, 0.69, 0.67]))
    (row,) = data["comparisons"]
    assert row["outcome"] == "no clear difference" and not row["beats_random"]
    assert row["advantage"]["mean"] == 0.0 and row["advantage"]["std"] == 0.0265
    assert row["sentence"].startswith(
        "CAST (product) does not beat random skipping at skip ratio 0.1: the difference is within the spread over seeds"
    )
    assert data["verdict"]["sentence"] == "CAST (product) does not beat random skipping at any tested skip ratio (0.1)."
    # clearly worse: random skipping keeps more utility
    data = build_report(synthetic([0.60, 0.59, 0.58], [0.70, 0.70, 0.70]))
    (row,) = data["comparisons"]
    assert row["outcome"] == "worse" and row["advantage"]["mean"] == -0.11
    assert "does not beat random skipping at skip ratio 0.1: it loses more utility" in row["sentence"]
    # one seed: no spread, no verdict
    data = build_report(synthetic([0.75], [0.65]))
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
    _, data = rendered
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


# --- entry point and robustness --------------------------------------------------------------------------------------


@pytest.fixture
def fake_pipeline(monkeypatch):
    calls = []

    def run_experiments(**kwargs):
        calls.append(kwargs)
        return stored_experiments()

    module = types.ModuleType("cast_lightning.pipeline")
    module.run_experiments = run_experiments
    monkeypatch.setitem(sys.modules, "cast_lightning.pipeline", module)
    return calls


def test_cast_report_cli_runs_pipeline_then_renders(fake_pipeline, tmp_path, monkeypatch, capsys):
    from cast_lightning import report as report_module
    from cast_lightning.cli import main

    def fake_render(experiments, out):
        assert experiments["runs"]  # what run_experiments returned
        (Path(out) / "report.json").write_text(json.dumps({"verdict": {"sentence": "Verdict sentence."}}))
        return {"json": str(Path(out) / "report.json"), "html": str(Path(out) / "report.html")}

    monkeypatch.setattr(report_module, "render_report", fake_render)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "report.yaml"
    assert main(["report", "--config", str(config), "--output_dir", str(tmp_path), "--eval_limit", "5"]) == 0
    assert fake_pipeline == [{"output_dir": str(tmp_path), "variants": ["base", "full", "cast", "random", "oc", "fs"],
                              "skip_ratios": [0.1, 0.25], "seeds": [0, 1, 2], "single_head_validity": 8,
                              "max_steps": 150, "eval_limit": 5}]
    assert "Verdict sentence." in capsys.readouterr().out


def test_report_function_writes_files(fake_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr("cast_lightning.report.plot_pareto", lambda data, path: _tiny_png(path))
    monkeypatch.setattr("cast_lightning.report.plot_utility_drop", lambda data, path: _tiny_png(path))
    monkeypatch.setattr("cast_lightning.report.plot_validity", lambda data, path: None)
    monkeypatch.setattr(ConflictMap, "plot", lambda self, path: _tiny_png(path))
    paths = report(output_dir=str(tmp_path), seeds=[0], skip_ratios=[0.1, 0.25])
    assert fake_pipeline[0]["seeds"] == [0] and fake_pipeline[0]["single_head_validity"] == 8
    assert all(Path(p).is_file() for p in paths.values())
    with pytest.raises(CastError, match="unknown variant"):
        report(output_dir=str(tmp_path), variants=["cast", "lora"])
    with pytest.raises(CastError, match="outside"):
        report(output_dir=str(tmp_path), skip_ratios=[1.5])


def _tiny_png(path):
    from cast_lightning.io import atomic_write_bytes

    return atomic_write_bytes(path, base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="))


def test_mismatch_and_missing_results_are_warned():
    experiments = stored_experiments()
    experiments["runs"][1]["metrics"]["safety.refusal_rate"] = 0.123
    experiments["runs"][2]["results"] = "results/nowhere.json"
    warnings = build_report(experiments)["warnings"]
    assert any("safety.refusal_rate" in w and "0.123" in w for w in warnings)
    assert any("nowhere.json is missing" in w for w in warnings)


def test_bad_experiments_are_one_line_errors():
    with pytest.raises(CastError, match="no runs"):
        build_report({"runs": []})
    with pytest.raises(CastError, match="lacks metrics"):
        build_report({"runs": [{"variant": "base", "seed": 0}]})
    with pytest.raises(CastError, match="does not exist"):
        render_report("/nonexistent/experiments.json", "/tmp/unused")
