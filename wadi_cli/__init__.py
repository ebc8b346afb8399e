"""wadi: weight-direction-aware one-step distillation of diffusion models.

Library first, CLI last: every ``wadi`` command is a thin shell over a function in
this package (``wadi_cli.analysis``, ``wadi_cli.lorad``, ...). Nothing imports
``wadi_cli.cli``.
"""

__version__ = "0.1.0"
