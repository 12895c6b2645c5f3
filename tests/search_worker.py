"""Subprocess entry for the search tests: a tiny model, a cheap fake objective, a shared storage.

    python -m tests.search_worker STORAGE STUDY N_TRIALS SLEEP WARM_START
"""

import sys

import torch

import gransearch as gs

from .tiny import tiny_model
from .test_search import BITS, GRANS, budget_between, calib, fake_objective

if __name__ == "__main__":
    storage, study, n_trials, sleep, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
    torch.manual_seed(0)
    model = tiny_model("llama")
    fn = fake_objective(model, sleep)
    res = gs.optimize(model, budget_bytes=budget_between(model), calib=calib(), eval_ids=None, methods=("rtn", "gptq"),
                      bits=BITS, granularities=GRANS, n_trials=n_trials, storage=storage, study_name=study,
                      objective_fn=fn, warm_start=warm, verbose=False)
    print("DONE", len(res.study.trials), flush=True)
