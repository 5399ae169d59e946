"""amp_fused: Adversarial Model Perturbation with fused multi-tensor kernels."""
from .backends import available_backends
from .optimizer import AMP
from .sam import SAM

__version__ = "0.1.0"
__all__ = ["AMP", "SAM", "available_backends", "__version__"]
