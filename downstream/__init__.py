"""Downstream evaluation protocols, one per file."""
