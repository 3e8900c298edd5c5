"""Content in: safe decoding of uploaded bytes into RGB frames, and the edits that make copies.

Owns :mod:`.decode` (format allowlist, size and pixel limits, EXIF orientation, animation
frames, ``Unscannable`` with a reason; RELIABILITY.md I1-I10) and :mod:`.edits` (the edit
families, implemented with Pillow, that the quality benchmark and classifier training apply to
photos). It may import :mod:`moderation.config` only: no signal, bank or service code.
"""
