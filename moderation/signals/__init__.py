"""Signals computed from decoded content: PDQ digests and neural embeddings.

Owns :mod:`.pdq` (PDQ hashes in ThreatExchange's hex format, dihedral variants, Hamming
distance) and :mod:`.encoders` (the encoder factory: EfficientNet-Lite0 by default, open_clip
in production, the ONNX Runtime fast path, device selection). It may import
:mod:`moderation.config`; never banks, matching or anything above them.
"""
