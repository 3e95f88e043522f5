"""Per-category tables of every metric (markdown + json), models side by side, and a captioned image grid.

A metric's per-image rows carry `score` (None: skipped or failed, counted) and `category`. Its table is
{"metric", "column", "categories": {category: {"mean", "n", "unscored"}}, "overall": {"mean", "n", "unscored"}}
where a category's mean is over its `n` scored images (`unscored`: skipped or failed ones, counted). The
overall follows the benchmark's own rule (`OVERALL_RULES`): the mean of the category means (T2I-CompBench;
GenEval averages tags), or, for SRUM's MLLM judge, the rule of SRUM's `CompBench_eval/qwen_eval.sh` (its
final awk step): the complex categories (complex, complex action, complex spatial) are first averaged into one
composite, which then counts as one category beside the base ones. Such a table also carries
`summary_rows` ({"complex composite", "mean of categories"}) and `overall_rule`, and the markdown shows them
under "overall".
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

from srum_jax import files, paths, viz

__all__ = ["COLUMNS", "metric_table", "judge_columns", "markdown", "side_by_side", "spread", "grid"]

# metric -> [(column title, row key, scale, digits, overall rule)]: what one table column shows
COLUMNS = {
    "compbench": [("T2I-CompBench (0-1)", "score", 1.0, 4)],
    "mllm": [("MLLM judge (0-100)", "score", 1.0, 1, "srum_compbench")],
    "geneval": [("GenEval (%)", "score", 100.0, 1)],
    "reasonbench": [("ReasonBench accuracy", "score", 1.0, 1), ("ReasonBench quality", "quality", 1.0, 1)],
}


# overall rule -> what the table's "overall" row is
OVERALL_RULES = {
    "mean": "mean of the category means",
    "srum_compbench": "SRUM's qwen_eval.sh: base categories and one complex composite, averaged",
}
COMPLEX_CATEGORIES = ("complex", "complex action", "complex spatial")  # SRUM's COMPLEX_PREFIXES


def _entry(means: Sequence[float], parts: Sequence[dict]) -> dict:
  """An overall entry: the mean of `means`, with the image counts of the category entries `parts`."""
  return {"mean": float(np.mean(means)) if means else None, "n": sum(t["n"] for t in parts),
          "unscored": sum(t["unscored"] for t in parts)}


def srum_overall(categories: Dict[str, dict]) -> Dict[str, dict]:
  """SRUM's CompBench overall from category entries: {"overall", "complex composite", "mean of categories"}.
  Names compare with "_" read as a space (the prompt file's complex_action is its script's complex action);
  categories without a scored image are left out, and without complex categories there is no composite."""
  scored = {k: t for k, t in categories.items() if t["mean"] is not None}
  is_complex = lambda name: name.replace("_", " ").lower() in COMPLEX_CATEGORIES  # noqa: E731
  cx = [t for k, t in scored.items() if is_complex(k)]
  base = [t for k, t in scored.items() if not is_complex(k)]
  composite = _entry([t["mean"] for t in cx], cx)
  means = [t["mean"] for t in base] + ([composite["mean"]] if cx else [])
  every = list(categories.values())
  return {"overall": _entry(means, every), "complex composite": composite,
          "mean of categories": _entry([t["mean"] for t in scored.values()], every)}


def metric_table(rows: Sequence[dict], metric: str, column: str, key: str = "score", scale: float = 1.0,
                 digits: int = 1, overall: str = "mean") -> dict:
  """The per-category table of one column (module docstring); categories in first-seen order; `overall`: a
  rule of `OVERALL_RULES`."""
  cats: Dict[str, List] = OrderedDict()
  for r in rows:
    c = cats.setdefault(str(r.get("category")), [[], 0])
    v = r.get(key)
    if v is None:
      c[1] += 1
    else:
      c[0].append(float(v) * scale)
  table = {name: {"mean": float(np.mean(v)) if v else None, "n": len(v), "unscored": f}
           for name, (v, f) in cats.items()}
  if overall == "srum_compbench":
    rows_ = srum_overall(table)
    return {"metric": metric, "column": column, "digits": digits, "categories": table,
            "overall": rows_.pop("overall"), "summary_rows": rows_,
            "overall_rule": OVERALL_RULES[overall]}
  if overall != "mean":
    raise ValueError(f"overall rule {overall!r}; choose one of {sorted(OVERALL_RULES)}")
  means = [t["mean"] for t in table.values() if t["mean"] is not None]
  return {"metric": metric, "column": column, "digits": digits, "categories": table,
          "overall": _entry(means, list(table.values()))}


def judge_columns(judge_table: Dict[str, dict], judge: str, column: Optional[str] = None,
                  counts: bool = False) -> dict:
  """A judge's accuracy table ({category: {correct, total, accuracy}}) in the metric-table form (%), titled
  `column` (default "<judge> judge accuracy (%)"); with `counts` the cells show correct/total."""
  def entry(v):
    e = {"mean": 100.0 * v["accuracy"], "n": v["total"], "unscored": 0}
    return dict(e, correct=v["correct"]) if counts else e
  cats = {k: entry(v) for k, v in judge_table.items() if k != "overall"}
  o = judge_table.get("overall")
  overall = entry(o) if o else {"mean": None, "n": 0, "unscored": 0}
  return {"metric": "judge", "column": column or f"{judge} judge accuracy (%)", "digits": 1, "categories": cats,
          "overall": overall}


def _cell(entry: Optional[dict], digits: int) -> str:
  """"mean (n=...)", or "mean (correct/n)" for a judge's accuracy; "-" where nothing was scored."""
  if entry is None or entry["mean"] is None:
    return "-" if entry is None or not entry["unscored"] else f"- ({entry['unscored']} unscored)"
  if "correct" in entry:
    return f"{entry['mean']:.{digits}f} ({entry['correct']}/{entry['n']})"
  unscored = f", {entry['unscored']} unscored" if entry["unscored"] else ""
  return f"{entry['mean']:.{digits}f} (n={entry['n']}{unscored})"


