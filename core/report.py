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
    a = metrics["assessment"]
    before, after = a["before"]["summary"], a["after"]["summary"]
    test = a["paired"]["prompt_level_mcnemar"]
    data, dpo, merge = metrics["data"], metrics["dpo"], metrics["merge"]
    lines = [
        f"# Stage {number}: {name}", "",
        "## Assessment (held-out, zero-shot, greedy; 95% Wilson intervals)", "",
        "| metric | input model | merged model |", "|---|---|---|",
    ]
    for key in ("prompt_level", "constraint_level", "non_degenerate"):
        lines.append(f"| {key.replace('_', '-')} | {fmt_rate(before[key])} | {fmt_rate(after[key])} |")
    lines += [
        "", f"Paired exact McNemar on prompt-level outcomes ({a['paired']['items']} items): "
        f"{test['gained']} gained, {test['lost']} lost, p = {test['p_value']:.3g}.", "",
        "## Data", "",
        f"- tasks: {data['tasks_train']} train, {data['tasks_heldout']} held-out",
        f"- responses sampled: {data['responses']}",
        f"- pairs: {data['pairs']} kept, {data['pairs_dropped']} tasks without a pair",
        f"- judge: {data['judge']['comparisons']} comparisons, order-consistent "
        f"{fmt_rate(data['judge']['order_consistent'])}, agrees with checkers "
        f"{fmt_rate(data['judge']['agrees_with_checkers'])}",
        "", "## DPO", "",
        f"- steps: {dpo['steps']}, train loss {dpo['train_loss']}",
        f"- first step: {dpo['first']}", f"- last step: {dpo['last']}",
        "", "![DPO curves](dpo_curves.png)", "",
        "## Merge", "",
        f"- parity: max |Δ log p| = {merge['max_abs_logprob_diff']:.3g} over {merge['probes']} "
        f"probes (tolerance {merge['tolerance']}), mean KL {merge['mean_kl']:.3g}", "",
        "## Example pairs", "",
    ]
    for pair in examples:
        lines += [f"**Prompt**\n\n```\n{pair['prompt']}\n```",
                  f"**Chosen**\n\n```\n{pair['chosen']}\n```",
                  f"**Rejected**\n\n```\n{pair['rejected']}\n```", ""]
    return "\n".join(lines) + "\n"
