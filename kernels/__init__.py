"""Standalone Triton kernels, installed as ``livethinking.kernels``.

Each ``<op>.py`` here imports only torch and triton and holds its kernels, launcher,
autograd wrapper and a plain-PyTorch reference, so it can be copied into another
project on its own. The package itself exports nothing; import the op modules.
"""

__all__: list[str] = []
