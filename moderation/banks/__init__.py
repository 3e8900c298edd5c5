"""Banks of known content: entries, their signals, encrypted snapshots and the indexes.

Owns :mod:`.blocklist` (banks and entries in the database, the decrypted in-memory blocklist,
committing new signals as a snapshot version), :mod:`.snapshot` (the AES-256-GCM snapshot file
format), :mod:`.index` (FAISS cosine and Hamming indexes behind one interface),
:mod:`.importer` (images to entry signals), :mod:`.hashlists` (the hash-list file formats the
industry exchanges: ThreatExchange, NCMEC, StopNCII, plain lists), :mod:`.hash_import` and
:mod:`.hash_export` (hash lists into and out of a bank), :mod:`.operations` and :mod:`.jobs`
(bank imports from the CLI and resumable console jobs: zips of images, and hash lists in
:mod:`.hash_jobs`, their uploads staged sealed by :mod:`.job_staging`). It may import signals,
media, audit, crypto, storage and config. Work that needs the classifier stage at import
(entry windows, training copies) is handed in by the caller through the runtime
(:meth:`moderation.service.runtime.Runtime.import_hooks`), so banks never import matching.
"""
