"""The human review sheet: sampled test examples, the base and the adapted output side by side,
blind, with score columns a reviewer fills in; and the summary of the filled-in scores.

The two outputs of each example appear as "A" and "B" in a seeded random order, so the reviewer
cannot tell which model wrote which; ``review_key.json`` holds the order and
:func:`read_scores` un-blinds. The sheet comes as:

* ``review.html``: self-contained (no network, no script from elsewhere); a 1-5 menu per score; a
  button downloads the scores as ``review_scores.csv``;
* ``review.md``: the same table in markdown, score cells empty, to fill in any editor;
* ``review_scores.csv``: an empty score file to fill in a spreadsheet.

``jlora evaluate --read-scores FILE`` reads the CSV (downloaded or filled) or the filled markdown.
"""

from __future__ import annotations

import csv
import html
import io
import json
import pathlib
import re

import numpy as np

AXES = ("fluency", "relevance", "helpfulness")
SCALE = (1, 5)


def _columns() -> list[str]:
    return [f"{side}_{axis}" for side in ("A", "B") for axis in AXES]


def write_sheet(out_dir, rows: list[dict], *, title: str, seed: int = 0) -> dict:
    """Writes the sheet for ``rows`` (each ``{"id", "input", "reference", "base", "adapted"}``)
    into ``out_dir``; returns ``{kind: path}``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    key, shown = {}, []
    for r in rows:
        swap = bool(rng.integers(2))
        key[str(r["id"])] = {"A": "adapted" if swap else "base", "B": "base" if swap else "adapted"}
        shown.append({**r, "A": r["adapted"] if swap else r["base"], "B": r["base"] if swap else r["adapted"]})
    paths = {"html": out / "review.html", "markdown": out / "review.md", "csv": out / "review_scores.csv",
             "key": out / "review_key.json"}
    paths["key"].write_text(json.dumps({"seed": seed, "axes": AXES, "scale": SCALE, "order": key}, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *_columns(), "notes"])
        for r in shown:
            w.writerow([r["id"]] + [""] * (len(_columns()) + 1))
    paths["markdown"].write_text(_markdown(shown, title))
    paths["html"].write_text(_html(shown, title))
    return {k: str(v) for k, v in paths.items()}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _markdown(rows, title: str) -> str:
    lines = [f"# {title}", "", f"Score each output 1-{SCALE[1]} on {', '.join(AXES)} (5 best). The two outputs are "
             "shown in a random order per example (review_key.json un-blinds them; do not open it before scoring).",
             "", "| id | input | reference | output A | output B | " + " | ".join(_columns()) + " | notes |",
             "|" + "---|" * (6 + len(_columns()))]
    for r in rows:
        lines.append(f"| {r['id']} | {_cell(r['input'])} | {_cell(r['reference'])} | {_cell(r['A'])} | {_cell(r['B'])} | "
                     + " | ".join("" for _ in _columns()) + " |  |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:110em}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #bbb;padding:.4em;vertical-align:top}
th{background:#eee}pre{white-space:pre-wrap;margin:0;font-family:inherit}select{margin:.1em 0}
.out{width:26%}.in{width:18%}.ref{width:14%}"""

_SCRIPT = """function download(){
 const cols=%s;const rows=[['id'].concat(cols,['notes'])];
 document.querySelectorAll('tr[data-id]').forEach(tr=>{const r=[tr.dataset.id];
  cols.forEach(c=>r.push(tr.querySelector('select[name="'+c+'"]').value));
  r.push(tr.querySelector('textarea').value);rows.push(r);});
 const q=v=>'"'+String(v).replace(/"/g,'""')+'"';
 const blob=new Blob([rows.map(r=>r.map(q).join(',')).join('\\n')+'\\n'],{type:'text/csv'});
 const a=document.createElement('a');a.href=URL.createObjectURL(blob);a.download='review_scores.csv';a.click();}"""


