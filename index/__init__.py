"""FAISS indexes, the id map, the live-write log, publishing and verification."""
