"""How well a fit found what the simulator planted (the demo's and the tests' measure of truth)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.metrics import matched_cosine, matching
from ..data import simulation_truth


def recovery(prepared, programs: np.ndarray, n_baseline: int, shift: pd.DataFrame | None = None,
             case_table: pd.DataFrame | None = None) -> dict | None:
    """Recovery of the planted truth of ``prepared`` (a :class:`~deltanmf.data.PreparedData`);
    None for real data.

    ``programs`` are in expression units (:func:`deltanmf.tl.programs.expression_programs`),
    the units of the planted ones, and are matched one-to-one with them on the kept genes.
    With stage 2, also: the planted case programs, and whether each planted usage shift was
    called in its direction (through the matching) and no other shift was called.
    """
    truth = simulation_truth(prepared.source)
    if truth is None:
        return None
    unscaled = np.asarray(programs, dtype=np.float64)
    base = unscaled[:, :n_baseline]
    cos = matched_cosine(base, truth.programs)
    out = {"baseline_matched_cosine": cos.tolist(), "baseline_mean": float(cos.mean()),
           "baseline_min": float(cos.min())}
    if unscaled.shape[1] > n_baseline and truth.case_programs.shape[1]:
        case_cos = matched_cosine(unscaled[:, n_baseline:], truth.case_programs)
        out.update(case_matched_cosine=case_cos.tolist(), case_mean=float(case_cos.mean()),
                   case_min=float(case_cos.min()))
        if case_table is not None:
            match = matching(unscaled[:, n_baseline:], truth.case_programs)
            emergent = case_table["emergent"].to_numpy()
            out["planted_case_programs_emergent"] = [bool(emergent[m]) if m >= 0 else False for m in match]
    if shift is not None:
        match = matching(base, truth.programs)
        called = shift["shift"].to_numpy()
        expected = {1: "up", -1: "down", 0: "none"}
        rows = [{"planted": i + 1, "fitted": f"baseline_{m + 1}", "planted_shift": expected[int(s)],
                 "called_shift": called[m]} for i, (m, s) in enumerate(zip(match, truth.shifted))]
        out["shifts"] = rows
        out["shifts_called_correctly"] = sum(r["planted_shift"] == r["called_shift"] for r in rows
                                             if r["planted_shift"] != "none")
        out["shifts_planted"] = sum(r["planted_shift"] != "none" for r in rows)
        out["shifts_false"] = sum(r["called_shift"] != "none" and r["planted_shift"] != r["called_shift"]
                                  for r in rows)
    return out
