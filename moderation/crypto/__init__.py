"""Envelope encryption: master keys with ids, per-object data keys, AES-256-GCM, rotation.

Every encrypted object (an index snapshot, an upload blob) has its own 32-byte data key. The
payload is sealed with AES-256-GCM under that data key; the data key is *wrapped* (itself
encrypted with AES-256-GCM) under the primary master key of the :class:`KeyRing`. The wrap's
associated data binds the master key id and a caller-given context naming the object, so a
wrapped key cannot be moved to another object, and a key id never selects the wrong key.

Rotation adds a new master key, makes it primary and re-wraps the (small) wrapped keys; payloads
are never re-encrypted. Retiring a master key makes everything still wrapped under it unreadable,
and destroying one object's wrapped key makes that object unreadable (crypto-shredding, used for
GDPR erasure of uploads), backups included.

Algorithms: AES-GCM as specified in NIST SP 800-38D, via the ``cryptography`` package (OpenSSL).
Nonces are 12 random bytes (SP 800-38D §8.2.2, random construction); a data key encrypts one
snapshot or one blob, so the 2**32 invocation bound of §8.3 is far away.
"""
