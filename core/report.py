"""Stage reports: a short markdown summary and a PNG of the DPO curves from the saved metrics."""
from __future__ import annotations

from pathlib import Path


def fmt_rate(r: dict) -> str:
    if r["rate"] is None:
        return "n/a (0 items)"
    low, high = r["ci95"]
    return f"{r['rate']:.1%} [{low:.1%}, {high:.1%}] ({r['k']}/{r['n']})"


def plot_dpo(per_step: list[dict], path: Path) -> bool:
    """Loss, reward accuracy and reward margin per step; False when there is nothing to plot."""
    if not per_step:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"),
            ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, keys):
        points = [(e["step"], e[key]) for e in per_step if key in e]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def stage_report(number: int, name: str, metrics: dict, examples: list[dict]) -> str:
    """Markdown for DIR/stage_N/report.md."""
    dpo, merge = metrics["dpo"], metrics["merge"]
    lines = [f"# Stage {number}: {name}", ""]
    if metrics.get("input_model"):
        sha = metrics["input_model"]["weights_sha256"]
        lines += [f"Input model: `{metrics['input_model']['path']}` ("
                  + (f"weights sha256 {sha[:16]}...)" if sha else "a Hub id: no local weights hash)"), ""]
    lines += assessment_section(metrics["assessment"]) + data_section(metrics)
    lines += [
        "", "## DPO", "",
        f"- steps: {dpo['steps']}, train loss {dpo['train_loss']}",
        f"- first step: {dpo['first']}", f"- last step: {dpo['last']}",
        *[f"- **training warning**: {w}" for w in dpo.get("health", {}).get("warnings", [])],
        "", "![DPO curves](dpo_curves.png)", "",
        "## Merge", "",
        f"- parity: max |Δ log p| = {merge['max_abs_logprob_diff']:.3g} over {merge['probes']} "
        f"probes (tolerance {merge['tolerance']}), mean KL {merge['mean_kl']:.3g}", "",
    ]
    lines += baseline_section(metrics.get("baseline")) + contamination_section(metrics.get("contamination"))
    lines += ["## Example pairs", ""]
    for pair in examples:
        lines += [f"**Prompt**\n\n```\n{pair['prompt']}\n```",
                  f"**Chosen**\n\n```\n{pair['chosen']}\n```",
                  f"**Rejected**\n\n```\n{pair['rejected']}\n```", ""]
    return "\n".join(lines) + "\n"


def assessment_section(a: dict) -> list[str]:
    """The held-out table (input vs merged model, 95% Wilson intervals) and the paired McNemar
    test on the headline metric."""
    before, after = a["before"]["summary"], a["after"]["summary"]
    test = a["paired"]["mcnemar"]
    lines = ["## Assessment (held-out, zero-shot, greedy; 95% Wilson intervals)", "",
             "| metric | input model | merged model |", "|---|---|---|"]
    for key in before:
        lines.append(f"| {key.replace('_', '-')} | {fmt_rate(before[key])} | {fmt_rate(after[key])} |")
    lines += ["", f"Paired exact McNemar on {a['headline'].replace('_', '-')} outcomes "
              f"({a['paired']['items']} items): {test['gained']} gained, {test['lost']} lost, "
              f"p = {test['p_value']:.3g}."]
    if clean := a["paired"].get("non_degenerate"):
        lines.append(f"On non-degenerate outcomes ({clean['items']} items): {clean['gained']} "
                     f"gained, {clean['lost']} lost, p = {clean['p_value']:.3g}.")
    for name, check in a["paired"].get("checks", {}).items():
        lines.append(f"- {name.replace('_', '-')}: {check['gained']} gained, {check['lost']} "
                     f"lost, p = {check['p_value']:.3g}")
    return lines + [""]


def data_section(metrics: dict) -> list[str]:
    """The pair funnel and the stage's data counts."""
    lines = ["## Data", ""]
    if funnel := metrics.get("funnel"):
        reasons = "; ".join(f"{r}: {n}" for r, n in funnel["no_pair_reasons"].items()) or "none"
        lines += [f"- funnel: {funnel['tasks']} tasks -> {funnel['pairs_chosen']} pairs chosen "
                  f"-> {funnel['pairs_kept']} kept after decontamination "
                  f"({funnel['removed_by_decontamination']} removed)",
                  *(["- pairs by rule: " + ", ".join(f"{k} {v}" for k, v in
                                                      funnel["pairs_by_rule"].items())]
                    if funnel.get("pairs_by_rule") else []),
                  f"- no pair, by reason (top {len(funnel['no_pair_reasons'])}): {reasons}"]
    for key, value in metrics["data"].items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {fmt_rate(v) if isinstance(v, dict) else v}"
                              for k, v in value.items())
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    return lines


