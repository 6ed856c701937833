"""Transitional: the names that moved out of this module, for the one importer not yet updated.

Temperature scaling is `edgexfer.temperature`; the cross-validated probe's fold heads are `edgexfer.probe`.
"calibration" is the INT8 activation ranges' word. edgexfer/guard.py still imports `fold_logits` from here:
when it imports `from edgexfer.probe import fold_logits`, delete this file.
"""
from edgexfer.probe import fold_logits  # noqa: F401
