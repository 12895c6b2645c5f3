"""gransearch: measure and search per-layer quantization granularity under a byte budget.

The public verbs::

    import gransearch as gs
    spec = gs.QuantSpec.parse("w4g64")        # 4 bits, groups of 64, asymmetric
    q = gs.rtn(weight, spec)                   # QuantizedWeight: codes, scale, zero
    gs.layer_nbytes(weight.shape, spec)        # exact stored bytes
    gs.QuantLinear.from_float(linear, q)       # packed nn.Module
"""

from .algorithms import gptq, rtn
from .calibrate import LayerStats, calibrate
from .fold import smoothquant
from .plan import LayerPlan, QuantPlan
from .methods import METHODS, GPTQOptions, Method
from .quantize import QuantizeResult, outlier_share, quantize, set_act_quant
from .search import OptimizeResult, optimize
from .ablate import ablate_activations, ablate_weights
from .diagnostics import Diagnosis, diagnose
from . import allocate, bank, diagnostics, errors, export, llamacpp, methods, models, offload, plan, runs, search, study  # noqa: E402, F401  (submodules as attributes)
from .runs import join_study
from .export import load_quantized, save_quantized
from .export.gguf import save_gguf
from .errors import BankError, BudgetError, NonFiniteError, PlanFormatError, SearchError, StudyMismatchError
from .cost import bits_per_weight, layer_nbytes
from .data import load_text, load_tokens, sample_windows
from .evaluate import Perplexity, layer_objective, perplexity
from .models import load_model
from .qlinear import QuantLinear
from .quantizer import QuantizedWeight, pack_codes, unpack_codes
from .spec import ActSpec, Granularity, PerChannel, PerGroup, PerTensor, QuantSpec, as_granularity

__version__ = "0.1.0"

__all__ = [
    "ActSpec",
    "BankError",
    "BudgetError",
    "NonFiniteError",
    "PlanFormatError",
    "SearchError",
    "StudyMismatchError",
    "Diagnosis",
    "GPTQOptions",
    "Method",
    "ablate_activations",
    "ablate_weights",
    "as_granularity",
    "diagnose",
    "LayerPlan",
    "LayerStats",
    "METHODS",
    "OptimizeResult",
    "QuantPlan",
    "QuantizeResult",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantLinear",
    "QuantSpec",
    "Perplexity",
    "QuantizedWeight",
    "bits_per_weight",
    "calibrate",
    "gptq",
    "join_study",
    "load_quantized",
    "save_quantized",
    "save_gguf",
    "layer_nbytes",
    "layer_objective",
    "load_model",
    "load_text",
    "load_tokens",
    "pack_codes",
    "optimize",
    "outlier_share",
    "perplexity",
    "quantize",
    "rtn",
    "sample_windows",
    "set_act_quant",
    "smoothquant",
    "unpack_codes",
    "__version__",
]
