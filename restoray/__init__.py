"""restoray: the command line, run configs, URI resolution and job submission over the restoration library."""

__version__ = "0.1.0"