def baseline_section(table: dict | None) -> list[str]:
    if not table:
        return []
    lines = ["## Baseline suite (zero-shot probes; few-shot reference = input model in context)",
             "", "| capability | metric | input model | merged model | few-shot reference | McNemar p |",
             "|---|---|---|---|---|---|"]
    for cap, row in table.items():
        p = row["paired"]["p_value"] if row["paired"] else None
        lines.append(f"| {cap} | {row['metric']} | {fmt_rate(row['before'])} | "
                     f"{fmt_rate(row['after'])} | {fmt_rate(row['fewshot_reference'])} | "
                     f"{'n/a' if p is None else f'{p:.3g}'} |")
    return lines + [""]


def replay_lines(replay: dict | None) -> list[str]:
    """The rehearsal line: earlier stages' pairs replayed in training (none: no line)."""
    if not replay or not replay["candidates"]:
        return []
    by_stage = ", ".join(f"stage {k}: {n}" for k, n in replay["by_stage"].items())
    return [f"- replayed from earlier stages (profile.replay_share): {replay['candidates']} "
            f"candidates, {replay['kept']} trained on ({by_stage}); counted in the line above"]


def contamination_section(summary: dict | None) -> list[str]:
    if not summary:
        return []
    probe = summary.get("template_probe", {})
    sets = ", ".join(f"{name} ({count})" for name, count in summary["eval_sets"].items())
    return [
        "## Contamination", "",
        f"- candidate pairs: {summary['records']}, removed: {summary['removed']} "
        f"(13-gram data overlap: {summary['findings']['data']}, exemplar copies: "
        f"{summary['findings']['exemplar']}, chat markup: {summary['findings']['template']}); "
        f"details in contamination.tsv",
        *replay_lines(summary.get("replay")),
        f"- evaluation sets indexed ({summary['n']}-grams): {sets}",
        f"- EOS consistent across tokenizer and generation config: "
        f"{summary['template']['eos']['consistent']}",
        f"- chat template present: {summary['template']['has_chat_template']}; "
        f"probe: {probe.get('finding', 'not run')}",
        f"- template problems overridden: {summary['overridden']}", "",
    ]


RETENTION_FILE = "retention.json"  # written by `check retention` (app/retention.py)


def stage_files(run_dir: Path, name: str) -> dict[int, Path]:
    """{stage number: run_dir/stage_N/name} for every stage that has the file, in stage order."""
    found = {int(p.parent.name.removeprefix("stage_")): p
             for p in run_dir.glob(f"stage_*/{name}")}
    return dict(sorted(found.items()))


def write_run_report(run_dir: Path) -> None:
    """DIR/report.md: links to each stage report, the capability table across stages (with
    every retention result that still matches the run's models) and its plot."""
    from core.io import atomic_write_text, read_json

    metrics = {n: read_json(p) for n, p in stage_files(run_dir, "metrics.json").items()}
    skipped = {n: read_json(p) for n, p in stage_files(run_dir, "SKIPPED").items()}
    if not metrics:
        return
    columns = ["base"] + [f"after stage {n}" for n in metrics] + ["few-shot reference (base)"]
    retained, stale, drop_points = current_retention(run_dir)
    rows = capability_rows(metrics, retained)
    lines = [f"# Run report: {run_dir.name}", "", "## Stages", ""]
    entries = {n: f"- [stage {n}: {m['name']}](stage_{n}/report.md)" for n, m in metrics.items()}
    entries |= {n: f"- stage {n}: skipped, nothing trained ({s['reason']})"
                for n, s in skipped.items()}
    lines += [entries[n] for n in sorted(entries)]
    lines += ["", "## Capability table (95% Wilson intervals)", "",
              "| capability | " + " | ".join(columns) + " |",
              "|---|" + "---|" * len(columns)]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt_rate(c) if c else "-" for c in cells) + " |")
    lines += retention_section(retained, stale, drop_points)
    lines += compute_section(run_dir)
    if plot_capabilities(rows, columns, run_dir / "capabilities.png"):
        lines += ["", "![capabilities](capabilities.png)"]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def step_seconds(stage_dir: Path) -> dict[str, float]:
    """{step: wall seconds} from the stage's done markers: the attempt that finished each step
    (an interrupted attempt's time is not counted; what it cached is reused)."""
    import json

    return {p.name.removesuffix(".done"): json.loads(p.read_text(encoding="utf-8"))["seconds"]
            for p in sorted(stage_dir.glob("steps/*.done"))}


COMPUTE_COLUMNS = ("data steps", "train", "merge", "assess", "decontaminate and report")


def stage_compute(stage_dir: Path) -> dict[str, float]:
    """Wall seconds of a stage's finished steps by COMPUTE_COLUMNS: its own data steps, then
    the shared tail's steps."""
    from core.run import SHARED_TAIL

    steps = step_seconds(stage_dir)
    return dict(zip(COMPUTE_COLUMNS, (
        sum(v for k, v in steps.items() if k not in SHARED_TAIL), steps.get("train", 0.0),
        steps.get("merge", 0.0), steps.get("assess", 0.0),
        steps.get("decontaminate", 0.0) + steps.get("report", 0.0))))


