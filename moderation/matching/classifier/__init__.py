"""The classifier stage: a calibrated copy probability for each (query, entry) candidate.

Owns :mod:`.regions` (query views: pasted rectangles, undone mosaics; entry windows),
:mod:`.features` (pair features), :mod:`.model` (the logistic copy model, stored as JSON, and
the active model per encoder), :mod:`.stage` (the refiner the screener calls in the uncertain
band) and :mod:`.training` (training pairs from bank imports and reviews, training and the
activation check). Part of :mod:`moderation.matching`; it imports banks, signals and media.
"""
