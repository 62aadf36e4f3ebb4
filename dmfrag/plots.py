"""PNG plots of compare/sweep results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_compare"]


def plot_compare(results: dict[str, dict], outdir: str | Path) -> list[Path]:
    """``results``: policy -> {"samples": [...], "row": {...}} as
    ``dmfrag compare`` builds them. Writes and returns the PNG paths:
    DirectMap4k/2M/1G over time per policy, splits and merges over time,
    the end state, the integrated 4K bytes and the peak of split regions
    against the oracle's bounds per policy (and TLB walk cycles when
    measured)."""
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
    tlb = any("walk_cycles_vs_reference" in r for r in rows)
    fig, axes = plt.subplots(1, 3 + tlb, figsize=(5 * (3 + tlb), 4))
    axes[0].bar(pols, [r["end_directmap_4k_kb"] / 1024 for r in rows])
    axes[0].set_title("DirectMap4k at the end (MiB)")
    axes[1].bar(pols, [r["integrated_4k_gib_steps"] for r in rows])
    axes[1].set_title("DirectMap4k over the run (GiB x kernel calls)")
    axes[2].bar(pols, [r["peak_split_2m_regions"] for r in rows], label="peak")
    axes[2].plot(pols, [r["oracle_peak_split_2m_regions"] for r in rows], "k_", markersize=20,
                 label="oracle bound")
    axes[2].plot(pols, [r["oracle_no_merge_peak_split_2m_regions"] for r in rows], "r_",
                 markersize=20, label="bound without merging")
    axes[2].set_title("split 2M regions at the peak")
    axes[2].legend(fontsize=7)
    if tlb:
        axes[3].bar(pols, [r.get("walk_cycles_vs_reference", 0) for r in rows])
        axes[3].set_title("TLB walk cycles vs unfragmented reference")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    paths.append(out / "end_state_and_oracle.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
