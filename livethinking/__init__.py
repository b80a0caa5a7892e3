"""livethinking: kernels, a trainer and an inference path for small MoE reasoning models.

The public op API is :mod:`livethinking.ops`; ``livethinking info`` reports what is built.
"""

import torch as _torch  # noqa: F401  (loads libc10/libtorch, which livethinking._C links against)

__version__ = "0.1.0"

__all__ = ["__version__"]
