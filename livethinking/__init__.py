"""livethinking: kernels, a trainer and an inference path for small MoE reasoning models.

The public op API is :mod:`livethinking.ops`; ``livethinking info`` reports what is built.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
