"""ncaudit: audit trained image classifiers for Neural Collapse.

The public surface is small: the command line (``ncaudit``), the HDF5 feature-cache schema
(:mod:`ncaudit.store`), the streaming statistics (:class:`ncaudit.stats.ClassStatistics`) and the metric
functions (:mod:`ncaudit.metrics`).
"""

__version__ = "0.2.0"
