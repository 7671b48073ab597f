"""Teacher pretraining methods, one per file, built from lightly parts."""
