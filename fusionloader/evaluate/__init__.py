"""``fusionloader evaluate``: does diffusion augmentation help, and by how much? (issue 9)

    from fusionloader import evaluate
    summary = evaluate.run(quick=True, out="eval-out", json_path="out.json")
    summary["results"]["da_fusion"]["4"]       # {"mean", "low", "high", "n_seeds", "best_epoch"}
    summary["paired"]["da_fusion"]["4"]        # {"vs_real": {...}, "vs_da_fusion_fixed_m10": {...}}

DA-Fusion's few-shot protocol for every method (``methods.py``), two classifier protocols (``train.py``),
best epoch on the seed-averaged validation curve and t-intervals over seeds (``stats.py``), one resumable
cell file per (method, k, seed) (``run.py``).
"""

from .methods import METHODS
from .run import QUICK, EvalConfig, run, run_cell

__all__ = ["EvalConfig", "METHODS", "QUICK", "run", "run_cell"]
