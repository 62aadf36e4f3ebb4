"""PNG plots of compare/sweep results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_compare"]


def plot_compare(results: dict[str, dict], outdir: str | Path) -> list[Path]:
    """``results``: policy -> {"samples": [...], "row": {...}} as
    ``dmfrag compare`` builds them. Writes and returns the PNG paths:
    DirectMap4k/2M/1G over time per policy, splits and merges over time,
    TLB walk cycles per policy (when measured), distance from the oracle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for pol, r in results.items():
        xs = [s[0] for s in r["samples"]]
        for ax, idx, title in zip(axes, (1, 2, 3), ("DirectMap4k", "DirectMap2M", "DirectMap1G")):
            ax.plot(xs, [s[idx] / 1024 for s in r["samples"]], label=pol)
            ax.set_title(f"{title} (MiB)")
            ax.set_xlabel("kernel calls")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "directmap_over_time.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for pol, r in results.items():
        xs = [s[0] for s in r["samples"]]
        ax.plot(xs, [s[4] for s in r["samples"]], label=f"{pol} splits")
        if any(s[5] for s in r["samples"]):
            ax.plot(xs, [s[5] for s in r["samples"]], "--", label=f"{pol} merges")
    ax.set_xlabel("kernel calls")
    ax.set_ylabel("2M splits / merges since boot")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "splits_over_time.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    pols = list(results)
    rows = [results[p]["row"] for p in pols]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(pols, [r.get("walk_cycles_vs_reference", 0) for r in rows])
    axes[0].set_title("TLB walk cycles vs unfragmented reference")
    axes[1].bar(pols, [r["level2_splits"] - r.get("oracle_min_2m_splits", 0) for r in rows])
    axes[1].set_title("2M splits above the oracle bound")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    paths.append(out / "tlb_and_oracle.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
