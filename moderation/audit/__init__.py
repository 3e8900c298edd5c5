"""The audit log: one hash chain of audit events, signed checkpoints, export and verification.

Owns :mod:`.log` (record, verify, checkpoint and export the chain in the database) and
:mod:`.offline` (verify an exported JSONL file with nothing but the standard library and
``cryptography``). Every state change in every layer writes its audit event here, in the same
transaction, so this package sits just above the base: it may import :mod:`moderation.crypto`,
:mod:`moderation.storage` and :mod:`moderation.config`, nothing else of the library.
"""
