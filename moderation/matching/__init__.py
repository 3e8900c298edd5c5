"""Matching an upload's signals against the banks, and the decision.

Owns :mod:`.screening` (candidate search per frame, the :class:`~.screening.Screener`, the
decision and its result rows), :mod:`.policy` (validated YAML policies: thresholds per bank
category) and :mod:`.classifier` (the classifier stage: region views, pair features, the
calibrated copy model and its training). It may import banks, signals, media, audit, crypto,
storage and config; never the service, governance, benchmark or CLI layers.
"""
