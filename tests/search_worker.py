"""Subprocess entry for the search tests: a tiny model, a cheap fake objective, a shared storage.

    python -m tests.search_worker STORAGE STUDY N_TRIALS SLEEP WARM_START [BANK_DIR]
"""

import os
import sys
import time

import torch

import gransearch as gs

from .tiny import tiny_model
from .test_search import BITS, GRANS, budget_between, calib, fake_objective

if __name__ == "__main__":
    storage, study, n_trials, sleep, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
    bank_dir = sys.argv[6] if len(sys.argv) > 6 else None
    torch.set_num_threads(1)  # every worker computes alike, whatever the machine's core count
    slow = float(os.environ.get("GS_TEST_SLOW_BANK", "0"))
    if slow:  # test instrumentation: each RTN rounding of the bank takes longer, so that workers overlap
        import gransearch.bank as bank_module

        real = bank_module.rtn

        def slowed(*a, **k):
            time.sleep(slow)
            return real(*a, **k)

        bank_module.rtn = slowed
    torch.manual_seed(0)
    model = tiny_model("llama")
    fn = fake_objective(model, sleep)
    res = gs.optimize(model, budget_bytes=budget_between(model), calib=calib(), eval_ids=None, methods=("rtn", "gptq"),
                      bits=BITS, granularities=GRANS, n_trials=n_trials, storage=storage, study_name=study,
                      objective_fn=fn, warm_start=warm, bank_dir=bank_dir, verbose=False)
    print("DONE", len(res.study.trials), flush=True)
