"""normlab: normalization in deep learning, from first principles to fast kernels."""
from normlab._backend import backend, get_backend, last_choice, set_backend

__version__ = "0.1.0"
__all__ = ["backend", "get_backend", "last_choice", "set_backend", "__version__"]
