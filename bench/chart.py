"""The benchmark's PNG: throughput (median, min-max), latency CDFs, the backlog drain, RSS."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    summary = report["summary"]
    run = report["run"]
    machine = report["machine"]
    runs = results["runs"]

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    figure.suptitle(
        f"creditnotes bench ({run['mode']}, {len(runs)} run(s)), {run['started_at'][:19]}Z, "
        f"{machine['nproc']} cores, commit {machine['git_commit'][:10]}, "
        f"load avg before {run['load_average_before'][0]}", fontsize=11)

    # 1. throughput: medians with min-max whiskers
    axis = axes[0][0]
    bars = [("ceiling\n(no database)", "ceiling_msg_s", "#9e9e9e"),
            ("service\nuniform", "uniform_msg_s", "#1f77b4"),
            (f"service\nhot ({run['sizes']['hot_share']:.0%})", "hot_msg_s", "#ff7f0e")]
    if "replicas_total_msg_s" in summary:
        bars.append((f"{run['sizes']['replicas']} replicas\ntogether", "replicas_total_msg_s",
                     "#2ca02c"))
    medians = [summary.get(name, {}).get("median") or 0 for _, name, _ in bars]
    lows = [max(value - (summary.get(name, {}).get("min") or value), 0)
            for value, (_, name, _) in zip(medians, bars, strict=True)]
    highs = [max((summary.get(name, {}).get("max") or value) - value, 0)
             for value, (_, name, _) in zip(medians, bars, strict=True)]
    drawn = axis.bar([label for label, _, _ in bars], medians,
                     color=[color for _, _, color in bars], yerr=[lows, highs], capsize=4)
    for bar, value in zip(drawn, medians, strict=True):
        axis.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value),
                      ha="center", va="bottom", fontsize=9)
    if medians[0]:
        axis.axhline(medians[0] * 0.5, color="red", linestyle="--", linewidth=1,
                     label="target: 50% of the ceiling")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_ylabel("messages / second")
    axis.set_title("throughput (first consumed to last output), median and min-max")

    # 2. latency CDFs, the first run's
    axis = axes[0][1]
    colors = ["#2ca02c", "#1f77b4", "#d62728", "#9467bd", "#8c564b"]
    for index, (rate, latency) in enumerate(((runs or [{}])[0].get("latency") or {}).items()):
        cdf = latency.get("cdf_ms") or []
        if cdf:
            fractions = [position / max(len(cdf) - 1, 1) for position in range(len(cdf))]
            p99 = (latency.get("publish_to_output_seen_ms") or {}).get("p99")
            axis.plot(cdf, fractions, color=colors[index % len(colors)],
                      label=f"{float(rate):,.0f} msg/s (p99 {p99:,.0f} ms)" if p99 is not None
                      else f"{float(rate):,.0f} msg/s")
    axis.set_xscale("log")
    axis.axvline(100, color="red", linestyle="--", linewidth=1, label="100 ms")
    axis.axvline(50, color="red", linestyle=":", linewidth=1, label="50 ms")
    axis.set_xlabel("publish to output event seen (ms, log scale)")
    axis.set_ylabel("fraction of messages")
    axis.set_title("latency at the offered loads (run 1)")
    axis.legend(loc="lower right", fontsize=8)

    backlog = results.get("backlog") or {}
    # 3. backlog: throughput per window
    axis = axes[1][0]
    windows = backlog.get("windows") or []
    if windows:
        labels = [f"{window['to'] // 1000:,}k" for window in windows]
        values = [window["msg_s"] or 0 for window in windows]
        axis.bar(labels, values, color="#1f77b4")
        first = values[0]
        axis.axhspan(first * 0.9, first * 1.1, color="#2ca02c", alpha=0.15,
                     label="first window +-10%")
        axis.legend(loc="lower right", fontsize=8)
        axis.tick_params(axis="x", labelsize=7)
    axis.set_xlabel(f"messages drained (windows of {backlog.get('window', 0):,})")
    axis.set_ylabel("messages / second")
    axis.set_title(f"backlog of {backlog.get('backlog', 0):,}: throughput per window")

    # 4. backlog: RSS and messages processed over time
    axis = axes[1][1]
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
    axis.set_title("service memory during the backlog drain")

    verdicts = "   ".join(
        f"{'PASS' if target['met'] else 'MISS'}: {target['name']}"
        for target in report["targets"] if target.get("measured") is not False)
    figure.text(0.5, 0.01, verdicts, ha="center", fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0.04, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)
