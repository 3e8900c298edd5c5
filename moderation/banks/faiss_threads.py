"""FAISS's OpenMP thread count (``Settings.faiss_threads``), applied whenever FAISS is loaded.

A :class:`~moderation.service.runtime.Runtime` states the wanted count when it is created; FAISS
itself is imported only by :mod:`moderation.banks.index`, which applies the count on import.
So a process that never searches or builds an index (the web tier) never loads FAISS, and one
that does gets the configured threads whichever happens first.
"""

from __future__ import annotations

import sys

_wanted = 0


def set_faiss_threads(threads: int) -> None:
    """Use ``threads`` OpenMP threads in FAISS (0: keep FAISS's default), now if FAISS is
    already loaded, else as soon as :mod:`moderation.banks.index` loads it."""
    global _wanted
    _wanted = threads
    apply_faiss_threads()


def apply_faiss_threads() -> None:
    """Apply the count last given to :func:`set_faiss_threads` if FAISS is loaded (else
    nothing: importing FAISS here would defeat the purpose)."""
    faiss = sys.modules.get("faiss")
    if _wanted and faiss is not None:
        faiss.omp_set_num_threads(_wanted)
