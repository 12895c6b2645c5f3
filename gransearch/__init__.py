"""gransearch: measure and search per-layer quantization granularity under a byte budget.

The public verbs::

    import gransearch as gs
    spec = gs.QuantSpec.parse("w4g64")        # 4 bits, groups of 64, asymmetric
    q = gs.rtn(weight, spec)                   # QuantizedWeight: codes, scale, zero
    gs.layer_nbytes(weight.shape, spec)        # exact stored bytes
    gs.QuantLinear.from_float(linear, q)       # packed nn.Module
"""

from .algorithms import rtn
from .cost import bits_per_weight, layer_nbytes
from .qlinear import QuantLinear
from .quantizer import QuantizedWeight, pack_codes, unpack_codes
from .spec import ActSpec, PerChannel, PerGroup, PerTensor, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "ActSpec",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantLinear",
    "QuantSpec",
    "QuantizedWeight",
    "bits_per_weight",
    "layer_nbytes",
    "pack_codes",
    "rtn",
    "unpack_codes",
    "__version__",
]
