"""The report dictionary -> ``report.md`` and a self-contained ``report.html`` (plots inlined as base64), and
``write_report``: experiments -> every report file, written atomically.

The page layouts are ``string.Template`` files in ``templates/`` (``report.md``, ``report.html``); the tables
are built once (``tables``) with already formatted cells that both formats share, so the Markdown and the HTML
show the same numbers, each literally a number in ``report.json``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template

from cast_lightning.io import atomic_write_json, atomic_write_text, ensure_writable
from cast_lightning.study.analysis import base_model_name, build_report
from cast_lightning.study.plots import plot_conflict_map, plot_pareto, plot_utility_drop, plot_validity
from cast_lightning.study.statistics import SECONDS_DECIMALS, format_stat, format_value

PLOT_ALT = {"pareto": "Safety vs utility", "utility_drop": "Utility drop vs skip ratio",
            "validity": "Diagnosis validity", "conflict_map": "Conflict map"}


@lru_cache(maxsize=None)
def template(name: str) -> Template:
    """A page template from ``cast_lightning/study/templates`` (shipped as package data)."""
    return Template(resources.files("cast_lightning.study").joinpath("templates", name).read_text(encoding="utf-8"))


def _name(label: str) -> str:
    return label.split(" @ ")[0]


def _interval(interval: dict) -> str:
    if interval.get("low") is None:
        return "n/a"
    return f"[{format_value(interval['low'])}, {format_value(interval['high'])}]"


def tables(data: dict) -> dict[str, dict]:
    """The report's tables by id, each ``{"title", "header", "rows"}`` with formatted cells (md and html share them)."""
    out = {"summary": {
        "title": "Variants (mean ± std over seeds)",
        "header": ["variant", "seeds", "refusal rate", "over-refusal rate", "utility", "utility drop", "heads skipped",
                   "fit seconds", "Pareto"],
        "rows": [[v["label"], str(v["n_seeds"]), format_stat(v["refusal_rate"]), format_stat(v["over_refusal_rate"]),
                  format_stat(v["utility"]), format_stat(v["utility_drop"]), format_stat(v["n_skipped"], SECONDS_DECIMALS),
                  format_stat(v["fit_seconds"], SECONDS_DECIMALS), "yes" if v["pareto_optimal"] else ""]
                 for v in data["variants"]],
    }}
    if data["comparisons"]:
        out["comparisons"] = {
            "title": "Against each variant's control at the same budget (paired by seed)",
            "header": ["variant", "skip ratio", "control", "utility drop", "control utility drop", "advantage",
                       "per seed", "refusal rate", "control refusal rate", "outcome"],
            "rows": [[_name(c["label"]), f"{c['skip_ratio']:g}", c.get("control", "random"), format_stat(c["utility_drop"]),
                      format_stat(c["random_utility_drop"]), format_stat(c["advantage"]),
                      ", ".join(format_value(a) for a in c["advantage_per_seed"]), format_stat(c["refusal_rate"]),
                      format_stat(c["random_refusal_rate"]), c["outcome"]] for c in data["comparisons"]],
        }
    if data.get("overlaps"):
        out["overlaps"] = {
            "title": "Overlap of the head sets the variants pick (Jaccard, mean ± std over seeds)",
            "header": ["skip ratio", "variant", "variant", "seeds", "Jaccard"],
            "rows": [[f"{o['skip_ratio']:g}", o["a"], o["b"], str(len(o["seeds"])), format_stat(o["jaccard"])]
                     for o in data["overlaps"]],
        }
    if data["tasks"]:
        out["tasks"] = {
            "title": "Utility per task (headline metric, mean ± std over seeds)",
            "header": ["variant", *data["tasks"]],
            "rows": [[v["label"], *(format_stat(v["tasks"][t]) for t in data["tasks"])] for v in data["variants"]],
        }
    validity = data["validity"]
    if validity.get("available"):
        out["validity"] = {
            "title": "Diagnosis validity: Spearman rho of score vs measured benefit",
            "header": ["scoring option", "rho (mean ± std over seeds)", "rho per seed", "pooled rho",
                       "bootstrap 95% interval", "outcome"],
            "rows": [[m, format_stat(r["rho"]), ", ".join(format_value(x) for x in r["rho_per_seed"]),
                      format_value(r["pooled_rho"]), _interval(r["pooled_interval"]), r["outcome"]]
                     for m, r in validity["methods"].items()],
        }
        scores = validity["methods"][validity["map_score"]]["head_scores"]
        out["heads"] = {
            "title": "Heads tested alone (benefit = utility - full fine-tuning, same seed)",
            "header": ["head", "OC", "FS", f"{validity['map_score']} score", "benefit (mean ± std)", "benefit per seed",
                       "refusal change"],
            "rows": [[f"L{r['head'][0]} H{r['head'][1]}", format_value(r.get("oc"), 6), format_value(r.get("fs"), 6),
                      format_value(scores[i], 6), format_stat(r["benefit"]),
                      ", ".join(format_value(b) for b in r["benefit_per_seed"]), format_stat(r["refusal_change"])]
                     for i, r in enumerate(validity["heads"])],
        }
    out["runs"] = {
        "title": "Every run (numbers from its results file)",
        "header": ["variant", "seed", "refusal rate", "over-refusal rate", "utility", "utility drop", "heads skipped",
                   "results"],
        "rows": [[r["label"], str(r["seed"]), format_value(r["refusal_rate"]), format_value(r["over_refusal_rate"]),
                  format_value(r["utility"]), format_value(r["utility_drop"]), str(r["n_skipped"]), r["results"] or "n/a"]
                 for r in data["runs"]],
    }
    return out


