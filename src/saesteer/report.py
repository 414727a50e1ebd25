"""A report of evaluation results: tables with 95% CIs, a refusal/over-refusal trade-off plot, capability
bars, example generations side by side and a dashboard per discovered feature.

`build_report` reads result rows (JSONL from `evals.append_rows`), optionally a `discovery.json` and an
examples JSONL (`write_examples`), and writes `report.html` (self-contained: inline CSS, plots as
base64 PNGs, no scripts, no external requests) and `report.md` with the PNGs next to it.

The pieces are public so that `saesteer reproduce` writes its results.md and trade-off plot with the same
labels (`steering_label`), strength (`strength`), cells (`markdown_table`) and plot (`trade_off_plot`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import imread

from saesteer.config import RESULT_KEYS, Discovery, ReportConfig
from saesteer.errors import SaesteerError
from saesteer.specs import spec_from_dict

HEADLINE = (  # (header, suite, metric, dataset prefixes in order of preference; "" matches any dataset)
    ("unsafe refusal ↑", "safety", "refusal_rate", ("unsafe_all", "")),
    ("over-refusal ↓", "safety", "over_refusal_rate", ("safe_all", "")),
    ("clear refusals ↑", "safety", "clear_refusal_rate", ("unsafe_all",)),
    ("degenerate (unsafe) ↓", "safety", "degenerate_rate", ("unsafe_all",)),
    ("degenerate (safe) ↓", "safety", "degenerate_rate", ("safe_all",)),
    ("MMLU", "capability", "accuracy", ("mmlu",)),
    ("TruthfulQA MC1", "capability", "mc1", ("truthfulqa",)),
    ("TruthfulQA MC2", "capability", "mc2", ("truthfulqa",)),
    ("GSM8K", "capability", "exact_match", ("gsm8k",)),
    ("ASR hh-rlhf ↓", "jailbreak", "attack_success_rate", ("hh_rlhf",)),
    ("ASR Crescendo ↓", "jailbreak", "attack_success_rate", ("crescendo",)),
    ("KL to unsteered", "fidelity", "kl_to_unsteered", ("heldout_text",)),
    ("perplexity", "fidelity", "perplexity", ("heldout_text",)),
    ("degenerate replies", "fidelity", "degeneration_rate", ("xstest_safe", "")),
)
UNSAFE, SAFE, CLEAR, DEGENERATE_UNSAFE = (HEADLINE[i][1:] for i in range(4))
CAPABILITY = tuple(col for col in HEADLINE if col[1] == "capability" and col[2] != "mc2")
STATS = (
    "source",
    "attribution",
    "effect_size",
    "auroc",
    "mean_refusal",
    "mean_compliance",
    "refusal_freq",
    "corpus_freq",
    "corpus_max",
)
EXAMPLE_KEYS = ("prompt", "steering", "reply")
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CSS = """
body{font-family:"DejaVu Sans",system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{margin:1.2em 0 .3em}p.note,.caption{color:#555;font-size:.85em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.82em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3;text-align:left}.l{text-align:left}.ci{display:block;color:#777;font-size:.85em;white-space:nowrap}
code{font-size:.9em;overflow-wrap:anywhere}img{max-width:100%;height:auto}
.ctx{font-family:"DejaVu Sans Mono",monospace;font-size:.8em;white-space:pre-wrap;overflow-wrap:anywhere;
margin:.25em 0;padding:.3em .5em;background:#fafafa;border:1px solid #eee}
.ctx .v{color:#888;margin-right:.8em}.peak{outline:1px solid #b45309}
.lens code{background:#eef2ff;padding:0 .3em;margin:0 .2em .2em 0;border-radius:3px;display:inline-block;white-space:pre}
.dash{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}.dash>div{flex:1 1 420px}
table.examples{table-layout:fixed;width:100%}table.examples td{text-align:left;white-space:pre-wrap;overflow-wrap:anywhere}
.tag{font-size:.75em;background:#eee;border-radius:3px;padding:0 .3em;margin-left:.3em}
details{margin:.3em 0 1em}.wide{overflow-x:auto}summary{cursor:pointer;color:#345}
"""


def strength_field(spec: dict) -> str | None:
    """The (dotted) field of a spec that a sweep varies, its strength (`specs.Spec.strength_path`): SAE clamp
    `values`, ActAdd `alpha`; None for methods without one. Conditional steering's strength is its inner
    steering's (`steering.values`, `steering.alpha`): the gate threshold is a property of the detector, chosen
    once (`saesteer gate`) rather than swept, so it is part of the curve's identity and shown in its label
    (`steering_label`), not as a strength."""
    return spec_from_dict(spec).strength_path()


def strength(spec: dict) -> tuple[float, str] | None:
    """(number to sort and plot by, text) of a spec's strength (`strength_field`): clamp values, ActAdd alpha,
    and for conditional steering the clamp value or alpha of the steering it gates."""
    value = _get(spec, strength_field(spec) or "")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return float(values[0]), "/".join(f"{v:g}" for v in values)


def _get(spec: dict, dotted: str):
    """The value of a (nested, dot-separated) key, or None."""
    for key in dotted.split("."):
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec


def _without_strength(spec: dict) -> dict:
    """The spec without its strength field: what stays fixed along a curve."""
    return _without(spec, strength_field(spec))


def _without(spec: dict, dotted: str | None) -> dict:
    """The (nested) dict without its dot-separated key."""
    if not dotted:
        return spec
    key, _, rest = dotted.partition(".")
    if rest:
        return {**spec, key: _without(spec[key], rest)}
    return {k: v for k, v in spec.items() if k != key}


@dataclass
class Point:
    """One steering config's result rows, keyed by (suite, dataset, metric)."""

    spec: dict
    config: dict
    rows: dict[tuple[str, str, str], dict] = field(default_factory=dict)

    @property
    def strength(self) -> tuple[float, str] | None:
        return strength(self.spec)

    @property
    def strength_text(self) -> str | None:
        """The strength as shown in tables and on the plot, e.g. '8' or '8/4' (two clamped features)."""
        return self.strength[1] if self.strength else None

    def cells(self, columns) -> list[dict | None]:
        """The result row of each column (HEADLINE's format), None where this config has none."""
        return [self.headline(*col[1:]) for col in columns]

    def headline(self, suite: str, metric: str, prefixes: tuple[str, ...]) -> dict | None:
        for prefix in prefixes:
            for (s, dataset, m), row in self.rows.items():
                if s == suite and m == metric and dataset.startswith(prefix):
                    return row
        return None


@dataclass
class Curve:
    """The points of one method (everything in the steering spec but its strength is fixed), by strength."""

    label: str
    spec: dict
    points: list[Point]

    @property
    def swept(self) -> str | None:
        """The field the curve varies (`strength_field` of its points' specs)."""
        return strength_field(self.points[0].spec)


# ------------------------------------------------------------------------------------------------ inputs


def _read_jsonl(path: Path, required: tuple[str, ...], what: str) -> list[dict]:
    """Rows of a JSONL file; blank lines are skipped, anything malformed is an error naming the line."""
    if not Path(path).is_file():
        raise SaesteerError(f"no such {what} file: {path}")
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SaesteerError(f"cannot read {what} file {path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SaesteerError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        missing = [k for k in required if not _has(row, k)] if isinstance(row, dict) else ["a JSON object"]
        if missing:
            raise SaesteerError(f"{path}:{number}: not a {what} row (missing {', '.join(missing)})")
        steering = (
            row.get("config", {}).get("steering") if "config.steering" in required else row.get("steering")
        )
        try:
            spec_from_dict(steering)
        except SaesteerError as err:
            raise SaesteerError(f"{path}:{number}: {err}") from None
        rows.append(row)
    return rows


def _has(row: dict, dotted: str) -> bool:
    """Whether a (nested, dot-separated) key is present."""
    for key in dotted.split("."):
        if not isinstance(row, dict) or key not in row:
            return False
        row = row[key]
    return True


def write_examples(path: Path, rows: list[dict]) -> Path:
    """Write example generations as JSONL, one row per (prompt, steering):
    {"prompt", "label" ("unsafe"/"safe"/""), "method" (display name; default from the steering), "steering", "reply"}."""
    lines = []
    for row in rows:
        missing = [k for k in EXAMPLE_KEYS if k not in row]
        if missing:
            raise SaesteerError(f"example row needs {', '.join(EXAMPLE_KEYS)}; missing {', '.join(missing)}")
        full = {
            "prompt": row["prompt"],
            "label": row.get("label", ""),
            "method": row.get("method") or config_label(row["steering"]),
            "steering": row["steering"],
            "reply": row["reply"],
        }
        lines.append(json.dumps(full, ensure_ascii=False) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def steering_label(spec: dict) -> str:
    """A short display name of a steering spec without its strength, e.g. 'SAE clamp f2230' (`specs.Spec.label`)."""
    return spec_from_dict(spec).label()


def config_label(spec: dict) -> str:
    """The display name with the strength, e.g. 'SAE clamp f2230 @ 8', 'conditional SAE clamp f2230 (threshold 0.5) @ 8'."""
    return steering_label(spec) + (f" @ {strength(spec)[1]}" if strength(spec) else "")


def curves(rows: list[dict], name: Callable[[dict], str] | None = None) -> list[Curve]:
    """Group result rows into points (one per steering config) and points into curves (one per method and
    everything else in its spec but the strength; a conditional steering's threshold is fixed along a curve);
    unsteered first. Labels say split, seed, model or judge where those differ between rows; `name` (of a
    steering spec), when given, goes before each label, e.g. 'control_clamp: SAE clamp f308'."""
    points: dict[str, Point] = {}
    for row in rows:
        c = row["config"]
        key = json.dumps(
            {k: c.get(k) for k in ("model", "steering", "split", "seed", "judge")}, sort_keys=True
        )
        point = points.setdefault(key, Point(c["steering"], c))
        point.rows[(c["suite"], c["dataset"], row["metric"])] = (
            row  # a rerun of the same config replaces the row
        )
    varying = [
        k
        for k in ("split", "seed", "model", "judge")
        if len({json.dumps(p.config.get(k)) for p in points.values()}) > 1
    ]
    grouped: dict[str, Curve] = {}
    for point in points.values():
        fixed = _without_strength(point.spec)
        key = json.dumps([fixed, [point.config.get(k) for k in varying]], sort_keys=True)
        label = steering_label(point.spec) + "".join(f" [{k} {point.config.get(k)}]" for k in varying)
        grouped.setdefault(
            key, Curve(f"{name(point.spec)}: {label}" if name else label, fixed, [])
        ).points.append(point)
    found = sorted(grouped.values(), key=lambda cv: cv.spec.get("method", "none") != "none")
    labels = [c.label for c in found]
    for i, curve in enumerate(found):
        if (
            labels.count(curve.label) > 1
        ):  # e.g. the same feature of two SAEs: the table captions show the full specs
            curve.label += f" #{labels[:i].count(curve.label) + 1}"
        curve.points.sort(key=lambda p: p.strength[0] if p.strength else 0.0)
    return found


# ---------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _errors(rows: list[dict]) -> np.ndarray:
    return np.array(
        [[r["value"] - r["ci_low"] for r in rows], [r["ci_high"] - r["value"] for r in rows]]
    ).clip(min=0)


def trade_off_plot(found: list[Curve], marked: list[Curve] = (), marked_as: str = "test") -> Figure | None:
    """Unsafe refusal (y) vs safe over-refusal (x) per method across strengths (`strength`), with 95% CI bars,
    each point labelled with its strength. `marked`: further points drawn as large diamonds in the colour of
    the curve with the same spec (one legend entry, `marked_as`): e.g. the configs chosen on a validation
    sweep (`found`), evaluated on test."""
    fig, ax = _figure(9.5, 5.4)
    colours = iter(f"C{i}" for i in range(100))
    by_spec: dict[str, str] = {}  # colour of the first curve of each spec, for the marked points
    drawn, top = (
        [],
        [0.0, 0.0],
    )  # whether each drawn curve was marked; largest CI bound on x and y, to zoom in on small rates
    for curve, is_marked in [*((c, False) for c in found), *((c, True) for c in marked)]:
        kept = [(p, p.headline(*UNSAFE), p.headline(*SAFE)) for p in curve.points]
        kept = [k for k in kept if k[1] and k[2]]
        if not kept:
            continue
        drawn.append(is_marked)
        points, unsafe, safe = zip(*kept)
        x, y = [r["value"] for r in safe], [r["value"] for r in unsafe]
        top = [max(top[0], *(r["ci_high"] for r in safe)), max(top[1], *(r["ci_high"] for r in unsafe))]
        unsteered, spec = curve.spec.get("method", "none") == "none", json.dumps(curve.spec, sort_keys=True)
        if is_marked:
            colour = by_spec.get(spec) or ("black" if unsteered else next(colours))
            style = {
                "fmt": "D",
                "ms": 8,
                "mec": "black",
                "mew": 0.8,
                "label": f"_{curve.label} ({marked_as})",
            }  # _: no legend entry
        else:
            colour = "black" if unsteered else next(colours)
            by_spec.setdefault(spec, colour)
            style = {
                "fmt": "*" if unsteered else ("o-" if len(kept) > 1 else "s"),
                "ms": 13 if unsteered else 5,
                "label": curve.label,
            }
        bars = ax.errorbar(
            x,
            y,
            xerr=_errors(safe),
            yerr=_errors(unsafe),
            color=colour,
            capsize=2,
            lw=1.2,
            elinewidth=0.7,
            **style,
        )
        for lines in bars[2]:
            lines.set_alpha(0.45)  # CI bars lighter than the curve
        for p, xi, yi in zip(points, x, y):
            if p.strength:
                ax.annotate(
                    p.strength[1],
                    (xi, yi),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=7,
                    color="#444",
                )
    if not drawn:
        return None
    if any(drawn):
        ax.errorbar(
            [], [], fmt="D", ms=8, color="white", mec="black", mew=0.8, label=marked_as
        )  # after the curves
    x_max, y_max = (min(1.0, 1.15 * t + 0.02) for t in top)
    ax.set(
        xlim=(-0.03 * x_max, x_max * 1.03),
        ylim=(-0.03 * y_max, y_max * 1.03),
        xlabel="over-refusal rate on safe prompts (lower is better)",
        ylabel="refusal rate on unsafe prompts (higher is better)",
        title="Refusal trade-off (95% CIs; labels: strength)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def capability_plot(found: list[Curve]) -> Figure | None:
    """Grouped bars of the capability metrics per steering config, with 95% CI bars."""
    bars = [
        (c.label + (f" @ {p.strength[1]}" if p.strength else ""), p)
        for c in found
        for p in c.points
        if any(p.headline(*col[1:]) for col in CAPABILITY)
    ]
    metrics = present_columns(CAPABILITY, [p for _, p in bars])
    if not bars:
        return None
    fig, ax = _figure(8.0, 3.8)
    width = 0.8 / len(bars)
    for i, (label, point) in enumerate(bars):
        rows = [point.headline(*col[1:]) for col in metrics]
        xs = [j + (i - (len(bars) - 1) / 2) * width for j, r in enumerate(rows) if r]
        present = [r for r in rows if r]
        ax.bar(
            xs,
            [r["value"] for r in present],
            width * 0.92,
            yerr=_errors(present),
            capsize=2,
            color="#555" if point.spec.get("method", "none") == "none" else f"C{i}",
            label=label,
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(range(len(metrics)), [col[0] for col in metrics])
    ax.set(ylim=(0, 1), ylabel="score (95% CI)", title="Capability")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def histogram_plot(feature: int, histogram: dict) -> Figure | None:
    """Bars of a feature's nonzero corpus activations (log counts)."""
    edges, counts = (
        np.asarray(histogram.get("bins", []), float),
        np.asarray(histogram.get("counts", []), float),
    )
    if counts.size == 0:
        return None
    fig, ax = _figure(4.6, 2.6)
    ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color="#d97706", edgecolor="white", lw=0.5)
    ax.set_yscale("log")
    share = int(counts.sum()) / max(1, histogram.get("tokens", 0))
    ax.set(
        xlabel="activation",
        ylabel="tokens",
        title=f"feature {feature}: nonzero on {share:.2%} of corpus tokens",
    )
    ax.title.set_fontsize(9)
    return fig


# --------------------------------------------------------------------------------------------- output


class _Doc:
    """The HTML and Markdown documents, built side by side; figures are embedded in one, saved for the other."""

    def __init__(self, out: Path):
        self.out, self.html, self.md = out, [], []

    def add(self, html_part: str, md_part: str) -> None:
        self.html.append(html_part)
        self.md.append(md_part)

    def heading(self, level: int, text: str, anchor: str = "") -> None:
        attr = f' id="{anchor}"' if anchor else ""
        self.add(f"<h{level}{attr}>{html.escape(text)}</h{level}>", f"\n{'#' * level} {_md(text)}\n")

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{html.escape(text)}</p>', f"\n_{_md(text)}_\n")

    def figure(self, fig: Figure | None, name: str, alt: str) -> str:
        """The figure as an <img> (also saved as name.png for the Markdown); '' when there is no figure."""
        if fig is None:
            return ""
        data = png(fig)
        (self.out / f"{name}.png").write_bytes(data)
        self.md.append(f"\n![{alt}]({name}.png)\n")
        return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}">'

    def table(self, headers: list[str], rows: list[list], css: str = "") -> None:
        """Cells are result rows (value, CI and n), numbers, None (missing) or text."""

        def cell_html(c) -> str:
            if isinstance(c, dict):
                return (
                    f'<td>{_num(c["value"])}<span class="ci">[{_num(c["ci_low"])}, {_num(c["ci_high"])}]</span>'
                    f'<span class="ci">n={c["n"]}</span></td>'
                )
            if c is None or isinstance(c, (int, float)):
                return f"<td>{'–' if c is None else f'{c:g}'}</td>"
            return f'<td class="l">{html.escape(c)}</td>'

        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(cell_html(c) for c in row) + "</tr>" for row in rows)
        self.html.append(f'<div class="wide"><table class="{css}"><tr>{head}</tr>{body}</table></div>')
        self.md.append("\n" + markdown_table(headers, rows) + "\n")


def png(fig: Figure) -> bytes:
    """A figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def markdown_cell(c) -> str:
    """A table cell in Markdown: a result row as 'value [CI low, CI high] n=N', a number, '–' for None, or text."""
    if isinstance(c, dict):
        return f"{_num(c['value'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}] n={c['n']}"
    return "–" if c is None else f"{c:g}" if isinstance(c, (int, float)) else _md(c)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (no surrounding blank lines) of `markdown_cell`s; headers are written as they are."""
    md_rows = [
        headers,
        ["---"] * len(headers),
        *[[markdown_cell(c).replace("\n", " ") for c in row] for row in rows],
    ]
    return "\n".join("| " + " | ".join(r) + " |" for r in md_rows)


def present_columns(columns, points: list[Point]) -> list:
    """The columns (HEADLINE's format) for which at least one of `points` has a result."""
    return [col for col in columns if any(p.headline(*col[1:]) for p in points)]


def _num(value) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def _md(text: str) -> str:
    """Text safe inside Markdown: HTML and Markdown syntax characters escaped."""
    text = html.escape(text, quote=False)
    return "".join("\\" + ch if ch in "\\`*_[]#|" else ch for ch in text)


def _md_bold(token: str) -> str:
    """A token in bold, its surrounding whitespace outside the markers (else Markdown shows the asterisks)."""
    core = token.strip()
    return token.replace(core, f"**{_md(core)}**", 1) if core else token


def _config_caption(curve: Curve) -> str:
    c = curve.points[0].config
    decodings = {
        row["config"].get("decoding", {}).get("max_new_tokens")
        for p in curve.points
        for row in p.rows.values()
    } - {None}
    parts = [
        f"model {c.get('model')}",
        f"split {c.get('split')}",
        f"seed {c.get('seed')}",
        f"judge {c.get('judge', '-')}",
    ]
    if decodings:
        parts.append("max_new_tokens " + "/".join(map(str, sorted(decodings))))
    swept = curve.swept
    return (
        " · ".join(parts)
        + f" · steering {json.dumps(curve.spec)}"
        + (f" with {swept} per row" if swept else "")
    )


def _lead(point: Point, swept: str | None) -> list:
    """The strength cell of a table row, if the method has a strength."""
    return [point.strength_text] if swept else []


def _results_section(doc: _Doc, found: list[Curve]) -> None:
    doc.heading(2, "Results", "results")
    doc.note(
        "Point estimates with seeded percentile-bootstrap 95% CIs and the number of items n; "
        "unsafe refusal and over-refusal pool every unsafe / safe set that was run."
    )
    for fig, name in ((trade_off_plot(found), "trade_off"), (capability_plot(found), "capability")):
        if img := doc.figure(fig, name, name.replace("_", "-")):
            doc.html.append(f"<p>{img}</p>")
    for curve in found:
        columns, swept = present_columns(HEADLINE, curve.points), curve.swept
        doc.heading(3, curve.label)
        doc.add(
            f'<p class="caption">{html.escape(_config_caption(curve))}</p>',
            f"\n{_md(_config_caption(curve))}\n",
        )
        doc.table(
            ([swept] if swept else []) + [col[0] for col in columns],
            [_lead(p, swept) + p.cells(columns) for p in curve.points],
        )
        doc.add("<details><summary>all rows</summary>", "\nAll rows:\n")
        doc.table(
            ([swept] if swept else [])
            + ["suite", "dataset", "metric", "value [95% CI] n", "split", "seed", "limit", "wall s"],
            [
                _lead(p, swept)
                + [
                    *key,
                    r,
                    r["config"]["split"],
                    r["config"]["seed"],
                    r["config"].get("limit"),
                    r.get("wall_time_s"),
                ]
                for p in curve.points
                for key, r in p.rows.items()
            ],
        )
        doc.add("</details>", "")


def _examples_section(doc: _Doc, examples: list[dict]) -> None:
    doc.heading(2, "Example generations", "examples")
    methods = sorted(dict.fromkeys(e["method"] for e in examples), key=lambda m: m != "unsteered")
    prompts: dict[str, dict[str, dict]] = {}
    for e in examples:
        prompts.setdefault(e["prompt"], {})[e["method"]] = e
    rows = []
    for prompt, by_method in prompts.items():
        label = next(iter(by_method.values())).get("label", "")
        replies = [by_method[m]["reply"].strip() if m in by_method else None for m in methods]
        rows.append([prompt + (f"  ({label})" if label else "")] + replies)
    doc.table(["prompt"] + methods, rows, css="examples")


def _context_html(ctx: dict, scale: float) -> str:
    """One context, each token shaded by its activation (relative to `scale`), the peak outlined."""
    spans = []
    for i, (token, act) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = 0.85 * min(1.0, max(0.0, act) / scale)
        style = f' style="background:rgba(245,130,0,{alpha:.2f})"' if alpha > 0 else ""
        css = ' class="peak"' if i == ctx["peak"] else ""
        spans.append(f'<span{css}{style} title="{act:g}">{html.escape(token.replace(chr(10), "↵"))}</span>')
    return f'<div class="ctx"><span class="v">{ctx["value"]:g}</span>{"".join(spans)}</div>'


def _context_md(ctx: dict) -> str:
    text = "".join(_md_bold(t) if i == ctx["peak"] else _md(t) for i, t in enumerate(ctx["tokens"]))
    return f"- ({ctx['value']:g}) {text.replace(chr(10), ' ')}\n"


def _dashboard(doc: _Doc, feature: dict, title: str) -> None:
    """Histogram, statistics, logit lens, top contexts and causal-screen replies of one feature."""
    f = feature["feature"]
    doc.heading(3, title, f"feature-{f}")
    doc.html.append('<div class="dash"><div>')
    if "histogram" not in feature:
        doc.note("No activation histogram: this discovery file predates them (rerun saesteer discover).")
    elif img := doc.figure(
        histogram_plot(f, feature["histogram"]),
        f"feature_{f}_histogram",
        f"activation histogram of feature {f}",
    ):
        doc.html.append(img)
    else:
        doc.note("The feature never fired on the corpus sample.")
    doc.html.append("</div><div>")
    doc.table(["statistic", "value"], [[k.replace("_", " "), feature[k]] for k in STATS if k in feature])
    lens = feature.get("logit_lens", [])
    doc.add(
        '<p class="lens">Logit lens (tokens the decoder direction promotes): '
        + "".join(f"<code>{html.escape(t)}</code>" for t in lens)
        + "</p>",
        "\nLogit lens: " + " ".join(f"`{t.strip() or repr(t)}`".replace("|", "\\|") for t in lens) + "\n",
    )
    doc.html.append("</div></div>")
    if feature.get("contexts"):
        scale = max(max(c["acts"]) for c in feature["contexts"]) or 1.0
        doc.add(
            "<p>Top-activating corpus contexts (shading ∝ activation, peak outlined, value first):</p>"
            + "".join(_context_html(c, scale) for c in feature["contexts"]),
            "\nTop-activating corpus contexts (peak token in bold):\n\n"
            + "".join(map(_context_md, feature["contexts"])),
        )
    for s in feature.get("screen", []):
        summary = (
            f"Clamped to {s['value']:g}: harmful refusal {s['harmful_refusal']:.0%}, harmless refusal {s['harmless_refusal']:.0%} "
            f"(score {s['score']:+.2f}). Replies to harmful prompts:"
        )
        doc.add(
            f"<p>{html.escape(summary)}</p>"
            + "".join(f'<div class="ctx">{html.escape(e.strip())}</div>' for e in s["examples"]),
            f"\n{_md(summary)}\n\n" + "".join(f"> {_md(e.strip()[:300])}\n>\n" for e in s["examples"]),
        )


def _features_section(doc: _Doc, discovery: Discovery) -> None:
    doc.heading(2, "Feature dashboards", "features")
    base = discovery.baseline
    doc.note(
        f"SAE {discovery.sae} on {discovery.model}, layer {discovery.layer}. Unsteered refusal on the "
        f"screen prompts: harmful {base.get('harmful_refusal', float('nan')):.0%}, "
        f"harmless {base.get('harmless_refusal', float('nan')):.0%}."
    )
    for rank, candidate in enumerate(discovery.candidates, 1):
        _dashboard(doc, candidate, f"Feature {candidate['feature']} (refusal candidate #{rank})")
    if control := discovery.control:
        _dashboard(doc, control, f"Feature {control['feature']} (control: {control.get('topic', 'topic')})")


def build_report(
    results: list[Path],
    out: Path,
    discovery: Path | None = None,
    examples: Path | None = None,
    title: str = "saesteer report",
) -> tuple[Path, Path]:
    """Write out/report.html (self-contained) and out/report.md (+ PNGs); sections without input are left out."""
    rows = [row for path in results for row in _read_jsonl(path, RESULT_KEYS, "results")]
    found_discovery = Discovery.read(discovery) if discovery else None
    found_examples = _read_jsonl(examples, EXAMPLE_KEYS, "examples") if examples else []
    for e in found_examples:
        e["method"] = e.get("method") or config_label(e["steering"])
    if not rows and not found_discovery:
        raise SaesteerError("nothing to report: no result rows and no discovery file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = _Doc(out)
    doc.heading(1, title)
    sources = [str(p) for p in [*results, discovery, examples] if p]
    doc.note("Inputs: " + ", ".join(sources))
    if rows:
        _results_section(doc, curves(rows))
    if found_examples:
        _examples_section(doc, found_examples)
    if found_discovery:
        _features_section(doc, found_discovery)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(doc.html) + "\n</body></html>\n",
        encoding="utf-8",
    )
    md_path.write_text("".join(doc.md).lstrip() + "\n", encoding="utf-8")
    return html_path, md_path


# ------------------------------------------------------------------------------------- browser check


def report(config: ReportConfig) -> tuple[Path, Path, Path | None]:
    """The `saesteer report` stage: (report.html, report.md, report.png if `config.screenshot`)."""
    out = Path(config.out)
    html_path, md_path = build_report(
        [Path(p) for p in config.results],
        out,
        Path(config.discovery) if config.discovery else None,
        Path(config.examples) if config.examples else None,
        config.title,
    )
    return html_path, md_path, screenshot(html_path, out / "report.png") if config.screenshot else None


def screenshot(
    html_path: Path, png_path: Path, width: int = 1280, height: int = 2400, timeout: float = 120
) -> Path:
    """Render a page in headless Chromium to a PNG and check that something was drawn."""
    binary = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    if binary is None:
        raise SaesteerError(
            f"no Chromium on PATH (looked for {', '.join(CHROMIUM)}; Debian: apt-get install chromium)"
        )
    png_path = Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--screenshot={png_path}",
                f"--window-size={width},{height}",
                Path(html_path).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if not png_path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SaesteerError(f"Chromium wrote no screenshot (exit {done.returncode}): {last}")
    check_not_blank(png_path, width, height)
    return png_path


def check_not_blank(png_path: Path, width: int, height: int) -> None:
    """Error unless the PNG has the expected size, many colours and a fair share of non-background pixels."""
    pixels = imread(png_path)[..., :3]
    if pixels.shape[:2] != (height, width):
        raise SaesteerError(
            f"{png_path}: screenshot is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}"
        )
    flat = pixels.reshape(-1, 3)
    colours = len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0))
    drawn = float((np.abs(flat - flat[0]).sum(1) > 0.05).mean())
    if colours < 16 or drawn < 0.01:
        raise SaesteerError(
            f"{png_path}: screenshot looks blank ({colours} colours, {drawn:.1%} non-background pixels)"
        )
