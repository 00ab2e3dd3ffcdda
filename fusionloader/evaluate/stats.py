"""From per-seed validation/test curves to the tables: best epoch, intervals, paired differences, outputs.

Per (protocol, method, k): the validation curves are averaged over seeds and the epoch with the best mean is
chosen (DA-Fusion's rule); each seed's test accuracy at that epoch is a sample; the table gives their mean and
a 95% Student-t interval over seeds. Paired differences subtract, seed by seed, a reference method's test
accuracy at *its* chosen epoch (same seed = same few-shot subset), then take the same interval.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["summarize", "t_interval", "write_json", "write_markdown", "write_plot"]


def _t95(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # scipy is optional: the two-sided 95% quantiles for small df, then the normal's
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
        return table.get(df, 1.96 if df > 30 else 2.1)


def t_interval(values) -> dict:
    """``{"mean", "low", "high", "n_seeds"}``; with one seed the interval is the point (no spread known)."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n_seeds": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = _t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n_seeds": n}


def _best_epoch(curves: list[list[float]]) -> int:
    length = min(len(c) for c in curves)
    means = [sum(c[e] for c in curves) / len(curves) for e in range(length)]
    return max(range(length), key=lambda e: (means[e], -e))


def summarize(cells: dict, protocols, methods, ks, references=("real", "da_fusion_fixed_m10")) -> dict:
    """``cells[(method, k, seed)]`` = cell records -> ``{"protocols": {p: {"results", "paired", "best_epoch"}}}``;
    the first protocol's tables are also at the top level (``results``, ``paired``)."""
    out = {"protocols": {}}
    for p in protocols:
        results, paired, best, per_seed = {}, {}, {}, {}
        for m in methods:
            for k in ks:
                recs = {s: c for (mm, kk, s), c in cells.items() if mm == m and kk == k and p in c["curves"]}
                if not recs:
                    continue
                e = _best_epoch([r["curves"][p]["val"] for r in recs.values()])
                tests = {s: r["curves"][p]["test"][e] for s, r in recs.items()}
                results.setdefault(m, {})[str(k)] = t_interval(list(tests.values())) | {"best_epoch": e}
                best.setdefault(m, {})[str(k)] = e
                per_seed[(m, k)] = tests
        for m in methods:
            for k in ks:
                if (m, k) not in per_seed:
                    continue
                entry = {}
                for ref in references:
                    if (ref, k) not in per_seed or ref == m:
                        continue
                    common = sorted(set(per_seed[(m, k)]) & set(per_seed[(ref, k)]))
                    if common:
                        entry[f"vs_{ref}"] = t_interval([per_seed[(m, k)][s] - per_seed[(ref, k)][s] for s in common])
                paired.setdefault(m, {})[str(k)] = entry
        out["protocols"][p] = {"results": results, "paired": paired}
    first = out["protocols"].get(protocols[0], {"results": {}, "paired": {}})
    out["results"], out["paired"] = first["results"], first["paired"]
    return out


def _pct(r: dict) -> str:
    if r["n_seeds"] < 2:
        return f"{100 * r['mean']:.1f}"
    return f"{100 * r['mean']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def _diff(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["n_seeds"] < 2:
        return f"{100 * r['mean']:+.1f}"
    return f"{100 * r['mean']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"


def write_markdown(summary: dict, path: str, header: str) -> str:
    lines = [header, ""]
    for p, tables in summary["protocols"].items():
        ks = sorted({int(k) for m in tables["results"].values() for k in m})
        lines += [f"### Protocol `{p}`: mean per-class test accuracy, % (95% t-interval over seeds)", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]  # fmt: skip
        for m, row in tables["results"].items():
            lines.append(f"| {m} | " + " | ".join(_pct(row[str(k)]) if str(k) in row else "-" for k in ks) + " |")
        for ref in ("real", "da_fusion_fixed_m10"):
            lines += ["", f"Paired difference vs `{ref}` (percentage points, same seeds):", "",
                      "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]  # fmt: skip
            for m, row in tables["paired"].items():
                if m == ref:
                    continue
                lines.append(f"| {m} | " + " | ".join(_diff(row.get(str(k), {}).get(f"vs_{ref}")) for k in ks) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def write_plot(summary: dict, path: str) -> str | None:
    """Accuracy against k per method, one panel per protocol, the 95% interval shaded (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    protocols = list(summary["protocols"])
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, p in zip(axes[0], protocols):
        for m, row in summary["protocols"][p]["results"].items():
            ks = sorted(int(k) for k in row)
            mean = [100 * row[str(k)]["mean"] for k in ks]
            ax.plot(ks, mean, marker="o", label=m)
            ax.fill_between(ks, [100 * row[str(k)]["low"] for k in ks], [100 * row[str(k)]["high"] for k in ks], alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("images per class (k)")
        ax.set_ylabel("mean per-class test accuracy (%)")
        ax.set_title(f"protocol: {p}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(summary: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return path