def _fields(data: dict) -> dict:
    prov = data["provenance"]
    return {
        "created": str(data.get("created") or "unknown"),
        "git_commit": str(prov.get("git_commit") or "unknown"),
        "base_model": base_model_name(data),
        "provenance": json.dumps(prov, indent=2, default=str),
        "plan": json.dumps(data["inputs"].get("plan") or {}, indent=2, default=str),
    }


# --- Markdown -------------------------------------------------------------------------------------------------------


def _md_table(table: dict) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"### {table['title']}", "", "| " + " | ".join(cell(h) for h in table["header"]) + " |",
             "|" + "|".join("---" for _ in table["header"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def render_markdown(data: dict, plots: dict[str, str]) -> str:
    """``report.md``: ``plots`` maps plot name -> file name beside it."""
    found = tables(data)
    definitions = data["definitions"]

    def table(name: str) -> str:
        return _md_table(found[name]) if name in found else ""

    def plot(name: str) -> str:
        return f"![{PLOT_ALT[name]}]({plots[name]})\n" if name in plots else ""

    validity = ""
    if "validity" in found:
        validity = "\n".join([f"_{definitions['validity']}_", "", f"_{definitions['spearman']}_", "",
                              f"_{definitions['bootstrap']}_", "", table("validity"), table("heads")])
    text = template("report.md").substitute(
        _fields(data),
        verdict="\n".join(f"- {s}" for s in [data["verdict"]["sentence"], *data["verdict"]["sentences"]]),
        verdict_rule=definitions["verdict"],
        summary_table=table("summary"),
        utility_definition=definitions["utility"],
        pareto_plot=plot("pareto"),
        comparisons_table=table("comparisons") + table("overlaps"),
        utility_drop_plot=plot("utility_drop"),
        tasks_table=table("tasks"),
        validity_sentence=data["validity"].get("sentence") or "",
        validity_tables=validity,
        validity_plot=plot("validity"),
        conflict_map_section=f"## Conflict map\n\n{plot('conflict_map')}" if "conflict_map" in plots else "",
        runs_table=table("runs"),
        warnings_section=("## Warnings\n\n" + "\n".join(f"- {w}" for w in data["warnings"]) + "\n"
                          if data["warnings"] else ""),
    )
    return re.sub(r"\n{3,}", "\n\n", text)


# --- HTML -----------------------------------------------------------------------------------------------------------


def _html_table(table_id: str, table: dict) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table["header"])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table["rows"])
    return (f"<h3>{html.escape(table['title'])}</h3>\n<table id=\"{table_id}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _img(path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"></p>'


def render_html(data: dict, plot_files: dict[str, Path]) -> str:
    """``report.html``, self-contained: ``plot_files`` (plot name -> PNG path) are inlined as base64."""
    found = tables(data)
    definitions = data["definitions"]
    esc = html.escape

    def table(name: str) -> str:
        return _html_table(name, found[name]) if name in found else ""

    def plot(name: str) -> str:
        return _img(plot_files[name], PLOT_ALT[name]) if name in plot_files else ""

    verdict = data["verdict"]
    validity = ""
    if "validity" in found:
        notes = "\n".join(f"<p class=\"note\">{esc(definitions[k])}</p>" for k in ("validity", "spearman", "bootstrap"))
        validity = "\n".join([notes, table("validity"), table("heads")])
    fields = {key: esc(value) for key, value in _fields(data).items()}
    text = template("report.html").substitute(
        fields,
        verdict="\n".join([f"<p><strong>{esc(verdict['sentence'])}</strong></p>",
                           *(f"<p>{esc(s)}</p>" for s in verdict["sentences"])]),
        verdict_rule=esc(definitions["verdict"]),
        summary_table=table("summary"),
        utility_definition=esc(definitions["utility"]),
        pareto_plot=plot("pareto"),
        comparisons_table=table("comparisons") + table("overlaps"),
        utility_drop_plot=plot("utility_drop"),
        tasks_table=table("tasks"),
        validity_sentence=esc(data["validity"].get("sentence") or ""),
        validity_tables=validity,
        validity_plot=plot("validity"),
        conflict_map_section=f"<h2>Conflict map</h2>\n{plot('conflict_map')}" if "conflict_map" in plot_files else "",
        runs_table=table("runs"),
        warnings_section=("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in data["warnings"]) + "</ul>"
                          if data["warnings"] else ""),
    )
    return re.sub(r"\n{2,}", "\n", text)


# --- the files ------------------------------------------------------------------------------------------------------


def write_report(experiments: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``report.json``, ``report.md``, ``report.html`` and the plots into ``output_dir``, each atomically.

    ``experiments`` is the experiments.json dictionary (schema 2, see ``analysis``). Checks that ``output_dir`` is
    writable before computing anything. Returns ``{"json", "markdown", "html", "pareto", "utility_drop",
    "validity"?, "conflict_map"?}`` -> the written path, relative to ``output_dir``.
    """
    out = Path(output_dir)
    ensure_writable(out / "report.json", "output_dir")
    data = build_report(experiments)
    plot_files: dict[str, Path] = {
        "pareto": plot_pareto(data, out / "pareto.png"),
        "utility_drop": plot_utility_drop(data, out / "utility_drop.png"),
    }
    validity = plot_validity(data, out / "validity.png")
    if validity is not None:
        plot_files["validity"] = validity
    heatmap = plot_conflict_map((experiments.get("diagnosis") or {}).get("conflict_map"), out / "conflict_map.png")
    if heatmap is not None:
        plot_files["conflict_map"] = heatmap
    data["plots"] = {name: os.path.relpath(path, out) for name, path in plot_files.items()}
    written = {
        "json": atomic_write_json(out / "report.json", data),
        "markdown": atomic_write_text(out / "report.md", render_markdown(data, data["plots"])),
        "html": atomic_write_text(out / "report.html", render_html(data, plot_files)),
        **plot_files,
    }
    return {name: os.path.relpath(path, out) for name, path in written.items()}
