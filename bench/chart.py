"""The benchmark's PNG: throughput bars, the latency CDF, RSS over the backlog, throughput over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    uniform, hot, ceiling = results["uniform"], results["hot"], results["ceiling"]
    latency, backlog = results["latency"], results["backlog"]
    targets = {target["name"]: target for target in report["targets"]}

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    run = report["run"]
    machine = report["machine"]
    figure.suptitle(
        f"creditnotes bench ({run['mode']}), {run['started_at'][:19]}Z, "
        f"{machine['nproc']} cores, commit {machine['git_commit'][:10]}, "
        f"load avg before {run['load_average_before'][0]}", fontsize=11)

    # 1. throughput
    axis = axes[0][0]
    names = ["ceiling\n(FastStream pipe,\nno database)", "service\nuniform mix",
             f"service\nhot invoice ({run['sizes']['hot_share']:.0%})"]
    values = [ceiling.get("throughput_msg_s") or 0, uniform.get("throughput_msg_s") or 0,
              hot.get("throughput_msg_s") or 0]
    bars = axis.bar(names, values, color=["#9e9e9e", "#1f77b4", "#ff7f0e"])
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value),
                      ha="center", va="bottom", fontsize=9)
    if values[0]:
        axis.axhline(values[0] * 0.5, color="red", linestyle="--", linewidth=1,
                     label="target: 50% of ceiling")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_ylabel("messages / second")
    axis.set_title("sustained throughput (first consumed to last output event)")

    # 2. latency CDF
    axis = axes[0][1]
    cdf = latency.get("cdf_ms") or []
    if cdf:
        fractions = [index / max(len(cdf) - 1, 1) for index in range(len(cdf))]
        axis.plot(cdf, fractions, color="#1f77b4")
        axis.set_xscale("log")
    seen = latency["publish_to_output_seen_ms"]
    for q, style in (("p50", ":"), ("p95", "-."), ("p99", "--")):
        value = seen.get(q)
        if value and value == value:
            axis.axvline(value, color="#555555", linestyle=style, linewidth=1,
                         label=f"{q} {value:,.1f} ms")
    axis.axvline(100, color="red", linestyle="--", linewidth=1, label="target: p99 100 ms")
    axis.set_xlabel("publish to output event seen (ms, log scale)")
    axis.set_ylabel("fraction of messages")
    axis.set_title(f"latency at {latency['offered_msg_s']:,.0f} msg/s offered")
    axis.legend(loc="lower right", fontsize=8)

    # 3. RSS over the backlog
    axis = axes[1][0]
    series = backlog.get("rss_series") or []
    if series:
        seconds = [point[0] for point in series]
        axis.plot(seconds, [point[1] for point in series], color="#2ca02c", label="service RSS")
        axis.axhline(300, color="red", linestyle="--", linewidth=1, label="target: 300 MB")
        axis.set_ylim(0, max(320, max(point[1] for point in series) * 1.1))
        twin = axis.twinx()
        twin.plot(seconds, [point[2] for point in series], color="#9467bd", alpha=0.6,
                  label="messages processed")
        twin.set_ylabel("messages processed")
        lines = axis.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        axis.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    axis.set_xlabel("seconds since the service started")
    axis.set_ylabel("RSS (MB)")
    axis.set_title(f"service memory with a {backlog['backlog']:,}-message backlog")

    # 4. throughput over time
    axis = axes[1][1]
    for label, phase, color in (("uniform", uniform, "#1f77b4"), ("hot invoice", hot, "#ff7f0e"),
                                ("ceiling", ceiling, "#9e9e9e")):
        per_second = phase.get("per_second") or []
        if len(per_second) > 2:
            per_second = per_second[:-1]  # the last second is a partial one
        if per_second:
            axis.plot(range(len(per_second)), per_second, label=label, color=color, marker=".")
    axis.set_xlabel("seconds since the first message consumed")
    axis.set_ylabel("output events / second")
    axis.set_title("throughput over the drain")
    axis.legend(loc="lower right", fontsize=8)

    verdicts = "   ".join(
        f"{'PASS' if target['met'] else 'MISS'}: {name}" for name, target in targets.items())
    figure.text(0.5, 0.01, verdicts, ha="center", fontsize=9)
    figure.tight_layout(rect=(0, 0.03, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)