def compute_section(run_dir: Path) -> list[str]:
    """Wall minutes per stage (stage_compute) and in all."""
    stages = {n: stage_compute(steps.parent) for n, steps in stage_files(run_dir, "steps").items()
              if step_seconds(steps.parent)}
    if not stages:
        return []
    lines = ["", "## Compute (wall minutes, finished steps)", "",
             "The attempt that finished each step, on whatever else the machine was running "
             "at the time; time spent in interrupted attempts is not counted.", "",
             "| stage | " + " | ".join(COMPUTE_COLUMNS) + " | total |",
             "|---|" + "---|" * (len(COMPUTE_COLUMNS) + 1)]
    for n, cells in sorted(stages.items()):
        lines.append(f"| {n} | " + " | ".join(f"{c / 60:.1f}" for c in cells.values())
                     + f" | {sum(cells.values()) / 60:.1f} |")
    total = sum(sum(cells.values()) for cells in stages.values())
    lines.append("| all |" + " |" * len(COMPUTE_COLUMNS) + f" {total / 60:.1f} |")
    return lines


def current_retention(run_dir: Path) -> tuple[list[dict], int, float | None]:
    """The retention rows whose two models are still the run's (a stage redone since the check
    makes its rows stale), how many rows were stale, and the fall (points) the check flags."""
    from core.io import read_json

    path = run_dir / RETENTION_FILE
    if not path.is_file():
        return [], 0, None
    merged_sha = {n: read_json(p).get("weights_sha256")
                  for n, p in stage_files(run_dir, "merge.json").items()}
    retention = read_json(path)
    rows = retention["rows"]
    current = [r for r in rows if merged_sha.get(r["later_stage"]) == r["model_weights_sha256"]
               and merged_sha.get(r["stage"]) == r["stage_weights_sha256"]]
    return current, len(rows) - len(current), retention["drop_points"]


def capability_rows(metrics: dict[int, dict],
                    retained: list[dict] = ()) -> dict[str, list[dict | None]]:
    """Rows = every stage's own held-out metric plus every baseline capability; cells are rate
    dicts (None: not measured) for the base, each stage's output and the few-shot reference."""
    first = metrics[min(metrics)]
    rows: dict[str, list[dict | None]] = {}
    for n, m in metrics.items():
        a = m["assessment"]
        key = a["headline"]
        # Stage n's held-out set is measured on its input (the last trained stage's column, or
        # the base model's) and on its output; `check retention` adds the later stages' models.
        previous = max((k for k in metrics if k < n), default=0)
        cells = {previous: a["before"]["summary"][key], n: a["after"]["summary"][key]}
        cells |= {r["later_stage"]: r["later"] for r in retained if r["stage"] == n}
        rows[f"stage {n} held-out {key.replace('_', '-')}"] = [
            cells.get(column) for column in [0, *metrics]] + [None]
    for cap, row in first["baseline"].items():
        rows[cap] = [row["before"]] + [m["baseline"][cap]["after"] for m in metrics.values()] + [
            row["fewshot_reference"]]
    return rows


def retention_section(rows: list[dict], stale: int, drop_points: float | None) -> list[str]:
    """Each stage's held-out result on the later models, against the stage's own."""
    if not rows and not stale:
        return []
    lines = ["", "## Retention (`python cli.py check retention`)", "",
             "Each stage's held-out tasks on every later stage's merged model, paired item by "
             "item with the stage's own result (exact McNemar).", "",
             "| stage metric | model | stage's own | later | change (points) | "
             "vs own: gained / lost, p | vs stage's input: gained / lost, p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        own, before = r["vs_own_after"]["mcnemar"], r["vs_before"]["mcnemar"]
        flag = f" **falls more than {drop_points:g} points**" if r["falls_more_than_drop"] else ""
        change = "n/a" if r["change_points"] is None else f"{r['change_points']:+.1f}"
        lines.append(
            f"| stage {r['stage']} {r['metric'].replace('_', '-')} | {r['model']} | "
            f"{fmt_rate(r['own_after'])} | {fmt_rate(r['later'])} | {change}{flag} | "
            f"+{own['gained']} / -{own['lost']}, p = {own['p_value']:.3g} | "
            f"+{before['gained']} / -{before['lost']}, p = {before['p_value']:.3g} |")
    if stale:
        lines += ["", f"{stale} earlier retention result(s) left out: a stage was redone since "
                      f"the check; run it again."]
    return lines


def plot_capabilities(rows: dict[str, list[dict | None]], columns: list[str],
                      path: Path) -> bool:
    """A grouped bar chart of the rates in the capability table, with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 3.6))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        cells = [rows[n][j] if rows[n][j] and rows[n][j]["rate"] is not None else None
                 for n in names]
        heights = [c["rate"] if c else float("nan") for c in cells]
        errors = [[c["rate"] - c["ci95"][0] if c else 0 for c in cells],
                  [c["ci95"][1] - c["rate"] if c else 0 for c in cells]]
        ax.bar([i + j * width for i in range(len(names))], heights, width, label=column,
               yerr=errors, capsize=1.5, error_kw={"elinewidth": 0.6})
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% Wilson interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
