"""Pure content formats: CIDs, chunking, dag-cbor manifests, key parsing. No I/O lives here."""