def _html(rows, title: str) -> str:
    def menu(name):
        opts = "".join(f"<option>{v}</option>" for v in range(SCALE[0], SCALE[1] + 1))
        return f'<label>{name.split("_", 1)[1]} <select name="{name}"><option value=""></option>{opts}</select></label><br>'

    body = []
    for r in rows:
        scores = "".join(f"<td>{''.join(menu(f'{side}_{a}') for a in AXES)}</td>" for side in ("A", "B"))
        body.append(f'<tr data-id="{html.escape(str(r["id"]))}"><td>{html.escape(str(r["id"]))}</td>'
                    f'<td class="in"><pre>{html.escape(str(r["input"]))}</pre></td>'
                    f'<td class="ref"><pre>{html.escape(str(r["reference"]))}</pre></td>'
                    f'<td class="out"><pre>{html.escape(str(r["A"]))}</pre></td>'
                    f'<td class="out"><pre>{html.escape(str(r["B"]))}</pre></td>{scores}'
                    f'<td><textarea rows="3" cols="18"></textarea></td></tr>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script>{_SCRIPT % json.dumps(_columns())}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Score each output {SCALE[0]}-{SCALE[1]} (5 best) on {', '.join(AXES)}. "
            "Outputs A and B come from the base and the adapted model in a random order per example. When done, "
            "<button onclick='download()'>download the scores (review_scores.csv)</button> and run "
            "<code>jlora evaluate --read-scores review_scores.csv --run RUN</code>.</p>"
            "<table><tr><th>id</th><th>input</th><th>reference</th><th>output A</th><th>output B</th>"
            "<th>scores A</th><th>scores B</th><th>notes</th></tr>" + "".join(body) + "</table></body></html>\n")


def _rows_from_markdown(text: str) -> list[dict]:
    header, rows = None, []
    for line in text.splitlines():
        if not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1] if line.strip().endswith("|")
                                             else line.strip()[1:])]
        if header is None:
            header = [c.strip("| ") for c in cells]
            continue
        if set("".join(cells)) <= set("-:| "):
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def _score(value, where: str):
    value = str(value or "").strip()
    if not value:
        return None
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{where}: score {value!r} is not a number; expected {SCALE[0]}-{SCALE[1]} or empty") from None
    if not SCALE[0] <= v <= SCALE[1]:
        raise ValueError(f"{where}: score {v:g} is outside {SCALE[0]}-{SCALE[1]}")
    return v


def read_scores(path, key_path) -> dict:
    """Summary of a filled score file (CSV or the markdown sheet): per model and axis the mean,
    standard deviation and count of scores, and per axis how often the adapted output scored
    above / equal to / below the base one (examples where both are scored)."""
    path, key_path = pathlib.Path(path), pathlib.Path(key_path)
    if not path.is_file():
        raise ValueError(f"score file {path} does not exist")
    if not key_path.is_file():
        raise ValueError(f"{key_path} does not exist; it is written next to the review sheet and un-blinds A / B")
    order = json.loads(key_path.read_text())["order"]
    text = path.read_text()
    rows = _rows_from_markdown(text) if path.suffix == ".md" else list(csv.DictReader(io.StringIO(text)))
    scores = {m: {a: [] for a in AXES} for m in ("base", "adapted")}
    pairs = {a: [] for a in AXES}
    for i, row in enumerate(rows):
        rid = str(row.get("id", "")).strip()
        if rid not in order:
            raise ValueError(f"{path} row {i + 1}: id {rid!r} is not in the review sheet ({key_path})")
        for axis in AXES:
            got = {}
            for side in ("A", "B"):
                v = _score(row.get(f"{side}_{axis}"), f"{path} id {rid} {side}_{axis}")
                if v is not None:
                    got[order[rid][side]] = v
                    scores[order[rid][side]][axis].append(v)
            if len(got) == 2:
                pairs[axis].append(got["adapted"] - got["base"])
    summary = {"file": str(path), "examples": len(rows), "models": {}, "adapted_vs_base": {}}
    for model, per in scores.items():
        summary["models"][model] = {a: {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v)) if v else None,
                                        "scored": len(v)} for a, v in per.items()}
    for axis, diffs in pairs.items():
        d = np.asarray(diffs)
        summary["adapted_vs_base"][axis] = {"better": int((d > 0).sum()), "tie": int((d == 0).sum()),
                                            "worse": int((d < 0).sum()), "mean_difference": float(d.mean()) if d.size else None}
    if not any(v["scored"] for per in summary["models"].values() for v in per.values()):
        raise ValueError(f"{path} holds no scores yet; fill in the {', '.join(_columns())} columns")
    return summary


def scores_markdown(summary: dict) -> str:
    lines = ["| axis | base mean (n) | adapted mean (n) | adapted better / tie / worse |", "|---|---|---|---|"]
    for axis in AXES:
        b, a = summary["models"]["base"][axis], summary["models"]["adapted"][axis]
        v = summary["adapted_vs_base"][axis]
        fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.2f} ({s['scored']})"  # noqa: E731
        lines.append(f"| {axis} | {fmt(b)} | {fmt(a)} | {v['better']} / {v['tie']} / {v['worse']} |")
    return "\n".join(lines) + "\n"
