"""The local repo: block files, SQLite index, pins, GC and verification."""
