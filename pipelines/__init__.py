"""Ray Data jobs over the restoration library: the dataset build (and, later, the reference index)."""