def markdown(tables: Sequence[dict], title: str = "") -> str:
  """One table: a row per category, then "overall" (each column's rule, named under the table when it is not
  the mean of the category means) and the columns' `summary_rows`, a column per table."""
  cats: List[str] = []
  extra: List[str] = []
  for t in tables:
    cats += [c for c in t["categories"] if c not in cats]
    extra += [r for r in t.get("summary_rows", {}) if r not in extra]
  lines = ([f"### {title}", ""] if title else []) + ["| category | " + " | ".join(t["column"] for t in tables) + " |",
                                                      "|---|" + "---|" * len(tables)]
  for c in cats + ["overall"]:
    cells = [_cell(t["overall"] if c == "overall" else t["categories"].get(c), t["digits"]) for t in tables]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  for r in extra:
    cells = [_cell(t.get("summary_rows", {}).get(r), t["digits"]) for t in tables]
    lines.append(f"| {r} | " + " | ".join(cells) + " |")
  rules: Dict[str, List[str]] = OrderedDict()
  for t in tables:
    if t.get("overall_rule"):
      rules.setdefault(t["overall_rule"], []).append(t["column"])
  notes = [f"overall ({', '.join(cols)}): {rule}" for rule, cols in rules.items()]
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def side_by_side(eval_root: str) -> str:
  """Markdown comparing every `<eval_root>/<model>/table.json`: per column, a row per category and a column
  per model (the official PyTorch model's images scored from a folder sit beside the port's)."""
  root = paths.path(eval_root)  # local or remote (gs://)
  models = {}
  for p in sorted(root.glob("*/table.json")):
    tables = json.loads(p.read_text())
    if all(isinstance(t, dict) and "column" in t for t in tables.values()):  # folders of this format only
      models[p.parent.name] = tables
  columns: List[str] = []
  for tables in models.values():
    columns += [c for c in tables if c not in columns]
  parts = []
  for col in columns:
    present = {m: t[col] for m, t in models.items() if col in t}
    renamed = [dict(t, column=m) for m, t in present.items()]
    parts.append(markdown(renamed, title=col))
  return "\n".join(parts)


def spread(rows: Sequence[dict], n: int) -> List[dict]:
  """The first image of `n` prompts, taken in turn from each category (pictures that show every category)."""
  by_category: Dict[str, Dict[str, dict]] = OrderedDict()
  for r in rows:
    by_category.setdefault(str(r.get("category")), OrderedDict()).setdefault(r.get("prompt_id", r["id"]), r)
  queues = [list(v.values()) for v in by_category.values()]
  return [q[k] for k in range(max((len(q) for q in queues), default=0)) for q in queues if k < len(q)][:n]


def grid(rows: Sequence[dict], verdicts: Dict[str, Dict[str, str]], n: int, title: str = ""):
  """A labeled grid of `spread(rows, n)`: the prompt above, one caption line per metric ("metric: value")
  under each image. `verdicts` = {metric: {image id: text}}."""
  chosen = spread(rows, n)
  cells, captions = [], []
  for r in chosen:
    im, _ = files.load_rgb(r["image_file"])
    cells.append(im if im is not None else np.zeros((32, 32, 3), np.uint8))
    captions.append("\n".join(f"{m}: {v[r['id']]}" for m, v in verdicts.items() if r["id"] in v))
  if not cells:
    return None
  return viz.labeled_grid([cells], [f"[{r['category']}] {r['prompt']}" for r in chosen], cell_captions=[captions],
                          title=title)
